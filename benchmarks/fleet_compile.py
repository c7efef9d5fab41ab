"""Fleet compile of zoo models: sequential vs 2 workers (process pool and Ray), wall time.

Usage: python benchmarks/fleet_compile.py [--models digits,convnet,...] [--repeats 3]
       [--samples 64] [--out bench-fleet] [--modes sequential,pool,ray]

Exports each zoo model with onnxq's exporter (as ``qdq_vs_ort.py`` does: the digits net
trained, the others seeded), writes its calibration and held-out data and one
``fleet.toml`` (compile defaults; a gate of min-sqnr 20 on the held-out inputs, plus
max-accuracy-drop 1 for digits), then times ``onnxq compile-many`` end to end as a
subprocess in each mode, the modes interleaved round by round so that the machine's load
falls on all of them alike. Ray's time includes starting a local Ray instance.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from qdq_vs_ort import _prepare, start, zoo_parser

MODES = {
    "sequential": ["--executor", "local"],
    "pool": ["--executor", "local", "--workers", "2"],
    "ray": ["--executor", "ray", "--workers", "2"],
}


def write_fleet(models: list[str], samples: int, out: Path) -> Path:
    """Exports the models and their data; returns the manifest."""
    (out / "compiled").mkdir(exist_ok=True)
    entries = []
    for name in models:
        path, calib, test, labels = _prepare(name, samples, out)
        np.savez(out / f"{name}_calib.npz", input=calib)
        gate = "min-sqnr = 20\n"
        if labels is not None:
            np.savez(out / f"{name}_test.npz", input=test, label=labels)
            gate += 'labels = "label"\nmax-accuracy-drop = 1\n'
        else:
            np.savez(out / f"{name}_test.npz", input=test)
        entries.append(
            f'[[models]]\nmodel = "{path.name}"\noutput = "compiled/{name}.int8.onnx"\n'
            f'calibration-data = "{name}_calib.npz"\n[models.gate]\n'
            f'data = "{name}_test.npz"\n{gate}'
        )
    manifest = out / "fleet.toml"
    manifest.write_text("\n".join(entries))
    return manifest


def run_once(manifest: Path, mode: str, out: Path) -> dict:
    """One ``compile-many`` run: wall seconds, the fleet's own seconds and statuses."""
    for old in (out / "compiled").iterdir():
        old.unlink()
    report = out / f"fleet-{mode}.json"
    command = [sys.executable, "-m", "onnxq", "compile-many", str(manifest), *MODES[mode]]
    start_s = time.perf_counter()
    proc = subprocess.run(
        [*command, "--json", str(report)], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start_s
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{mode}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    fleet = json.loads(report.read_text())
    return {
        "mode": mode,
        "wall_s": wall,
        "fleet_s": fleet["seconds"],
        "exit": proc.returncode,
        "models": {e["name"]: [e["status"], e["seconds"]] for e in fleet["models"]},
    }


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    """Parses flags, prepares the fleet and times every mode ``--repeats`` times."""
    parser = zoo_parser(__doc__, "bench-fleet")
    parser.set_defaults(models="digits,convnet,resnet,mobilenet,transformer,lstm")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="sequential,pool,ray")
    args, out = start(parser)
    manifest = write_fleet(args.models.split(","), args.samples, out)
    modes = args.modes.split(",")
    info = {"cpu": _cpu(), "cores": os.cpu_count(), "load_before": _load(), "runs": []}
    for round_ in range(args.repeats):
        for mode in modes:
            run = run_once(manifest, mode, out)
            info["runs"].append(run)
            print(f"round {round_ + 1} {mode}: {run['wall_s']:.1f} s", flush=True)
    info["load_after"] = _load()
    info["median_wall_s"] = {
        m: statistics.median(r["wall_s"] for r in info["runs"] if r["mode"] == m) for m in modes
    }
    (out / "fleet_compile.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "runs"}, indent=1))
    for run in info["runs"]:
        print(run["mode"], f"{run['wall_s']:.1f}", f"{run['fleet_s']:.1f}", run["models"])


if __name__ == "__main__":
    main()
