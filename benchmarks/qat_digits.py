"""QAT vs post-training int8 on a setting where post-training quantization loses accuracy.

For each seed: train a digits net in fp32, then measure on the held-out split, on ONNX
Runtime with full optimisation (the deployed int8 kernels):

- ``fp32``: the exported float model;
- ``ptq``: post-training quantization with the same numerics: ``prepare_qat`` calibrated
  on training images but not trained, exported, compiled by ``onnxq compile``; with the
  target's own weight bits this is what compiling the fp32 model gives (``compile_of_fp32``,
  printed beside it);
- ``qat``: the same prepared model fine-tuned with fake quantization, exported, compiled.

The QAT recovers ``(qat - ptq) / (fp32 - ptq)`` of the post-training loss.

    python benchmarks/qat_digits.py --widths 4,8,8 --weight-bits 3 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.export import export_torch
from onnxq.models.digits import DigitsNet
from onnxq.numerics import describe_cpu
from onnxq.training.loop import digits_loaders, seed_everything, train
from onnxq.training.qat import export_qat, prepare_qat, qat_loss


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(axis=1) == y).mean())


def run_seed(args: argparse.Namespace, seed: int, work: Path) -> dict[str, float]:
    """fp32, post-training int8 and QAT int8 accuracies of one seed's digits net."""
    seed_everything(seed)
    loaders = digits_loaders(seed=seed)
    data = loaders.data
    model = DigitsNet(widths=args.widths)
    train(model, loaders.train, epochs=args.epochs)
    np.savez(work / "calib.npz", input=data.x_train[: args.calibration])
    config = CompileConfig(
        calibration=str(work / "calib.npz"), target=args.target, check_latency=False
    )
    export_torch(model, (1, 1, 8, 8), work / "fp32.onnx")
    compile_model(work / "fp32.onnx", work / "compiled_fp32.onnx", config)
    calibration = torch.from_numpy(data.x_train[: args.calibration]).split(64)
    qat = prepare_qat(model, calibration[0], args.target, calibration, weight_bits=args.weight_bits)
    export_qat(qat.eval(), work / "ptq.onnx", (1, 1, 8, 8))
    compile_model(work / "ptq.onnx", work / "ptq_int8.onnx", config)
    start = time.perf_counter()
    train(qat, loaders.train, qat_loss(args.diff_weight, model), epochs=args.qat_epochs, lr=args.lr)
    qat_seconds = time.perf_counter() - start
    export_qat(qat, work / "qat.onnx", (1, 1, 8, 8))
    compile_model(work / "qat.onnx", work / "qat_int8.onnx", config)
    x, y = data.x_test, data.y_test
    return {
        "fp32": _accuracy(work / "fp32.onnx", x, y),
        "compile_of_fp32": _accuracy(work / "compiled_fp32.onnx", x, y),
        "ptq": _accuracy(work / "ptq_int8.onnx", x, y),
        "qat": _accuracy(work / "qat_int8.onnx", x, y),
        "qat_seconds": qat_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="4,8,8", help="conv widths of the digits net")
    parser.add_argument("--weight-bits", type=int, default=3)
    parser.add_argument("--target", default="avx2", help="the compiler's --target")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="fp32 training epochs")
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="QAT learning rate")
    parser.add_argument("--diff-weight", type=float, default=0.0, help="λ of L_diff")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.widths = tuple(int(w) for w in args.widths.split(","))
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            rows.append(run_seed(args, seed, Path(tmp)))
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    loss = mean["fp32"] - mean["ptq"]
    recovered = (mean["qat"] - mean["ptq"]) / loss if loss > 0 else float("nan")
    print(
        f"mean over {args.seeds} seeds: fp32 {100 * mean['fp32']:.2f}%, "
        f"onnxq compile of fp32 {100 * mean['compile_of_fp32']:.2f}%, "
        f"PTQ {100 * mean['ptq']:.2f}%, QAT {100 * mean['qat']:.2f}% "
        f"(recovers {100 * recovered:.0f}% of the PTQ loss of {100 * loss:.2f} points)"
    )
    print(f"CPU: {describe_cpu()['model']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "json"},
                    "seeds": rows,
                    "mean": mean,
                    "recovered": recovered,
                    "cpu": describe_cpu(),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
