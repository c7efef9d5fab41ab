"""The ``onnxq demo --recipe`` recipes: train, compress and compare on the digits task, offline."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxq import report
from onnxq.compare import compare
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.demo import CALIBRATION_SAMPLES, INPUT_SHAPE, LABELS_KEY, DemoPaths
from onnxq.errors import InputError
from onnxq.evaluate import evaluate
from onnxq.inputs import input_specs
from onnxq.io import atomic_write, load_model

if TYPE_CHECKING:
    from torch import nn

    from onnxq.models.digits import DigitsData
    from onnxq.training.loop import DigitsLoaders, Progress

__all__ = [
    "RECIPES",
    "Recipe",
    "RecipeContext",
    "RecipeOutput",
    "RecipeResult",
    "register_recipe",
    "run_recipe",
]

logger = logging.getLogger(__name__)

# Half the digits net's widths: the distillation student.
STUDENT_WIDTHS = (8, 16, 16)
# channels:0.3, the setting at which ONNX-side pruning alone loses 16 points on digits.
PRUNE_SPARSITY = 0.3
# Transfer: a backbone learns digits 0-4, then adapts to 5-9 from this many labels each.
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
TARGET_LABELS_PER_CLASS = 20
COMPARE_BATCH_SIZES = (1, 8)
# QAT: the digits net at a quarter width with 4-bit weights (integers in [-7, 7], run by the
# int8 kernels), where post-training quantization loses accuracy (benchmarks/README.md).
QAT_WIDTHS = (4, 8, 8)
QAT_WEIGHT_BITS = 4


@dataclasses.dataclass(frozen=True)
class RecipeContext:
    """What a recipe is given: where to write, how long to train, whom to tell.

    Attributes:
        out: Output folder (exists).
        epochs: Epochs of the main training run; fine-tuning runs scale from it.
        seed: Seed of the data split, the weights and the batch order.
        on_step: Called with a one-line description as each step starts.
        on_progress: Called after every training step (`onnxq.training.loop.Progress`).
        exporter: Torch-to-ONNX exporter (``dynamo``, as ``onnxq demo``, or ``torchscript``).
    """

    out: Path
    epochs: int
    seed: int = 0
    on_step: Callable[[str], None] = logger.info
    on_progress: Callable[[Progress], None] | None = None
    exporter: str = "dynamo"

    @property
    def paths(self) -> DemoPaths:
        """The demo's file names in ``out``: ``calibration`` and ``test`` data among them."""
        return DemoPaths(self.out)

    def model(self, name: str) -> Path:
        """The path of the model file named ``name``."""
        return self.out / f"{name}.onnx"


