"""Sharded calibration: 1 vs 2 workers, in-process / process pool / Ray, wall time and peak RSS.

The model is the zoo's ``resnet`` (ResNet-10 style, widths 16-128, as in
calibration_memory.py) with a dynamic batch, calibrated with ``entropy`` (2048-bin
histograms on every tensor) on random 3x112x112 samples written once to an ``.npz``
(batches of 8, as ``compile --batch-size 8`` reads them). Each case runs in a fresh
subprocess: the driver's peak RSS (VmHWM) is its own, and each worker reports the peak
RSS of its process after its shard and the CPU seconds its task took (all threads of
its process: on a machine shared with other work, wall time measures the share of the
cores a case wins, CPU time what the work costs). The ranges of every case are checked
to be equal to the in-process ones (bit for bit).

Cases: ``local 1`` (``collect_stats`` in this process: what ``--workers 1`` does; ``@1``:
with ``ONNXQ_THREADS=1``, one ONNX Runtime thread instead of every core),
``local 2`` (a process pool of 2, ``--workers 2``), ``ray 1`` / ``ray 2`` (a local Ray
started with that many CPUs, ``--executor ray --workers N``; Ray's start is timed
apart; a process pool's start is timed on a pool of its own, and paid again inside the
calibration, which starts its pool). Then the merge cost: `merge_stats` of 2 and of
100 shards' statistics.

Usage::

    python benchmarks/sharded_calibration.py                 # 2048 samples, every case
    python benchmarks/sharded_calibration.py --samples 256 --cases local:1,local:2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from calibration_memory import SHAPE, _peak_mb, export_model

BATCH = 8
METHOD = "entropy"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _measured(pair: tuple[Any, Any], *shared: Any) -> tuple[Any, float, int, float]:
    """A task: ``fn(item, *shared)``, its process's peak RSS and pid, the task's CPU seconds."""
    fn, item = pair
    cpu = time.process_time()
    result = fn(item, *shared)
    return result, _peak_mb(), os.getpid(), time.process_time() - cpu


def _measuring(inner: Any) -> Any:
    """An executor that runs ``inner``'s tasks and records each worker's peak RSS (MB)."""
    from onnxq.executor import Executor

    class Measuring(Executor):
        def __init__(self) -> None:
            self.peaks: dict[int, float] = {}
            self.cpu = 0.0

        @property  # type: ignore[override]
        def workers(self) -> int:
            return inner.workers

        def put(self, obj: Any) -> Any:
            return inner.put(obj)

        def _map(self, fn: Any, items: list, shared: tuple, errors: bool, progress: Any) -> list:
            pairs = [(fn, item) for item in items]
            out = inner.map(
                _measured, pairs, shared=shared, return_exceptions=errors, progress=progress
            )
            for _, peak, pid, cpu in out:
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))
                self.cpu += cpu
            return [result for result, *_ in out]

    return Measuring()


def _ranges(stats: dict) -> dict[str, list[float]]:
    from onnxq.calibration.stats import compute_range

    return {name: list(compute_range(s, METHOD)) for name, s in stats.items()}


def run_case(kind: str, workers: int, model_path: Path, data_path: Path) -> dict:
    from onnxq.calibration.collect import collect_stats
    from onnxq.calibration.data import open_calibration_data
    from onnxq.calibration.sharded import collect_stats_sharded
    from onnxq.executor import make_executor
    from onnxq.io import load_model

    model = load_model(model_path)
    data = open_calibration_data(data_path, model, batch_size=BATCH)
    result: dict[str, Any] = {"case": f"{kind} {workers}", "start_s": 0.0}
    if kind == "local" and workers == 1:
        start, cpu = time.perf_counter(), time.process_time()
        stats = collect_stats(model, data)
        result["seconds"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - cpu
        result["worker_peaks_mb"] = []
    else:
        start = time.perf_counter()
        executor = make_executor(kind, workers)
        if kind == "ray":
            executor.put(0)  # starts Ray: timed apart from the calibration
        else:
            # A pool starts with each map that shares other objects, so calibration pays
            # for its own; this one, thrown away, shows what that start costs.
            with make_executor(kind, workers) as warm:
                warm.map(time.sleep, [0.1] * workers)
        result["start_s"] = time.perf_counter() - start
        measuring = _measuring(executor)
        start = time.perf_counter()
        sharded = collect_stats_sharded(model, data, measuring)
        result["seconds"] = time.perf_counter() - start
        executor.close()
        stats = sharded.stats
        result["shards"] = sharded.shards
        result["worker_peaks_mb"] = sorted(measuring.peaks.values())
        result["cpu_s"] = measuring.cpu
    result["driver_peak_mb"] = _peak_mb()
    result["ranges"] = _ranges(stats)
    return result


def merge_cost(model_path: Path, data_path: Path, parts: int) -> float:
    """Seconds `merge_stats` takes for ``parts`` shards' statistics of every tensor."""
    from onnxq.calibration.collect import collect_stats
    from onnxq.calibration.data import open_calibration_data
    from onnxq.calibration.stats import merge_stats
    from onnxq.io import load_model

    model = load_model(model_path)
    data = open_calibration_data(data_path, model, batch_size=BATCH, max_samples=4 * BATCH)
    one = collect_stats(model, data, shard=(0, None), mergeable=True)
    start = time.perf_counter()
    for stats in one.values():
        merge_stats([stats] * parts)
    return time.perf_counter() - start


