"""Latency-aware placement: input fp32, onnxq's optimised fp32 and int8, timed interleaved.

Usage: python benchmarks/latency_placement.py [--models digits,resnet,mobilenet,transformer]
       [--threads 2] [--repeats 3] [--time-budget 4] [--out bench-placement]

For each model it exports fp32 (the zoo's factory, as ``onnxq export`` does; ``digits`` is
the demo's trained net), then compiles it three ways from the same 64 calibration samples:
``--no-quantize`` (optimised fp32: cleanup, BN folding), int8 with ``--no-latency-check``
(QDQ placement as inserted, no latency step) and int8 with the latency step (fusion
analysis of ONNX Runtime's graph, reversion, timed decision; it may emit fp32). The four
files are timed interleaved at batch 1 on the first calibration sample with ``--threads``
intra-op threads, ``--repeats`` times; the rounds of all repeats are pooled (each round
is paired) for the ratios and their 95% bootstrap intervals.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
from qdq_vs_ort import _prepare, start, zoo_parser

from onnxq.bench import benchmark
from onnxq.bootstrap import bootstrap_speedup, ci95
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.numerics import describe_cpu

_LABELS = ("input", "fp32_opt", "int8_inserted", "emitted")


def _compile_all(name: str, path: Path, calib: np.ndarray, out: Path) -> tuple[dict, dict]:
    """Writes the optimised fp32, inserted-int8 and placed models; returns paths and reports."""
    input_name = onnx.load(path).graph.input[0].name
    data = out / f"{name}.calib.npz"
    np.savez(data, **{input_name: calib})
    first = out / f"{name}.first.npz"
    np.savez(first, **{input_name: calib[:1]})
    paths = {"input": path}
    reports = {}
    configs = {
        "fp32_opt": CompileConfig(quantize=False),
        "int8_inserted": CompileConfig(calibration=str(data), check_latency=False),
        "emitted": CompileConfig(calibration=str(data)),
    }
    for label, config in configs.items():
        target = out / f"{name}.{label}.onnx"
        start = time.perf_counter()
        report = compile_model(path, target, config)
        report = report.to_dict() if hasattr(report, "to_dict") else report
        report["compile_s"] = round(time.perf_counter() - start, 2)
        paths[label], reports[label] = target, report
    return {**paths, "first": first}, reports


def _ratio(times: dict[str, np.ndarray], base: str, other: str) -> list[float]:
    """Median ratio base/other and its 95% bootstrap interval over paired rounds."""
    point = float(np.median(times[base]) / np.median(times[other]))
    lo, hi = ci95(bootstrap_speedup(times[base], times[other]))
    return [round(point, 3), round(lo, 3), round(hi, 3)]


def run(models: list[str], threads: int, repeats: int, budget: float, out: Path) -> list[dict]:
    """One row per model: medians, ratios with intervals, the placement's own decision."""
    rows = []
    for name in models:
        path, calib, _, _ = _prepare(name, 64, out)
        paths, reports = _compile_all(name, path, calib, out)
        pooled: dict[str, list[np.ndarray]] = {k: [] for k in _LABELS}
        points = []
        for _ in range(repeats):
            result = benchmark(
                [str(paths[k]) for k in _LABELS],
                threads=threads,
                data=paths["first"],
                max_time=budget,
                min_runs=10,
            )
            for label, stats in zip(_LABELS, result.stats, strict=True):
                pooled[label].append(stats.samples_ms)
            last = {k: float(np.median(v[-1])) for k, v in pooled.items()}
            points.append(round(last["fp32_opt"] / last["emitted"], 3))
        times = {k: np.concatenate(v) for k, v in pooled.items()}
        placed = reports["emitted"]
        row = {
            "model": name,
            "p50_ms": {k: round(float(np.median(v)), 3) for k, v in times.items()},
            "input_over_fp32_opt": _ratio(times, "input", "fp32_opt"),
            "fp32_opt_over_int8_inserted": _ratio(times, "fp32_opt", "int8_inserted"),
            "fp32_opt_over_emitted": _ratio(times, "fp32_opt", "emitted"),
            "input_over_emitted": _ratio(times, "input", "emitted"),
            "fp32_opt_over_emitted_per_repeat": points,
            "emitted": placed.get("placement", {}).get("emitted", "int8"),
            "reason": placed.get("placement", {}).get("reason"),
            "reverted": sorted(placed.get("placement", {}).get("reverted", {})),
            "compile_latency": {
                k: placed.get("latency", {}).get(k)
                for k in ("speedup", "speedup_ci95", "speedup_vs_fp32", "speedup_vs_fp32_ci95")
            },
            "compile_s": {k: r["compile_s"] for k, r in reports.items()},
            "rounds": int(times["input"].size),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    """Parses flags and runs the benchmark."""
    parser = zoo_parser(__doc__, "bench-placement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=4.0, help="seconds per repeat")
    args, out = start(parser)
    print(json.dumps({"cpu": describe_cpu(), "threads": args.threads}), flush=True)
    rows = run(args.models.split(","), args.threads, args.repeats, args.time_budget, out)
    summary = {"cpu": describe_cpu(), "threads": args.threads, "rows": rows}
    (out / "latency_placement.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
