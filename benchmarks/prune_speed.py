"""What channel pruning buys on ONNX Runtime's CPU provider: latency, size and accuracy.

1. The zoo's ``resnet`` at 3x224x224 (dynamo export, dynamic batch): fp32 vs
   ``channels:0.3`` fp32, timed interleaved with ``onnxq.bench.benchmark`` at batch 1 and 8;
   conv output channels, parameters and file sizes before and after.
2. The ``digits`` net trained on sklearn's digits (no fine-tuning after pruning): top-1 on
   the test split for fp32, pruned fp32, pruned fp32 with bias compensation and pruned int8
   (both use ``x_train[:256]`` as calibration data; int8 compensates too), for each
   sparsity; plus ``unstructured:0.5`` to show its zip-compressed size.
3. With ``--search-budget POINTS``: ``onnxq.prune_search.search_sparsity`` on digits for
   ``channels:auto`` and ``channels:auto:compensate`` (what ``compile --prune channels:auto
   --max-accuracy-drop POINTS`` runs), with the int8 top-1 at the sparsity found.

Usage::

    python benchmarks/prune_speed.py                 # about 2-3 minutes on 2 shared cores
    python benchmarks/prune_speed.py --max-time 5 --sparsities 0.3,0.5
    python benchmarks/prune_speed.py --skip-resnet     # digits accuracy only
    python benchmarks/prune_speed.py --skip-resnet --sparsities none --search-budget 1.0
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxq import io
from onnxq.bench import benchmark
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.evaluate import evaluate
from onnxq.export import export_torch
from onnxq.models import ZOO
from onnxq.models.digits import train_digits
from onnxq.passes.prune import zipped_size
from onnxq.prune_search import search_sparsity


def _conv_channels(path: Path) -> int:
    model = io.load_model(path)
    return sum(n.inputs[1].const_value.shape[0] for n in model.graph if n.op_type == "Conv")


def _parameters(path: Path) -> int:
    return io.parameter_stats(io.load_model(path))[0]


def resnet_speed(tmp: Path, max_time: float, sparsity: float) -> dict:
    src = tmp / "resnet.onnx"
    export_torch(ZOO["resnet"].factory(), (1, 3, 224, 224), src)
    dense, pruned = tmp / "resnet_fp32.onnx", tmp / "resnet_pruned.onnx"
    compile_model(src, dense, CompileConfig(quantize=False))
    compile_model(src, pruned, CompileConfig(quantize=False, prune=f"channels:{sparsity}"))
    result = benchmark([dense, pruned], batch_sizes=(1, 8), max_time=max_time).to_dict()
    rows = [
        {
            "model": Path(r["model"]).stem,
            "batch": r["batch"],
            "p50_ms": round(r["p50_ms"], 3),
            "p50_ci95_ms": [round(v, 3) for v in r["p50_ci95_ms"]],
            "speedup": round(r["speedup_vs_first"], 3),
            "speedup_ci95": [round(v, 3) for v in r["speedup_ci95"]],
        }
        for r in result["results"]
    ]
    return {
        "latency": rows,
        "conv_channels": [_conv_channels(dense), _conv_channels(pruned)],
        "parameters": [_parameters(dense), _parameters(pruned)],
        "file_bytes": [dense.stat().st_size, pruned.stat().st_size],
        "threads": result["threads_effective"],
    }


def _top1(reference: Path, candidate: Path, data: Path) -> tuple[float, float]:
    acc = evaluate(reference, candidate, data, labels_key="label").accuracy
    return acc["reference"]["top1"], acc["candidate"]["top1"]


def digits_files(tmp: Path) -> tuple[Path, Path, Path]:
    """Trains and exports digits; returns the model, its test split and calibration data."""
    net, data = train_digits()
    src = tmp / "digits.onnx"
    export_torch(net, (1, 1, 8, 8), src)
    test = tmp / "test.npz"
    np.savez(test, input=data.x_test, label=data.y_test)
    calib = tmp / "calib.npz"
    np.savez(calib, input=data.x_train[:256])
    return src, test, calib


def digits_search(tmp: Path, src: Path, test: Path, calib: Path, budget: float) -> dict:
    """The sparsity search within ``budget`` points, plain and compensated, then int8."""
    rows = []
    for spec in ("channels:auto", "channels:auto:compensate"):
        start = time.perf_counter()
        found = search_sparsity(
            src, spec, test, "label", budget, CompileConfig(calibration=str(calib))
        )
        seconds = time.perf_counter() - start
        int8 = tmp / "digits_search_int8.onnx"
        compile_model(
            src, int8, CompileConfig(prune=found.spec, calibration=str(calib), check_latency=False)
        )
        rows.append(
            {
                **found.to_dict(),
                "search_seconds": round(seconds, 1),
                "int8_top1": _top1(src, int8, test)[1],
            }
        )
    return {"digits_search": rows}


def digits_accuracy(tmp: Path, src: Path, test: Path, calib: Path, sparsities: list[float]) -> dict:
    dense = tmp / "digits_fp32.onnx"
    compile_model(src, dense, CompileConfig(quantize=False))
    rows = []
    for s in sparsities:
        prune = f"channels:{s}"
        pruned, compensated = tmp / f"digits_{s}.onnx", tmp / f"digits_{s}_comp.onnx"
        int8 = tmp / f"digits_{s}_int8.onnx"
        report = compile_model(src, pruned, CompileConfig(quantize=False, prune=prune))
        # The same data compensates the pruned channels' mean in their consumers' biases.
        comp = compile_model(
            src,
            compensated,
            CompileConfig(quantize=False, prune=f"{prune}:compensate", calibration=str(calib)),
        )
        compile_model(
            src,
            int8,
            CompileConfig(prune=f"{prune}:compensate", calibration=str(calib), check_latency=False),
        )
        fp32_top1, pruned_top1 = _top1(dense, pruned, test)
        rows.append(
            {
                "prune": prune,
                "fp32_top1": fp32_top1,
                "pruned_fp32_top1": pruned_top1,
                "compensated_fp32_top1": _top1(dense, compensated, test)[1],
                "compensated_int8_top1": _top1(dense, int8, test)[1],
                "bias_compensated": comp.pruning["PruneChannelsPass"]["bias_compensated"],
                "parameters": report.pruning["PruneChannelsPass"]["parameters"],
            }
        )
    unstructured = tmp / "digits_u50.onnx"
    report = compile_model(
        src, unstructured, CompileConfig(quantize=False, prune="unstructured:0.5")
    )
    summary = report.pruning["PruneWeightsPass"]
    rows.append(
        {
            "prune": "unstructured:0.5",
            "fp32_top1": _top1(dense, unstructured, test)[0],
            "pruned_fp32_top1": _top1(dense, unstructured, test)[1],
            "zipped_bytes": [zipped_size(io.load_model(dense)), summary["zipped_bytes_after"]],
            "file_bytes": [dense.stat().st_size, unstructured.stat().st_size],
        }
    )
    return {"digits": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-time", type=float, default=8.0, help="seconds per batch size")
    parser.add_argument("--sparsity", type=float, default=0.3, help="resnet channel sparsity")
    parser.add_argument(
        "--sparsities", default="0.2,0.3,0.5", help="digits channel sparsities ('none': skip)"
    )
    parser.add_argument(
        "--search-budget", type=float, help="also search digits' sparsity within these points"
    )
    parser.add_argument("--skip-resnet", action="store_true", help="only the digits accuracy")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = {} if args.skip_resnet else resnet_speed(Path(tmp), args.max_time, args.sparsity)
        digits = digits_files(Path(tmp))
        if args.sparsities != "none":
            sparsities = [float(s) for s in args.sparsities.split(",")]
            results |= digits_accuracy(Path(tmp), *digits, sparsities)
        if args.search_budget is not None:
            results |= digits_search(Path(tmp), *digits, args.search_budget)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