def spawn(args: list[str], workdir: Path, threads: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--case", *args]
    env = {**os.environ, "ONNXQ_THREADS": threads} if threads else None
    out = subprocess.run(
        cmd,
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=workdir,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    # KIND:WORKERS[@THREADS]: @1 runs the case with ONNXQ_THREADS=1.
    parser.add_argument("--cases", default="local:1,local:1@1,local:2,ray:1,ray:2")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.case:  # a child: one case, its JSON on stdout's last line
        kind, *rest = args.case
        if kind == "merge":
            parts, model_path, data_path = rest
            print(
                json.dumps({"seconds": merge_cost(Path(model_path), Path(data_path), int(parts))})
            )
        else:
            workers, model_path, data_path = rest
            print(json.dumps(run_case(kind, int(workers), Path(model_path), Path(data_path))))
        return
    with tempfile.TemporaryDirectory(prefix="onnxq-sharded-bench-") as tmp:
        workdir = Path(tmp)
        model_path, data_path = workdir / "resnet.onnx", workdir / "calib.npz"
        export_model(model_path)
        rng = np.random.default_rng(0)
        np.savez(data_path, x=rng.standard_normal((args.samples, *SHAPE)).astype(np.float32))
        print(f"CPU: {_cpu_name()} ({os.cpu_count()} cores); load: {os.getloadavg()}")
        print(f"resnet, {args.samples} samples 3x{SHAPE[1]}x{SHAPE[2]}, batch {BATCH}, {METHOD}")
        print(
            "| case | start (s) | calibration (s) | CPU in tasks (s) | CPU per sample (ms) | "
            "driver peak (MB) | worker peaks (MB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        reference = None
        for case in args.cases.split(","):
            kind, workers = case.split(":")
            workers, _, threads = workers.partition("@")
            r = spawn([kind, workers, str(model_path), str(data_path)], workdir, threads)
            r["case"] += f", ONNXQ_THREADS={threads}" if threads else ""
            reference = reference or r["ranges"]
            same = "" if r["ranges"] == reference else " RANGES DIFFER"
            peaks = ", ".join(f"{p:.0f}" for p in r["worker_peaks_mb"]) or "(in-process)"
            print(
                f"| {r['case']}{same} | {r['start_s']:.1f} | {r['seconds']:.1f} | "
                f"{r['cpu_s']:.1f} | {1000 * r['cpu_s'] / args.samples:.2f} | "
                f"{r['driver_peak_mb']:.0f} | {peaks} |",
                flush=True,
            )
        for parts in (2, 100):
            r = spawn(["merge", str(parts), str(model_path), str(data_path)], workdir)
            print(f"merge_stats of {parts} shards, every tensor: {1000 * r['seconds']:.1f} ms")
        print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
