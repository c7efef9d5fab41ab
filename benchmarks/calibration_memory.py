"""Peak memory and time of calibration: onnxq's streaming statistics vs onnxruntime's calibrators.

Each case runs in a fresh subprocess so that its peak RSS (``VmHWM``) is its own.
The model is the zoo's ``resnet`` (ResNet-10 style, widths 16-128) exported with a dynamic
batch and fed 3x112x112 random images in batches of 8, generated on the fly by both tools
(the data itself is never held), so the peak shows what each calibrator keeps.

Usage::

    python benchmarks/calibration_memory.py            # the full table (about 70 s on 2 cores)
    python benchmarks/calibration_memory.py --samples 64,1024 --ort-entropy-samples 64,256
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="64,1024", help="sample counts for all cases")
    parser.add_argument(
        "--ort-entropy-samples",
        default="64,256,1024",
        help="sample counts for ORT's entropy calibrator (it keeps every activation)",
    )
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
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
