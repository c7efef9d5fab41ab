"""Peak memory and time of calibration: onnxq's streaming statistics vs onnxruntime's calibrators.

Each case runs in a fresh subprocess so that its peak RSS (``VmHWM``) is its own.
The model is the zoo's ``resnet`` (ResNet-10 style, widths 16-128) exported with a dynamic
batch and fed 3x112x112 random images in batches of 8, generated on the fly by both tools
(the data itself is never held), so the peak shows what each calibrator keeps.

``--compile`` measures a whole int8 compile of a large-activation model instead: a conv net
generated here at 3x1024x1024 with 32 channels at full resolution (a segmentation-style
body: every activation is 128 MB per sample), onnxq's ``compile_model`` under its default
memory budget, a small explicit budget, and an unbounded one, vs ORT's ``quantize_static``
(QDQ, per-channel, MinMax) on the same file and calibration samples.

Usage::

    python benchmarks/calibration_memory.py            # the full table (about 70 s on 2 cores)
    python benchmarks/calibration_memory.py --samples 64,1024 --ort-entropy-samples 64,256
    python benchmarks/calibration_memory.py --compile  # large activations (about 2 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 8
SHAPE = (3, 112, 112)


def _batches(samples: int):
    rng = np.random.default_rng(0)
    for start in range(0, samples, BATCH):
        n = min(BATCH, samples - start)
        yield {"x": rng.standard_normal((n, *SHAPE)).astype(np.float32)}


def export_model(path: Path) -> None:
    import torch

    from onnxq.models import get_model_info

    module = get_model_info("resnet").factory(seed=0)
    example = (torch.randn(2, *SHAPE),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter reports progress on stdout; the table must be all that goes there.
    with contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            module, example, dynamo=True, input_names=["x"], dynamic_shapes=({0: batch},)
        )
    program.save(str(path))


def _peak_mb() -> float:
    """The process's peak resident set (VmHWM).

    Not ``ru_maxrss``: Linux carries the pre-exec high-water mark into it, so a child
    forked from this (Torch-importing) parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_onnxq(model_path: Path, samples: int, method: str) -> dict:
    from onnxq.calibration.collect import collect_stats
    from onnxq.calibration.data import open_calibration_data
    from onnxq.calibration.stats import compute_range
    from onnxq.io import load_model

    model = load_model(model_path)
    data = open_calibration_data(lambda: _batches(samples), model, batch_size=BATCH)
    baseline = _peak_mb()
    start = time.perf_counter()
    stats = collect_stats(model, data, progress=False)
    ranges = {name: compute_range(s, method) for name, s in stats.items()}
    return {"seconds": time.perf_counter() - start, "baseline_mb": baseline, "tensors": len(ranges)}


def run_ort(model_path: Path, samples: int, method: str, workdir: Path) -> dict:
    from onnxruntime.quantization.calibrate import (
        CalibrationDataReader,
        CalibrationMethod,
        create_calibrator,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = _batches(samples)

        def get_next(self):
            return next(self._it, None)

    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}
    calibrator = create_calibrator(
        str(model_path),
        augmented_model_path=str(workdir / f"augmented-{os.getpid()}.onnx"),
        calibrate_method=calibrate_method[method],
    )
    baseline = _peak_mb()
    start = time.perf_counter()
    calibrator.collect_data(Reader())
    ranges = calibrator.compute_data()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_mb": baseline, "tensors": len(list(ranges.keys()))}


def run_case(tool: str, method: str, samples: int, model_path: Path, workdir: Path) -> dict:
    # ORT prints progress to stdout; keep stdout for the JSON result only.
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        if tool == "onnxq":
            result = run_onnxq(model_path, samples, method)
        else:
            result = run_ort(model_path, samples, method, workdir)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
    result["peak_mb"] = _peak_mb()
    return result


