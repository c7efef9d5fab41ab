"""What the Torch-side training tools (issue 12) buy on the digits task.

1. Distillation: the half-width digits net (8/16/16 channels) trained on the labels alone
   and distilled from the full net (alpha 0.5, T 4), same seed, epochs and batch order;
   top-1 on the held-out split (360 images) per seed and the mean.
2. Pruning + fine-tuning: ``channels:0.3`` (and 0.5) with ``onnxq.training.prune``
   (torch-pruning), then fine-tuning for half the epochs at lr 1e-3; top-1 unpruned /
   pruned / fine-tuned per seed and the mean. For the first seed, the unpruned and
   fine-tuned nets are exported (dynamo), compiled with ``--no-quantize`` (BN folded) and
   all timed in one interleaved ``onnxq.bench.benchmark`` run at batch 1 and 8 (the
   exported files too).
3. With ``--widths`` only: untrained digits nets of several widths, BN folded, timed
   interleaved (what channel counts ONNX Runtime's NCHWc convolutions reward here).
4. Transfer: ``onnxq demo --recipe transfer``'s table, plus a from-scratch net trained on
   the same few target labels for the same epochs (what the source backbone is worth).

Usage::

    python benchmarks/training_tools.py --json training_tools.json   # about 2-3 minutes
    python benchmarks/training_tools.py --skip prune,transfer --seeds 0,1,2,3,4
    python benchmarks/training_tools.py --widths --max-time 3   # latency by channel width
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxq.bench import benchmark
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.demo import INPUT_SHAPE
from onnxq.export import export_torch
from onnxq.models._build import seeded
from onnxq.models.digits import DigitsNet
from onnxq.recipes import (
    PRUNE_SPARSITY,
    STUDENT_WIDTHS,
    TARGET_CLASSES,
    TARGET_LABELS_PER_CLASS,
    run_recipe,
)
from onnxq.training.distill import distill
from onnxq.training.loop import digits_loaders, evaluate_accuracy, seed_everything, train
from onnxq.training.prune import prune_channels


def _net(seed: int, **options) -> DigitsNet:
    return seeded(lambda: DigitsNet(**options), seed)


def _trained(seed: int, loaders, epochs: int, **options) -> DigitsNet:
    seed_everything(seed)
    model = _net(seed, **options)
    train(model, loaders.train, epochs=epochs)
    return model


def distillation(seeds: list[int], epochs: int) -> dict:
    rows = []
    for seed in seeds:
        loaders = digits_loaders(seed=seed)
        teacher = _trained(seed, loaders, epochs)
        plain = _trained(seed, loaders, epochs, widths=STUDENT_WIDTHS)
        seed_everything(seed)
        student = _net(seed, widths=STUDENT_WIDTHS)
        distill(student, teacher, loaders.train, epochs=epochs, alpha=0.5, temperature=4.0)
        row = {
            "seed": seed,
            "teacher": evaluate_accuracy(teacher, loaders.test),
            "student": evaluate_accuracy(plain, loaders.test),
            "student_distilled": evaluate_accuracy(student, loaders.test),
        }
        rows.append(row)
        print(f"distill seed {seed}: {row}", flush=True)
    mean = {
        k: float(np.mean([r[k] for r in rows])) for k in ("teacher", "student", "student_distilled")
    }
    return {"epochs": epochs, "student_widths": STUDENT_WIDTHS, "seeds": rows, "mean": mean}


def _time(tmp: Path, models: dict, max_time: float) -> dict:
    """Exported and optimised (BN folded) files of each model, timed in one interleaved run."""
    paths = {}
    for name, model in models.items():
        exported = tmp / f"{name}_exported.onnx"
        export_torch(model, INPUT_SHAPE, exported, exporter="dynamo")
        optimised = tmp / f"{name}_optimised.onnx"
        compile_model(exported, optimised, CompileConfig(quantize=False, check_latency=False))
        paths[f"{name} optimised"], paths[f"{name} exported"] = optimised, exported
    order = sorted(paths, key=lambda k: (k.endswith("exported"), k != "unpruned optimised"))
    result = benchmark([paths[k] for k in order], batch_sizes=(1, 8), max_time=max_time).to_dict()
    by_path = {str(p): k for k, p in paths.items()}
    timings = {}
    for r in result["results"]:
        timings.setdefault(by_path[str(r["model"])], {})[r["batch"]] = {
            "p50_ms": r["p50_ms"],
            "speedup_vs_unpruned_optimised": r["speedup_vs_first"],
            "speedup_ci95": r["speedup_ci95"],
        }
    # Between exported files, the ratio of medians (the bench's ratios are to the first model).
    for name, entry in timings.items():
        if name.endswith("exported"):
            for batch, t in entry.items():
                t["speedup_vs_unpruned_exported"] = (
                    timings["unpruned exported"][batch]["p50_ms"] / t["p50_ms"]
                )
    return {"order": order, "timings": timings}


def pruning(seeds: list[int], sparsities: list[float], epochs: int, max_time: float) -> dict:
    rows, latency = [], None
    for seed in seeds:
        loaders = digits_loaders(seed=seed)
        model = _trained(seed, loaders, epochs)
        row, timed = {"seed": seed, "unpruned": evaluate_accuracy(model, loaders.test)}, {}
        for sparsity in sparsities:
            pruned = copy.deepcopy(model)
            summary = prune_channels(pruned, next(iter(loaders.train))[0][:1], sparsity)
            before = evaluate_accuracy(pruned, loaders.test)
            seed_everything(seed)
            train(pruned, loaders.train, epochs=max(1, epochs // 2), lr=1e-3)
            row[f"channels:{sparsity}"] = {
                "pruned": before,
                "finetuned": evaluate_accuracy(pruned, loaders.test),
                "parameters": [summary.parameters_before, summary.parameters_after],
                "channels": summary.channels,
                "effective_sparsity": summary.effective_sparsity,
                "rounding": summary.describe(),
            }
            timed[f"channels:{sparsity}"] = pruned
        rows.append(row)
        print(f"prune seed {seed}: {row}", flush=True)
        if latency is None:
            with tempfile.TemporaryDirectory() as tmp:
                latency = _time(Path(tmp), {"unpruned": model, **timed}, max_time)
    mean = {"unpruned": float(np.mean([r["unpruned"] for r in rows]))}
    for sparsity in sparsities:
        key = f"channels:{sparsity}"
        mean[key] = {k: float(np.mean([r[key][k] for r in rows])) for k in ("pruned", "finetuned")}
    return {"epochs": epochs, "seeds": rows, "mean": mean, "latency": latency}


def width_sweep(max_time: float) -> dict:
    """Untrained digits nets by width, BN folded, timed interleaved (ratios to 16/32/32)."""
    widths = [(16, 32, 32), (8, 24, 24), (8, 16, 16), (16, 16, 16), (11, 22, 22), (11, 16, 16)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for w in widths:
            exported = Path(tmp) / f"{'_'.join(map(str, w))}.onnx"
            export_torch(_net(0, widths=w), INPUT_SHAPE, exported, exporter="torchscript")
            paths.append(exported.with_suffix(".optimised.onnx"))
            compile_model(exported, paths[-1], CompileConfig(quantize=False, check_latency=False))
        result = benchmark(paths, batch_sizes=(1, 8), max_time=max_time).to_dict()
    return {
        f"{'/'.join(map(str, widths[paths.index(Path(r['model']))]))} batch {r['batch']}": [
            r["speedup_vs_first"],
            r["speedup_ci95"],
        ]
        for r in result["results"]
    }


def transfer(epochs: int, out: Path) -> dict:
    result = run_recipe("transfer", out, epochs=epochs, time_budget=1.0)
    target = digits_loaders(seed=0, classes=TARGET_CLASSES, train_per_class=TARGET_LABELS_PER_CLASS)
    seed_everything(0)
    scratch = _net(0, num_classes=len(TARGET_CLASSES))
    train(scratch, target.train, epochs=4 * epochs, lr=1e-3)
    return {
        "table": result.output.details["transfer"],
        "lines": result.output.notes,
        "scratch_same_labels": evaluate_accuracy(scratch, target.test),
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsities", default=f"{PRUNE_SPARSITY},0.5")
    parser.add_argument("--max-time", type=float, default=5.0, help="seconds per batch size")
    parser.add_argument("--skip", default="", help="comma-separated: distill, prune, transfer")
    parser.add_argument("--widths", action="store_true", help="only the latency-by-width run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    report = {}
    if args.widths:
        skip = {"distill", "prune", "transfer"}
        report["widths"] = width_sweep(args.max_time)
    if "distill" not in skip:
        report["distill"] = distillation(seeds, args.epochs)
    if "prune" not in skip:
        sparsities = [float(v) for v in args.sparsities.split(",")]
        report["prune"] = pruning(seeds, sparsities, args.epochs, args.max_time)
    if "transfer" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            report["transfer"] = transfer(args.epochs, Path(tmp))
    report["seconds"] = time.perf_counter() - start
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
