"""onnxq int8 vs ONNX Runtime's quantize_static: fidelity, accuracy, latency, compile time.

Usage: python benchmarks/qdq_vs_ort.py [--models resnet,mobilenet,digits] [--samples 64]
       [--time-budget 10] [--out bench-out]

For each zoo model (224x224 for the image nets) it exports fp32 with onnxq, then builds
int8 models from the same calibration data: onnxq (``compile_model``), ORT
``quantize_static`` (QDQ, per-channel, MinMax, U8S8), the same with ``reduce_range``,
and the latter on onnxq's BN-folded fp32 model (ORT's quantizer does not fold BN).
It reports SQNR against fp32 on held-out inputs (deployed path: full optimisation),
top-1 accuracy for the digits net, compile wall time, and latency of all four models
timed interleaved in one ``onnxq.bench.benchmark`` run (batch 1 and 8, 2 threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from onnxq.bench import benchmark
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.evaluate import sqnr_db
from onnxq.export import export_torch
from onnxq.models import ZOO
from onnxq.models.digits import train_digits


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, data: np.ndarray):
        self.name, self.data, self.i = name, data, 0

    def get_next(self):
        if self.i >= len(self.data):
            return None
        self.i += 1
        return {self.name: self.data[self.i - 1 : self.i]}


def _prepare(name: str, samples: int, out: Path):
    """Exports the fp32 model; returns (path, calibration, held-out inputs, labels)."""
    path = out / f"{name}.onnx"
    rng = np.random.default_rng(0)
    if name == "digits":
        module, data = train_digits()
        export_torch(module, (1, 1, 8, 8), path)
        return path, data.x_train[:samples], data.x_test, data.y_test
    info = ZOO[name]
    export_torch(info.factory(), info.input_shape, path, input_dtype=info.input_dtype)
    shape = info.input_shape[1:]
    if info.input_dtype == torch.int64:  # token ids (the zoo's vocabularies have 1000)
        calib = rng.integers(0, 1000, size=(samples, *shape))
        test = rng.integers(0, 1000, size=(16, *shape))
        return path, calib, test, None
    calib = rng.standard_normal((samples, *shape)).astype(np.float32)
    test = rng.standard_normal((16, *shape)).astype(np.float32)
    return path, calib, test, None


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls (the machine is shared: one call is noisy)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _quantize_all(
    path: Path, calib: np.ndarray, out: Path, repeats: int
) -> dict[str, tuple[Path, float]]:
    input_name = onnx.load(path).graph.input[0].name
    np.savez(out / "calib.npz", **{input_name: calib})
    target = out / f"{path.stem}.onnxq.onnx"
    config = CompileConfig(calibration=str(out / "calib.npz"), check_latency=False)
    results = {
        "onnxq": (target, _median_seconds(lambda: compile_model(path, target, config), repeats))
    }
    # The same compile without the post-compile fidelity check, which ORT has no match for.
    unchecked = dataclasses.replace(config, verify_samples=0)
    no_check = _median_seconds(lambda: compile_model(path, target, unchecked), repeats)
    print(json.dumps({"model": path.stem, "onnxq_compile_without_check_s": round(no_check, 2)}))
    # ORT's quantizer keeps BatchNormalization; give it onnxq's BN-folded fp32 model too,
    # so the comparison also isolates QDQ placement and numerics.
    folded = out / f"{path.stem}.folded.onnx"
    compile_model(path, folded, CompileConfig(quantize=False))
    variants = (
        ("ort", path, False),
        ("ort_reduce_range", path, True),
        ("ort_on_folded_reduce_range", folded, True),
    )
    for label, source, reduce_range in variants:
        target = out / f"{path.stem}.{label}.onnx"

        def quantize(source=source, target=target, reduce_range=reduce_range):
            quantize_static(
                str(source),
                str(target),
                _Reader(input_name, calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )

        results[label] = (target, _median_seconds(quantize, repeats))
    return results


def _fidelity(reference: Path, candidate: Path, test: np.ndarray, labels) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    ref = ort.InferenceSession(str(reference), opts)
    cand = ort.InferenceSession(str(candidate), opts)
    name = ref.get_inputs()[0].name
    r = np.concatenate([ref.run(None, {name: test[i : i + 1]})[0] for i in range(len(test))])
    c = np.concatenate([cand.run(None, {name: test[i : i + 1]})[0] for i in range(len(test))])
    result = {"sqnr_db": round(sqnr_db(r, c), 2)}
    if labels is not None:
        result["top1"] = round(float(np.mean(np.argmax(c, 1) == labels)) * 100, 2)
        result["fp32_top1"] = round(float(np.mean(np.argmax(r, 1) == labels)) * 100, 2)
    return result


def run(models: list[str], samples: int, budget: float, out: Path, repeats: int = 3) -> list[dict]:
    """Runs the comparison for each model and returns one row per (model, quantizer)."""
    rows = []
    for name in models:
        path, calib, test, labels = _prepare(name, samples, out)
        quantized = _quantize_all(path, calib, out, repeats)
        paths = [path] + [p for p, _ in quantized.values()]
        bench = benchmark(paths, batch_sizes=(1, 8), threads=2, max_time=budget).to_dict()
        for label, (qpath, seconds) in quantized.items():
            row = {"model": name, "quantizer": label, "compile_s": round(seconds, 2)}
            row.update(_fidelity(path, qpath, test, labels))
            for entry in bench["results"]:
                if entry["model"] == str(qpath):
                    row[f"speedup_b{entry['batch']}"] = round(entry["speedup_vs_first"], 3)
                    row[f"speedup_b{entry['batch']}_ci95"] = [
                        round(v, 3) for v in entry["speedup_ci95"]
                    ]
                    row[f"p50_ms_b{entry['batch']}"] = round(entry["p50_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        fp32 = [e for e in bench["results"] if e["model"] == str(path)]
        for entry in fp32:
            print(
                json.dumps(
                    {
                        "model": name,
                        "quantizer": "fp32",
                        "batch": entry["batch"],
                        "p50_ms": round(entry["p50_ms"], 3),
                    }
                ),
                flush=True,
            )
    return rows


def zoo_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """A flag parser with the zoo benchmarks' ``--models`` and ``--out`` (default ``out``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet,mobilenet,transformer")
    parser.add_argument("--out", default=out)
    return parser


def start(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path]:
    """Parses the flags, quiets logging and seeds torch; returns them and the ``--out`` folder.

    The seed makes the exported zoo weights, hence every compared model, the same run to run.
    """
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    return args, out


def main() -> None:
    """Parses flags and runs the comparison."""
    parser = zoo_parser(__doc__, "bench-out")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--time-budget", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="compile runs (median taken)")
    args, out = start(parser)
    rows = run(args.models.split(","), args.samples, args.time_budget, out, args.repeats)
    (out / "qdq_vs_ort.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