@dataclasses.dataclass
class RecipeOutput:
    """What a recipe produced: the models to compare and any table of its own.

    Attributes:
        reference: The fp32 reference model.
        candidates: The models it produced, compared against ``reference``.
        notes: Lines shown before the comparison table (e.g. the transfer table).
        details: Recipe-specific numbers for the JSON report.
    """

    reference: Path
    candidates: list[Path]
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RecipeResult:
    """One recipe run: its output, the comparison table and the reports written.

    Attributes:
        recipe: The recipe's name.
        output: What the recipe produced.
        compare: The `onnxq.compare.compare` report of its models.
        reports: Report files written, by format.
        seconds: Wall time of the whole run.
    """

    recipe: str
    output: RecipeOutput
    compare: dict[str, Any]
    reports: dict[str, Path]
    seconds: float


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A registered recipe.

    Attributes:
        name: What ``--recipe`` takes.
        description: One line.
        run: Trains and compresses, returning what to compare.
    """

    name: str
    description: str
    run: Callable[[RecipeContext], RecipeOutput]


RECIPES: dict[str, Recipe] = {}


def register_recipe(
    name: str, description: str, run: Callable[[RecipeContext], RecipeOutput]
) -> None:
    """Registers (or replaces) a recipe under ``name``."""
    RECIPES[name] = Recipe(name, description, run)


# Shared steps. Torch is imported inside them: `onnxq` itself must not need it.


def _loaders(ctx: RecipeContext, **options: Any) -> DigitsLoaders:
    try:
        from onnxq.training.loop import digits_loaders
    except ImportError as e:
        raise InputError(
            f"the training recipes need torch and scikit-learn ({e}): pip install 'onnxq[torch]'"
        ) from e
    return digits_loaders(seed=ctx.seed, **options)


def _train(ctx: RecipeContext, model: nn.Module, loaders: DigitsLoaders, **options: Any) -> None:
    from onnxq.training.loop import seed_everything, train

    seed_everything(ctx.seed)
    train(model, loaders.train, on_progress=ctx.on_progress, **{"epochs": ctx.epochs, **options})


def _digits_net(ctx: RecipeContext, **options: Any) -> nn.Module:
    from onnxq.models._build import seeded
    from onnxq.models.digits import DigitsNet

    return seeded(lambda: DigitsNet(**options), ctx.seed)


def _export(ctx: RecipeContext, model: nn.Module, name: str) -> Path:
    from onnxq.export import export_torch

    path = ctx.model(name)
    export_torch(model, INPUT_SHAPE, path, exporter=ctx.exporter)
    return path


def _write_data(ctx: RecipeContext, model: Path, data: DigitsData) -> None:
    """Writes calibration (training images) and test (held-out images, labels) files."""
    name = input_specs(load_model(model, announce=False))[0].name
    # Calibrating on training images keeps the test set unseen by every compile decision.
    # Written atomically: an interrupted recipe leaves no half-written data beside its models.
    with atomic_write(ctx.paths.calibration) as f:
        np.savez(f, **{name: data.x_train[:CALIBRATION_SAMPLES]})
    with atomic_write(ctx.paths.test) as f:
        np.savez(f, **{name: data.x_test, LABELS_KEY: data.y_test})


def _int8(ctx: RecipeContext, fp32: Path) -> Path:
    """Compiles ``fp32`` to int8 (calibrated on training images) beside it."""
    path = fp32.with_name(fp32.stem.removesuffix("_fp32") + "_int8.onnx")
    ctx.on_step(f"compiling {fp32.name} to int8")
    # The latency step could write fp32 instead: the recipes show int8 and compare times it.
    config = CompileConfig(calibration=str(ctx.paths.calibration), check_latency=False)
    compile_model(fp32, path, config)
    return path


def _reference(ctx: RecipeContext, loaders: DigitsLoaders) -> tuple[nn.Module, Path]:
    """Trains the digits net on all ten digits and exports it: the fp32 reference."""
    ctx.on_step(f"training the digits net ({ctx.epochs} epochs)")
    model = _digits_net(ctx)
    _train(ctx, model, loaders)
    path = _export(ctx, model, "digits_fp32")
    _write_data(ctx, path, loaders.data)
    return model, path


def _accuracy(model: nn.Module, loaders: DigitsLoaders) -> float:
    from onnxq.training.loop import evaluate_accuracy

    return evaluate_accuracy(model, loaders.test)


# The recipes.


def _ptq(ctx: RecipeContext) -> RecipeOutput:
    _, fp32 = _reference(ctx, _loaders(ctx))
    return RecipeOutput(fp32, [_int8(ctx, fp32)])


def _distill(ctx: RecipeContext) -> RecipeOutput:
    from onnxq.training.distill import distillation_loss_fn

    loaders = _loaders(ctx)
    teacher, fp32 = _reference(ctx, loaders)
    half = ", ".join(map(str, STUDENT_WIDTHS))
    ctx.on_step(f"training the half-width student ({half} channels) on the labels alone")
    plain = _digits_net(ctx, widths=STUDENT_WIDTHS)
    _train(ctx, plain, loaders)
    ctx.on_step("training the same student distilled from the digits net")
    student = _digits_net(ctx, widths=STUDENT_WIDTHS)
    _train(ctx, student, loaders, loss_fn=distillation_loss_fn(teacher, 0.5, 4.0))
    plain_path = _export(ctx, plain, "student_fp32")
    student_path = _export(ctx, student, "student_distilled_fp32")
    accuracy = {
        "teacher": _accuracy(teacher, loaders),
        "student": _accuracy(plain, loaders),
        "student_distilled": _accuracy(student, loaders),
    }
    notes = [
        f"top-1 (Torch): teacher {100 * accuracy['teacher']:.2f}%, student "
        f"{100 * accuracy['student']:.2f}%, distilled student "
        f"{100 * accuracy['student_distilled']:.2f}%"
    ]
    candidates = [plain_path, student_path, _int8(ctx, student_path)]
    return RecipeOutput(fp32, candidates, notes, {"torch_top1": accuracy})


def _prune_finetune(ctx: RecipeContext) -> RecipeOutput:
    from onnxq.training.prune import prune_channels

    loaders = _loaders(ctx)
    model, fp32 = _reference(ctx, loaders)
    ctx.on_step(f"pruning channels:{PRUNE_SPARSITY} with torch-pruning")
    pruned = copy.deepcopy(model)
    summary = prune_channels(pruned, next(iter(loaders.train))[0][:1], PRUNE_SPARSITY)
    pruned_path = _export(ctx, pruned, "pruned_fp32")
    before = _accuracy(pruned, loaders)
    epochs = max(1, ctx.epochs // 2)
    ctx.on_step(f"fine-tuning the pruned net ({epochs} epochs)")
    _train(ctx, pruned, loaders, epochs=epochs, lr=1e-3)
    tuned_path = _export(ctx, pruned, "pruned_finetuned_fp32")
    notes = [
        f"channels:{PRUNE_SPARSITY}: parameters {summary.parameters_before:,} -> "
        f"{summary.parameters_after:,} (-{100 * summary.removed_fraction:.1f}%); top-1 (Torch) "
        f"{100 * _accuracy(model, loaders):.2f}% -> {100 * before:.2f}% pruned -> "
        f"{100 * _accuracy(pruned, loaders):.2f}% fine-tuned"
    ]
    candidates = [pruned_path, tuned_path, _int8(ctx, tuned_path)]
    return RecipeOutput(fp32, candidates, notes, {"channels": summary.channels})


def _qat(ctx: RecipeContext) -> RecipeOutput:
    import torch

    from onnxq.training.qat import export_qat, prepare_qat, qat_loss

    loaders = _loaders(ctx)
    widths = ", ".join(map(str, QAT_WIDTHS))
    ctx.on_step(f"training the quarter-width digits net ({widths} channels, {ctx.epochs} epochs)")
    model = _digits_net(ctx, widths=QAT_WIDTHS)
    _train(ctx, model, loaders)
    fp32 = _export(ctx, model, "digits_quarter_fp32")
    _write_data(ctx, fp32, loaders.data)
    calibration = torch.from_numpy(loaders.data.x_train[:CALIBRATION_SAMPLES]).split(64)
    ctx.on_step(f"fake-quantizing it with {QAT_WEIGHT_BITS}-bit weights, calibrated")
    qat = prepare_qat(model, calibration[0], "auto", calibration, weight_bits=QAT_WEIGHT_BITS)
    ptq_top1 = _accuracy(qat, loaders)
    # Untrained, the export is post-training quantization with exactly the QAT numerics.
    ptq = ctx.model(f"ptq_w{QAT_WEIGHT_BITS}")
    export_qat(qat, ptq, INPUT_SHAPE)
    ctx.on_step(f"quantization-aware training ({ctx.epochs} epochs)")
    _train(ctx, qat, loaders, loss_fn=qat_loss(), lr=1e-3)
    trained = ctx.model(f"qat_w{QAT_WEIGHT_BITS}")
    export_qat(qat, trained, INPUT_SHAPE)
    accuracy = {
        "fp32": _accuracy(model, loaders),
        "ptq": ptq_top1,
        "qat": _accuracy(qat, loaders),
    }
    notes = [
        f"top-1 (Torch, {QAT_WEIGHT_BITS}-bit weights fake-quantized): fp32 "
        f"{100 * accuracy['fp32']:.2f}%, post-training {100 * accuracy['ptq']:.2f}%, "
        f"after QAT {100 * accuracy['qat']:.2f}%; the *_int8 models below are what "
        "onnxq compile made of each, scales kept"
    ]
    candidates = [_int8(ctx, fp32), _int8(ctx, ptq), _int8(ctx, trained)]
    return RecipeOutput(fp32, candidates, notes, {"torch_top1": accuracy})


def _transfer_variant(
    ctx: RecipeContext, source: nn.Module, target: DigitsLoaders, *, frozen: bool
) -> tuple[nn.Module, float]:
    """The source backbone with a new head for the target classes; its accuracy untrained."""
    model = copy.deepcopy(source)
    with_seed = _digits_net(ctx, num_classes=len(TARGET_CLASSES))
    model.fc = with_seed.fc  # a fresh, seeded head
    if frozen:
        model.features.requires_grad_(False)
    before = _accuracy(model, target)
    name = "frozen backbone, new head" if frozen else "whole net"
    epochs = 4 * ctx.epochs  # the few-label set is ~10x smaller: a few steps per epoch
    ctx.on_step(f"fine-tuning on digits 5-9, {name} ({epochs} epochs)")
    _train(ctx, model, target, epochs=epochs, lr=3e-3 if frozen else 1e-3)
    return model, before


def _transfer(ctx: RecipeContext) -> RecipeOutput:
    source_data = _loaders(ctx, classes=SOURCE_CLASSES)
    target = _loaders(ctx, classes=TARGET_CLASSES, train_per_class=TARGET_LABELS_PER_CLASS)
    ctx.on_step(f"training the source net on digits 0-4 ({ctx.epochs} epochs)")
    source = _digits_net(ctx, num_classes=len(SOURCE_CLASSES))
    _train(ctx, source, source_data)
    source_top1 = _accuracy(source, source_data)
    rows, paths = {}, {}
    for variant, frozen in (("frozen", True), ("unfrozen", False)):
        model, before = _transfer_variant(ctx, source, target, frozen=frozen)
        paths[variant] = _export(ctx, model, f"transfer_{variant}_fp32")
        rows[variant] = {"source": source_top1, "before": before, "after": _accuracy(model, target)}
    # Calibration and test data come from the target task (digits 5-9, relabelled 0-4).
    _write_data(ctx, paths["unfrozen"], target.data)
    candidates = [paths["frozen"]]
    for variant, fp32 in paths.items():
        int8 = _int8(ctx, fp32)
        rows[variant]["compressed"] = evaluate(
            fp32, int8, ctx.paths.test, labels_key=LABELS_KEY
        ).accuracy["candidate"]["top1"]
        candidates.append(int8)
    return RecipeOutput(paths["unfrozen"], candidates, _transfer_table(rows), {"transfer": rows})


def _transfer_table(rows: dict[str, dict[str, float]]) -> list[str]:
    header = (
        f"{'fine-tuned':<10} {'source 0-4':>10} {'target before':>13} "
        f"{'target after':>12} {'after int8':>10}"
    )
    lines = [
        f"transfer: digits 0-4 -> 5-9 from {TARGET_LABELS_PER_CLASS} labels per class "
        "(top-1 on held-out digits)",
        header,
        "-" * len(header),
    ]
    for variant, r in rows.items():
        lines.append(
            f"{variant:<10} {100 * r['source']:>9.2f}% {100 * r['before']:>12.2f}% "
            f"{100 * r['after']:>11.2f}% {100 * r['compressed']:>9.2f}%"
        )
    return lines


register_recipe("ptq", "train the digits net, compile it to int8 (post-training)", _ptq)
register_recipe(
    "qat", "post-training vs quantization-aware 4-bit weights, exported as QDQ, compiled", _qat
)
register_recipe("distill", "a half-width student with and without distillation", _distill)
register_recipe(
    "prune-finetune", "channels:0.3 pruning in Torch, fine-tuned, then int8", _prune_finetune
)
register_recipe("transfer", "adapt a 0-4 backbone to digits 5-9 (frozen, unfrozen)", _transfer)


def _write_reports(out: Path, result: dict[str, Any]) -> dict[str, Path]:
    written = {"json": out / "compare.json", "markdown": out / "compare.md"}
    written["html"] = out / "compare.html"
    report.write_json(result, written["json"])
    report.write_markdown(result, written["markdown"])
    report.write_html(result, written["html"])
    return written


def run_recipe(
    name: str,
    out: str | os.PathLike = "demo-out",
    *,
    epochs: int = 10,
    seed: int = 0,
    time_budget: float = 2.0,
    on_step: Callable[[str], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    exporter: str = "dynamo",
) -> RecipeResult:
    """Runs one recipe on the digits task, offline, and compares what it produced.

    The recipe trains (seeded, deterministic on the CPU), exports and compresses; then
    `onnxq.compare.compare` measures its models against the fp32 reference on the held-out
    digits, and the report is written as ``compare.json``, ``.md`` and ``.html`` in ``out``.

    Args:
        name: A key of `RECIPES`.
        out: Output folder (created if missing; earlier files are overwritten).
        epochs: Epochs of the main training run.
        seed: Seed of everything.
        time_budget: Seconds of interleaved timing per batch size in the comparison.
        on_step: Called with a one-line description as each step starts.
        on_progress: Called after every training step.
        exporter: ``dynamo`` or ``torchscript``.

    Returns:
        The recipe's output, the comparison report and the files written.

    Raises:
        InputError: Unknown recipe, bad arguments, ``out`` is not a folder,
            or torch is not installed.
    """
    recipe = RECIPES.get(name)
    if recipe is None:
        raise InputError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}")
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    if time_budget < 0:
        raise InputError(f"time budget must be >= 0, got {time_budget}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path}: exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda message: logger.info("%s", message))
    start = time.perf_counter()
    ctx = RecipeContext(path, epochs, seed, step, on_progress, exporter)
    output = recipe.run(ctx)
    step(f"comparing {len(output.candidates)} model(s) with {output.reference.name}")
    result = compare(
        output.reference,
        output.candidates,
        ctx.paths.test,
        labels_key=LABELS_KEY,
        max_time=time_budget,
        batch_sizes=COMPARE_BATCH_SIZES,
    )
    result["recipe"] = {"name": name, "epochs": epochs, "seed": seed, **output.details}
    reports = _write_reports(path, result)
    return RecipeResult(name, output, result, reports, time.perf_counter() - start)