def spawn(tool: str, method: str, samples: int, model_path: Path, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", tool, method, str(samples), str(model_path)]
    out = subprocess.run(
        cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --compile: the large-activation model and its cases.
LARGE_SHAPE = (3, 1024, 1024)
LARGE_SAMPLES = 4
LARGE_CHECK_SAMPLES = 2
# Budgets of the onnxq cases: None is the default (half of MemAvailable, at most 16 GB).
LARGE_BUDGETS = {"default": None, "2GB": "2GB", "1GB": "1GB", "unbounded": "1TB"}


def make_large_model(path: Path, calib_path: Path) -> None:
    """Writes a 1024x1024 conv net (32 channels at full resolution) and its calibration data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2 / fan_in))
        return numpy_helper.from_array(w, name)

    nodes, inits, prev = [], [], "x"
    # stem 3x3 conv, then two depthwise-separable blocks, then a 1x1 head of 8 classes.
    layers = [("stem", 3, 32, 3, 1), ("dw1", 32, 32, 3, 32), ("pw1", 32, 32, 1, 1)]
    layers += [("dw2", 32, 32, 3, 32), ("pw2", 32, 32, 1, 1)]
    for name, cin, cout, k, group in layers:
        inits += [weight(f"{name}.w", cout, cin // group, k, k), weight(f"{name}.b", cout)]
        pads = [k // 2] * 4
        conv = helper.make_node(
            "Conv", [prev, f"{name}.w", f"{name}.b"], [name], group=group, pads=pads, name=name
        )
        nodes += [conv, helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu")]
        prev = f"{name}.relu"
    inits += [weight("head.w", 8, 32, 1, 1), weight("head.b", 8)]
    nodes.append(helper.make_node("Conv", [prev, "head.w", "head.b"], ["y"], name="head"))
    graph = helper.make_graph(
        nodes,
        "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *LARGE_SHAPE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, *LARGE_SHAPE[1:]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    x = rng.standard_normal((LARGE_SAMPLES, *LARGE_SHAPE)).astype(np.float32)
    np.savez(calib_path, x=x)


def compile_onnxq(model_path: Path, calib_path: Path, budget: str | None) -> dict:
    from onnxq.compiler import compile_model
    from onnxq.config import CompileConfig

    config = CompileConfig(
        calibration=str(calib_path),
        max_memory=budget,
        verify_samples=LARGE_CHECK_SAMPLES,
        check_latency=False,
    )
    baseline = _peak_mb()
    start = time.perf_counter()
    report = compile_model(model_path, model_path.with_name(f"onnxq-{os.getpid()}.onnx"), config)
    memory = report.to_dict()["calibration"]["memory"]
    return {"seconds": time.perf_counter() - start, "plan": memory, "baseline_mb": baseline}


def compile_ort(model_path: Path, calib_path: Path) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = np.load(calib_path)["x"]
            self._it = iter({"x": x[i : i + 1]} for i in range(len(x)))

        def get_next(self):
            return next(self._it, None)

    baseline = _peak_mb()
    start = time.perf_counter()
    quantize_static(
        str(model_path),
        str(model_path.with_name(f"ort-{os.getpid()}.onnx")),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return {"seconds": time.perf_counter() - start, "plan": None, "baseline_mb": baseline}


def run_compile_case(case: str, model_path: Path, calib_path: Path) -> dict:
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        if case == "ort":
            result = compile_ort(model_path, calib_path)
        else:
            result = compile_onnxq(model_path, calib_path, LARGE_BUDGETS[case])
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
    result["peak_mb"] = _peak_mb()
    return result


def main_compile() -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, calib_path = Path(tmp) / "seg.onnx", Path(tmp) / "calib.npz"
        make_large_model(model_path, calib_path)
        print(
            f"| int8 compile ({LARGE_SAMPLES} samples of {'x'.join(map(str, LARGE_SHAPE))}) "
            "| budget | batch | passes | estimated calibration peak (MB) | peak RSS (MB) "
            "| RSS before compiling (MB) | time (s) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for case in [*LARGE_BUDGETS, "ort"]:
            cmd = [sys.executable, __file__, "--compile-case", case, str(model_path)]
            cmd.append(str(calib_path))
            out = subprocess.run(
                cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            plan = r["plan"] or {}
            budget = f"{plan['budget_bytes'] / 2**30:.1f} GB" if plan else ""
            estimate = f"{plan['estimated_peak_bytes'] / 2**20:.0f}" if plan else ""
            name = "ORT quantize_static MinMax" if case == "ort" else f"onnxq, {case} budget"
            cells = [name, budget, plan.get("batch_size", 1), plan.get("passes", 1), estimate]
            cells += [f"{r['peak_mb']:.0f}", f"{r['baseline_mb']:.0f}", f"{r['seconds']:.1f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="64,1024", help="sample counts for all cases")
    parser.add_argument(
        "--ort-entropy-samples",
        default="64,256,1024",
        help="sample counts for ORT's entropy calibrator (it keeps every activation)",
    )
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help="large-activation int8 compile")
    parser.add_argument("--compile-case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_case:
        case, model_path, calib_path = args.compile_case
        print(json.dumps(run_compile_case(case, Path(model_path), Path(calib_path))))
        return
    if args.compile:
        main_compile()
        return
    if args.case:
        tool, method, samples, model_path = args.case
        workdir = Path(model_path).parent
        print(json.dumps(run_case(tool, method, int(samples), Path(model_path), workdir)))
        return
    logging.basicConfig(level=logging.WARNING)
    counts = [int(s) for s in args.samples.split(",")]
    ort_entropy = [int(s) for s in args.ort_entropy_samples.split(",")]
    cases = [
        ("onnxq", "minmax", counts),
        ("onnxq", "entropy", counts),
        ("ort", "minmax", counts),
        ("ort", "entropy", ort_entropy),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "resnet.onnx"
        export_model(model_path)
        rows = []
        for tool, method, sample_counts in cases:
            results = {n: spawn(tool, method, n, model_path, Path(tmp)) for n in sample_counts}
            rows.append((tool, method, results))
            for n, r in results.items():
                print(
                    f"{tool:6} {method:8} {n:5d} samples: peak {r['peak_mb']:7.0f} MB "
                    f"(after setup {r['baseline_mb']:5.0f} MB), {r['seconds']:6.1f} s",
                    file=sys.stderr,
                )
    print_table(rows)


def print_table(rows: list[tuple[str, str, dict[int, dict]]]) -> None:
    print("| calibrator | samples | peak RSS (MB) | time (s) | peak ratio last/first |")
    print("|---|---:|---:|---:|---:|")
    for tool, method, results in rows:
        counts = sorted(results)
        ratio = results[counts[-1]]["peak_mb"] / results[counts[0]]["peak_mb"]
        for i, n in enumerate(counts):
            r = results[n]
            cell = f"{ratio:.2f} ({counts[-1]}/{counts[0]})" if i == len(counts) - 1 else ""
            name = f"{'onnxq collect_stats' if tool == 'onnxq' else 'ORT create_calibrator'} "
            print(f"| {name}{method} | {n} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | {cell} |")


if __name__ == "__main__":
    main()
