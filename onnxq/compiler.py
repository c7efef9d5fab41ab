"""Compile orchestration: load, run the pipeline, check the int8 model, publish; the report."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq import io
from onnxq.auto import NO_DATA, choose_modes, model_timer
from onnxq.calibration.collect import CalibrationProgress
from onnxq.calibration.data import CalibrationData, open_calibration_data
from onnxq.calibration.memory import default_budget
from onnxq.calibration.ranges_file import save_ranges
from onnxq.config import CompileConfig
from onnxq.errors import FidelityError, InputError, VerificationError
from onnxq.executor import Executor
from onnxq.fidelity import (
    FidelityCriteria,
    FidelityResult,
    OutputView,
    load_metric,
    measure,
    plan_views,
)
from onnxq.inputs import input_specs, random_inputs
from onnxq.mixed_precision import (
    QDQ_DETAILS_KEY,
    Placement,
    choose_precision,
    criteria_from,
    run_model,
)
from onnxq.numerics import numerics_for
from onnxq.passes.cleanup import MIN_OPSET
from onnxq.passes.dynamic import DynamicQuantResult, QuantizeDynamicPass
from onnxq.passes.layernorm import without_skip_layernorm
from onnxq.passes.prune import measure_sparsity
from onnxq.passes.qdq import HALF_PRECISION, InsertQDQPass
from onnxq.passes.results import CalibrationResult, FoldBatchNormResult, QDQResult
from onnxq.passes.weight_only import WeightOnlyResult
from onnxq.pipeline import NEEDS_DATA, build_pipeline, optimised_fp32
from onnxq.placement import (
    LatencyPlacement,
    Requantizer,
    decide,
    place_for_latency,
    time_against_fp32,
    time_models,
    time_weight_only,
)
from onnxq.recording import PassRecord, count_nodes, run_pipeline
from onnxq.verify import Verifier, check_loads

__all__ = ["CompileReport", "compile_model"]

logger = logging.getLogger(__name__)

_R = TypeVar("_R", bound=ir.passes.PassResult)


@dataclasses.dataclass
class CompileReport:
    """What a compile did: the ``--report`` JSON (``to_dict``) and the summary lines.

    Attributes:
        input: The model compiled.
        output: The model written.
        config: The compile configuration (``CompileConfig.to_dict``).
        nodes_before: Nodes in the input model (subgraphs included).
        nodes_after: Nodes in the compiled model.
        size_before: Input file size in bytes.
        size_after: Output file size in bytes.
        passes: One record per pipeline step, in order.
        fusion: What BatchNormalization folding did (``note``, counts).
        sparsity: Weight sparsity of the fp32 model after pruning.
        pruning: With ``--prune``: each prune pass's details, by pass name.
        calibration: int8 only: method, samples, tensor count and the widest ranges.
        numerics: int8 only: the target's integer types and why.
        quantized_nodes: int8 only: nodes that run in int8.
        not_quantized: int8 only: node -> why it stays fp32.
        coverage: int8 only: op type -> ``{quantized, total}``.
        fidelity: int8 only: the deployed model's checks against fp32 (or why unchecked).
        precision: int8 only: the mixed-precision decision (``int8``, ``mixed`` with its
            fp32 islands, or ``fp32`` with the reason), when fidelity was checked.
        latency: With the latency check: the input, onnxq's optimised fp32 and int8 at
            batch 1, int8's speedup over each (95% intervals) and which model was written.
        placement: With the latency check: what ONNX Runtime fused, the units kept fp32
            because int8 did not pay, the model written and why, and the CPU.
        prune_search: With ``--prune KIND:auto``: the search's result.
        weight_only: With ``--mode weight-only``: bits, block size, the nodes quantized
            and kept fp32 (with why), tied weights, MatMul weight bytes before/after, and
            the latency decision (``latency``, ``emitted``).
        auto: With ``--mode auto``: per unit the mode chosen and why, each mode's
            fidelity and speedup over optimised fp32, and what was written (see
            `onnxq.auto.AutoPlacement.to_dict`).
    """

    input: str
    output: str
    config: dict[str, Any]
    nodes_before: int
    nodes_after: int
    size_before: int
    size_after: int
    passes: list[PassRecord]
    fusion: dict[str, Any]
    sparsity: dict[str, Any]
    pruning: dict[str, dict[str, Any]] | None = None
    calibration: dict[str, Any] | None = None
    numerics: dict[str, Any] | None = None
    quantized_nodes: list[str] | None = None
    not_quantized: dict[str, str] | None = None
    coverage: dict[str, dict[str, int]] | None = None
    fidelity: dict[str, Any] | None = None
    precision: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    prune_search: dict[str, Any] | None = None
    weight_only: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: ``kind`` plus the attributes that apply (None ones left out)."""
        report: dict[str, Any] = {"kind": "compile"}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "passes":
                value = [record.to_dict() for record in value]
            if value is not None:
                report[field.name] = value
        return report


@dataclasses.dataclass
class _Int8Sections:
    """The int8 parts of the report, filled by ``_finish_int8``."""

    calibration: dict[str, Any]
    numerics: dict[str, Any]
    quantized_nodes: list[str]
    not_quantized: dict[str, str]
    coverage: dict[str, dict[str, int]]
    fidelity: dict[str, Any]
    precision: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None


def _say_what_cannot_be_quantized(model: ir.Model, config: CompileConfig) -> None:
    """One warning each for ``--op-types`` that match no node and for float16 models."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    present = {n.op_type for n in nodes}
    # Names that are no ONNX op at all are refused by CompileConfig; these are real op
    # types this model lacks (a shared [tool.onnxq] may list other models' op types).
    absent = [t for t in config.op_types if t not in present]
    if absent:
        logger.warning(
            "--op-types %s: no such node in this model%s",
            ", ".join(absent),
            "; nothing will be quantized" if len(absent) == len(config.op_types) else "",
        )
    values = [
        *model.graph.inputs,
        *model.graph.initializers.values(),
        *(v for n in nodes for v in n.outputs),
    ]
    if any(v.dtype in HALF_PRECISION for v in values):
        logger.warning(
            "the model computes in float16: its float16 nodes are left as they are, whatever "
            "--target (onnxq quantizes float32 computation); compile its float32 export for int8"
        )


def _open_calibration(config: CompileConfig, model: ir.Model) -> CalibrationData | None:
    """Opens and validates the calibration data before any pass runs: once per compile.

    Quantizing needs it (unless ``config.ranges``); pruning uses it when given, also for
    fp32 output, to compensate biases. Every later reader (calibration, the fidelity
    check, the mixed-precision search, the latency steps' sample) uses this one object,
    which keeps the samples in memory once read when they fit `_HELD_SHARE` of the
    memory budget (see `CalibrationData.hold`): larger data stays streamed.
    """
    needed = config.quantize and config.mode == "static" and not config.ranges
    if needed and not config.calibration:
        raise InputError(NEEDS_DATA)
    # Dynamic int8 and weight-only need no data. Given some, dynamic checks fidelity on
    # it, weight-only chooses scales and bits from the activations (and times its first
    # sample), auto also calibrates static int8 from it, static int8 from --ranges checks
    # on it (all validated now).
    if not config.calibration or not (config.quantize or config.prune):
        return None
    data = open_calibration_data(
        config.calibration,
        model,
        batch_size=config.batch_size,
        max_samples=config.max_samples,
        preprocess=config.image_preprocess,
    )
    budget = config.max_memory_bytes
    data.hold((budget if budget is not None else default_budget()) // _HELD_SHARE)
    return data


# Calibration data is held in memory when it takes at most this fraction of the memory
# budget (which calibration's plan then counts as spent); the rest is for the activations.
_HELD_SHARE = 8


def compile_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig | None = None,
    *,
    extra_passes: Sequence[ir.passes.PassBase] = (),
    progress: Callable[[str], None] | None = None,
    calibration_progress: CalibrationProgress | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    executor: Executor | None = None,
) -> CompileReport:
    """Compiles an ONNX file and writes the result; returns the compile report.

    The input file is never modified; the output is written atomically, and only once it
    was checked against fp32 on the calibration data. When all-int8 misses the fidelity
    criteria, the mixed-precision search keeps the fewest layers fp32 that meet them; when
    none does (within ``config.tune_budget``), the optimised fp32 model is written, with
    a warning and the reason in the report.

    Args:
        input_path: The model to compile.
        output_path: Where to write the compiled model (must differ from the input).
        config: Compile configuration (default: int8, which needs calibration data).
        extra_passes: User passes (see `onnxq.pipeline.build_pipeline`).
        progress: Called with one line per mixed-precision trial.
        calibration_progress: Called as calibration goes, with the samples done and the
            total (``None`` when unknown); nothing is drawn by onnxq itself.
        shapes: Input shapes the weight-only and dynamic latency steps time (name -> shape;
            default: the first calibration sample, else batch 1 of the declared shapes).
        executor: Runs independent work in parallel: calibration's shards (see
            `onnxq.calibration.sharded`) and the mixed-precision search's independent
            trials; neither the ranges nor the placement depend on it. Default: this
            process.

    Raises:
        InputError: Bad model, data or settings (nothing is written).
        FidelityError: With ``config.require_int8``, no int8 placement met the
            criteria (nothing is written).
    """
    config = config or CompileConfig()
    io.check_output_path(input_path, output_path)
    io.remove_stale_temps(output_path)  # leftovers of a run that was killed (SIGKILL)
    if config.quantize and config.metric:
        load_metric(config.metric)  # a bad --metric is an error before any work
    model = io.load_model(input_path)
    if config.quantize:
        _say_what_cannot_be_quantized(model, config)
    calibration = _open_calibration(config, model)
    steps = build_pipeline(
        config,
        extra_passes,
        opset=model.opset_imports.get("", MIN_OPSET),
        calibration=calibration,
        progress=calibration_progress,
        executor=executor,
    )
    verifier = None
    if config.verify:
        # Quantized stages are judged on data like the calibration data, when there is some.
        feeds = calibration.take(config.batch_size) if calibration is not None else None
        verifier = Verifier(model, config.tolerance, config.min_sqnr, feeds=feeds)
    nodes_before = count_nodes(model)
    # fp32 stages first: sparsity is measured on their result. Then up to calibration,
    # whose ranges the mixed-precision search re-quantizes from, then QDQ insertion.
    split = next((i for i, s in enumerate(steps) if s.stage == "quantize"), len(steps))
    qdq_at = next((i for i, s in enumerate(steps) if isinstance(s.pass_, InsertQDQPass)), split)
    model, records = run_pipeline(model, steps[:split], verifier=verifier)
    sparsity = measure_sparsity(model)
    weight_only = int8 = auto = None
    if config.quantize and config.mode == "weight-only":
        fp32 = model.clone()  # shares the weights: the baseline weight-only must beat
        model, more = run_pipeline(model, steps[split:], verifier=verifier)
        records += more
        model, weight_only = _finish_weight_only(
            model, fp32, output_path, config, records, shapes, calibration
        )
    elif config.quantize and config.mode == "dynamic":
        optimised_fp32 = model.clone()  # shares the weights; the rewrite adds new ones
        model, more = run_pipeline(model, steps[split:], verifier=verifier)
        records += more
        model, int8 = _finish_dynamic(
            model, optimised_fp32, input_path, output_path, config, records, shapes, calibration
        )
    elif config.quantize and config.mode == "auto":
        if steps[split:]:  # mark and calibrate, given data
            model, more = run_pipeline(model, steps[split:], verifier=verifier)
            records += more
        model, auto = _finish_auto(
            model, input_path, output_path, config, shapes, progress, calibration
        )
    elif config.quantize:
        model, more = run_pipeline(model, steps[split:qdq_at], verifier=verifier)
        records += more
        calibrated = model.clone()  # shares the weights; keeps the ranges (value meta)
        model, more = run_pipeline(model, steps[qdq_at:], verifier=verifier)
        records += more
        model, int8 = _finish_int8(
            model,
            calibrated,
            steps[qdq_at].pass_,
            input_path,
            output_path,
            config,
            records,
            progress,
            executor,
            calibration,
        )
    else:
        # The int8 path runs its model before publishing it; fp32 must at least load.
        check_loads(model, "compiled fp32 model not written")
        io.save_model(model, output_path)
    fold = _result(records, FoldBatchNormResult)
    return CompileReport(
        input=str(input_path),
        output=str(output_path),
        config=config.to_dict(),
        nodes_before=nodes_before,
        nodes_after=count_nodes(model),
        size_before=Path(input_path).stat().st_size,
        size_after=Path(output_path).stat().st_size,
        passes=records,
        fusion=dict(fold.details) if fold is not None else {},
        sparsity=sparsity,
        pruning={r.name: r.details for r in records if r.stage == "prune"}
        if config.prune
        else None,
        **(dataclasses.asdict(int8) if int8 is not None else {}),
        weight_only=weight_only,
        auto=auto,
    )


def _finish_weight_only(
    model: ir.Model,
    fp32: ir.Model,
    output_path: str | os.PathLike,
    config: CompileConfig,
    records: list[PassRecord],
    shapes: Mapping[str, tuple[int, ...]] | None,
    calibration: CalibrationData | None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Times weight-only against optimised fp32 and publishes the faster; the section.

    Raises:
        InputError: The model has no MatMul/Gemm weight (nothing for weight-only to do).
    """
    result = _result(records, WeightOnlyResult)
    assert result is not None  # the weight-only step ran
    section = dict(result.details)
    if not section["weight_bytes"]["before"]:
        raise InputError(
            "--mode weight-only: no MatMul or Gemm in this model has a constant weight "
            "(weight-only quantizes MatMul weights; --mode static quantizes convolutions "
            "and activations)"
        )
    emit, reason = "weight-only", "weight-only not timed (--no-latency-check)"
    if not section["quantized_nodes"]:
        emit, reason = "fp32", "every MatMul weight stays fp32 (see not_quantized)"
        logger.warning("wrote fp32: %s", reason)
    elif config.check_latency:
        with tempfile.TemporaryDirectory(prefix="onnxq-fp32-") as tmp:
            baseline = io.save_model(fp32, Path(tmp) / "fp32.onnx")
            feeds = _latency_feeds(calibration, fp32, shapes)
            latency = time_weight_only(model, baseline, feeds)
        section["latency"] = latency
        emit, reason = latency["emitted"], latency["reason"]
    section.update(emitted=emit, reason=reason)
    if emit == "fp32":
        model = fp32
    with io.temp_beside(Path(output_path), ".staging.onnx") as staging:
        check_loads(model, "compiled model not written")
        io.save_model(model, staging)
        os.replace(staging, output_path)
    return model, section


def _finish_auto(
    model: ir.Model,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig,
    shapes: Mapping[str, tuple[int, ...]] | None,
    progress: Callable[[str], None] | None,
    calibration: CalibrationData | None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Chooses per unit between the modes and fp32 (`onnxq.auto`); publishes; the section.

    ``model`` is the optimised fp32 model, calibrated when data was given.

    Raises:
        InputError: The candidates cannot be timed (no data, no ``--shape``, and an input
            with a dynamic dimension other than the batch).
    """
    try:
        feeds = _latency_feeds(calibration, model, shapes)
        if feeds is None:
            feeds = random_inputs(input_specs(model), batch=1)
    except InputError as e:
        raise InputError(
            f"--mode auto times the candidates on this machine: {e} (or give "
            "--calibration-data, whose first sample is timed)"
        ) from None
    batches: list[dict[str, np.ndarray]] = []
    reference = None
    if calibration is not None and config.verify_samples:
        reference = _reference_model(input_path, model, config)
        batches = calibration.head(config.verify_samples)
    elif config.calibration:
        logger.warning("--mode auto: fidelity against fp32 not checked (--check-samples 0)")
    else:
        logger.warning("--mode auto: %s", NO_DATA)
    placement = choose_modes(
        model,
        config,
        reference=reference,
        batches=batches,
        timer=model_timer(feeds, holding=[m for m in (model, reference) if m is not None]),
        progress=progress,
    )
    written = placement.model if placement.model is not None else model
    with io.temp_beside(Path(output_path), ".staging.onnx") as staging:
        check_loads(written, "compiled model not written")
        io.save_model(written, staging)
        os.replace(staging, output_path)
    section = placement.to_dict()
    if not batches:
        section["fidelity"] = {
            "checked": False,
            "reason": "no calibration data" if not config.calibration else "--check-samples 0",
        }
    else:
        fidelity = placement.fidelity
        section["fidelity"] = fidelity.to_dict() if fidelity is not None else None
    return written, section


def _latency_feeds(
    calibration: CalibrationData | None,
    model: ir.Model,
    shapes: Mapping[str, tuple[int, ...]] | None,
) -> Mapping[str, np.ndarray] | None:
    """The input latency is timed on: ``shapes``, else the first sample (else None)."""
    if shapes:
        return random_inputs(input_specs(model), batch=1, overrides=shapes)
    return _first_sample(calibration)


def _finish_int8(
    model: ir.Model,
    calibrated_fp32: ir.Model,
    qdq: InsertQDQPass,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig,
    records: list[PassRecord],
    progress: Callable[[str], None] | None,
    executor: Executor | None = None,
    calibration: CalibrationData | None = None,
) -> tuple[ir.Model, _Int8Sections]:
    """Saves ranges, decides precision, then latency, against fp32; publishes the model.

    ``calibrated_fp32`` is the fp32 model the int8 one was quantized from (after pruning
    and user passes): the reference it is checked against. The latency baseline, and what
    is written when no int8 placement meets the criteria or is faster, is that model as
    ``--no-quantize`` writes it (`onnxq.pipeline.optimised_fp32`: on ONNX Runtime's CPU
    provider residual Adds before LayerNormalization as Sum, as in the int8 candidates'
    fp32 units). Returns the model written and the report sections.
    """
    calibrated = _result(records, CalibrationResult)
    quantized = _result(records, QDQResult)
    assert calibrated is not None and quantized is not None  # the int8 steps ran
    if config.save_ranges:
        save_ranges(
            config.save_ranges,
            calibrated.ranges,
            {"input": str(input_path), **calibrated.details},
        )
    details = quantized.details
    reference = _reference_model(input_path, calibrated_fp32, config)
    fp32 = optimised_fp32(calibrated_fp32, config)
    placement, fidelity, batches = _place(
        calibrated_fp32,
        reference,
        quantized,
        config,
        progress,
        executor,
        calibration,
    )
    if placement is not None and placement.model is None:  # fp32 fallback
        if config.require_int8:
            raise FidelityError(
                f"int8 is below the floor of the fidelity criteria: {placement.reason}"
            )
        logger.warning("wrote fp32, not int8: %s", placement.reason)
        model, details = fp32, {"numerics": details.get("numerics")}
    elif placement is not None:
        model, details = placement.model, placement.model.meta[QDQ_DETAILS_KEY]
    elif config.runs_on_cpu:  # unchecked: the pipeline's all-int8 model, as the search has it
        model = without_skip_layernorm(model)
    placed = None
    # Latency runs on the accuracy decision's result: it only keeps more units fp32.
    if config.check_latency and details.get("quantized_nodes"):
        keep = placement.keep_fp32 if placement is not None else {}
        accept = None
        # Each placement the accept check measured, with its result: the fidelity section
        # of the model written when the latency step reverts units (not measured again).
        checked: list[tuple[ir.Model, FidelityResult]] = []
        if batches:
            views = plan_views(calibrated_fp32)
            expected: list[list[dict[str, np.ndarray]]] = []

            def accept(candidate: ir.Model) -> bool:
                if not expected:
                    # Run when a unit is first reverted, not before: on a model of GBs the
                    # reference's session alone holds twice its weights while created.
                    expected.append(run_model(reference, batches, config.provider))
                outputs = run_model(candidate, batches, config.provider)
                result = measure(expected[0], outputs, views, criteria_from(config))
                checked.append((candidate, result))
                return result.passed

        placed = _place_for_latency(
            model,
            calibrated_fp32,
            fp32,
            qdq,
            keep,
            input_path,
            config,
            _first_sample(calibration),
            accept,
            holding=(reference,),
        )
        if placed.model is None:  # int8 is not faster: the optimised fp32 model ships
            # The fidelity section stays: what int8 would have kept (the report says so).
            model, details = fp32, {"numerics": details.get("numerics")}
        elif placed.reverted:
            model, details = placed.model, placed.quantize_summary or details
            if batches:
                fidelity = _after_reversion(model, checked, fidelity)
    if fidelity.get("checked", True):
        fidelity["reference"] = "pruned fp32" if config.prune else "fp32"
        if config.prune and batches:
            # Pruning changes the outputs by design: the check is against the pruned fp32
            # model, and the user also sees how far the written model is from the input.
            fidelity["vs_input_min_sqnr_db"] = _min_sqnr_vs_input(
                input_path, model, batches, config
            )
    output_path = Path(output_path)
    # Written beside the output, checked, then renamed: a failed check leaves nothing.
    with io.temp_beside(output_path, ".staging.onnx") as staging:
        check_loads(model, "compiled model not written")
        io.save_model(model, staging)
        sections = _Int8Sections(
            calibration={
                **calibrated.details,
                # Budget, batch size and passes over the data (None for preloaded ranges).
                "memory": calibrated.plan.to_dict() if calibrated.plan else None,
                "ranges": _ranges_summary(calibrated.ranges),
            },
            numerics=details.get("numerics"),
            quantized_nodes=details.get("quantized_nodes", []),
            not_quantized=details.get("not_quantized", {}),
            coverage=details.get("coverage", {}),
            fidelity=fidelity,
            precision=placement.to_dict() if placement is not None else None,
        )
        if placed is not None:
            sections.latency, sections.placement = placed.latency, placed.to_dict()
        os.replace(staging, output_path)
    return model, sections


def _finish_dynamic(
    model: ir.Model,
    fp32: ir.Model,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig,
    records: list[PassRecord],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    calibration: CalibrationData | None = None,
) -> tuple[ir.Model, _Int8Sections]:
    """Checks dynamic int8 against fp32 (given data), times it, publishes int8 or fp32.

    ``fp32`` is the optimised fp32 model it was quantized from: the latency baseline and
    what is written when int8 misses the fidelity criteria or is not faster (there is no
    mixed-precision search for dynamic int8 yet: it is all or nothing).
    """
    quantized = _result(records, DynamicQuantResult)
    assert quantized is not None  # the dynamic step ran
    details = quantized.details
    conv = None
    if config.check_latency and details["coverage"].get("Conv", {}).get("total"):
        model, details, conv = _decide_conv(model, fp32, config, shapes, details, calibration)
    fidelity: dict[str, Any]
    precision = fallback = None
    if not details["quantized_nodes"]:
        fallback = "no MatMul, Gemm or LSTM with constant weights to quantize dynamically"
    if calibration is not None and config.verify_samples:
        reference = _reference_model(input_path, fp32, config)
        batches = calibration.head(config.verify_samples)
        result = measure(
            run_model(reference, batches, config.provider),
            run_model(model, batches, config.provider),
            plan_views(fp32),
            criteria_from(config),
        )
        fidelity = {**result.to_dict(), "samples": len(batches), "floor_db": config.min_sqnr}
        if not result.passed:
            failed = _failures(result)
            reason = f"dynamic int8 misses the fidelity criteria ({failed})"
            if config.require_int8:
                raise FidelityError(f"int8 is below the floor of the fidelity criteria: {reason}")
            precision, fallback = {"status": "fp32", "reason": reason}, fallback or reason
        else:
            precision = {"status": "int8"}
    else:
        why = "no calibration data" if not config.calibration else "--check-samples 0"
        logger.warning("dynamic int8 fidelity against fp32 was not checked (%s)", why)
        fidelity = {"checked": False, "reason": why}
    latency = placement = None
    if config.check_latency and details["quantized_nodes"]:
        try:
            with tempfile.TemporaryDirectory(prefix="onnxq-fp32-") as tmp:
                decision, latency = time_against_fp32(
                    model,
                    fp32=io.save_model(fp32, Path(tmp) / "fp32.onnx"),
                    original=input_path,
                    feeds=_latency_feeds(calibration, fp32, shapes),
                    fallback=fallback,
                    holding=(fp32,),
                )
        except InputError as e:
            # Random inputs need every dimension but the batch (a token model's sequence).
            why = f"not timed ({e}); give --calibration-data (one sample) or --shape to time it"
            logger.warning("dynamic int8 latency against fp32: %s", why)
            placement = {"emitted": "fp32" if fallback else "int8", "reason": why, "reverted": {}}
        else:
            fallback = fallback or (decision.reason if decision.choice == "fp32" else None)
            placement = {"emitted": decision.choice, "reason": decision.reason, "reverted": {}}
    if conv is not None:
        placement = {**(placement or {"emitted": "int8", "reason": "not timed", "reverted": {}})}
        placement["conv"] = conv
    if fallback is not None:
        logger.warning("wrote fp32, not dynamic int8: %s", fallback)
        model = fp32
    with io.temp_beside(Path(output_path), ".staging.onnx") as staging:
        check_loads(model, "compiled model not written")
        io.save_model(model, staging)
        os.replace(staging, output_path)
    sections = _Int8Sections(
        calibration={"mode": "dynamic", "note": "activation ranges computed at run time"},
        numerics=details["numerics"],
        quantized_nodes=details["quantized_nodes"] if fallback is None else [],
        not_quantized=details["not_quantized"],
        coverage=details["coverage"],
        fidelity=fidelity,
        precision=precision,
        latency=latency,
        placement=placement,
    )
    return model, sections


def _decide_conv(
    model: ir.Model,
    fp32: ir.Model,
    config: CompileConfig,
    shapes: Mapping[str, tuple[int, ...]] | None,
    details: dict[str, Any],
    calibration: CalibrationData | None,
) -> tuple[ir.Model, dict[str, Any], dict[str, Any]]:
    """Times dynamic int8 Conv (ConvInteger) against fp32 Conv here; keeps what pays.

    ONNX Runtime's ConvInteger is usually slower than fp32 Conv (no fused kernel), so
    dynamic mode keeps Conv fp32 unless the dynamic model with ConvInteger is faster than
    the one without on this machine, by `onnxq.placement.decide`'s rule. Returns the model,
    its pass details and the measurement (the report's ``placement.conv``).
    """
    asked = fp32.clone()
    result = QuantizeDynamicPass(
        numerics_for(config.target), exclude=config.exclude, op_types=config.op_types, conv=True
    )(asked)
    for step in (common_passes.RemoveUnusedNodesPass(), common_passes.NameFixPass()):
        step(asked)
    convs = [n for n in result.details["quantized_nodes"] if n not in details["quantized_nodes"]]
    if not convs:
        return model, details, {"decision": "fp32", "reason": "no Conv can be quantized"}
    try:
        feeds = _latency_feeds(calibration, fp32, shapes)
        with tempfile.TemporaryDirectory(prefix="onnxq-conv-") as tmp:
            paths = {"conv fp32": Path(tmp) / "a.onnx", "conv int8": Path(tmp) / "b.onnx"}
            io.save_model(model, paths["conv fp32"])
            io.save_model(asked, paths["conv int8"])
            # As the latency step times: weight maps closed first (the pair is all there is).
            timed = time_models(paths, "conv fp32", feeds, holding=(model, asked, fp32))
            times = timed.paired("conv fp32", "conv int8")
    except InputError as e:
        measured = {"decision": "fp32", "reason": f"ConvInteger not timed ({e})"}
        return model, details, measured
    decision = decide(times["conv fp32"], {"ConvInteger": times["conv int8"]})
    lo, hi = decision.intervals["ConvInteger"]
    ratio = decision.speedups["ConvInteger"]
    said = f"ConvInteger measured {ratio:.2f}x fp32 Conv on this CPU (95% CI [{lo:.2f}, {hi:.2f}])"
    measured = {"convs": len(convs), "speedup": ratio, "speedup_ci95": [lo, hi]}
    if decision.choice == "ConvInteger":
        logger.info("dynamic int8 Conv: %s", said)
        return asked, dict(result.details), {"decision": "int8", "reason": said, **measured}
    reason = f"{said}: Conv stays fp32"
    not_quantized = {**details["not_quantized"], **dict.fromkeys(convs, reason)}
    return (
        model,
        {**details, "not_quantized": not_quantized},
        {
            "decision": "fp32",
            "reason": reason,
            **measured,
        },
    )


def _reference_model(
    input_path: str | os.PathLike, calibrated_fp32: ir.Model, config: CompileConfig
) -> ir.Model:
    """The model whose outputs count as right: the input as the user gave it.

    Pruning changes the outputs by design, so with ``--prune`` it is the pruned fp32
    model; so it is when cleanup renamed an output (nothing to compare by name).
    """
    if config.prune:
        return calibrated_fp32
    given = io.load_model(input_path, announce=False)  # its repairs were logged once
    if [v.name for v in given.graph.outputs] != [v.name for v in calibrated_fp32.graph.outputs]:
        logger.warning("output names changed in cleanup: checking against the cleaned fp32")
        return calibrated_fp32
    return given


def _min_sqnr_vs_input(
    input_path: str | os.PathLike,
    model: ir.Model,
    batches: Sequence[Mapping[str, np.ndarray]],
    config: CompileConfig,
) -> float:
    """The worst whole-output SQNR of ``model`` against the model as given, same samples."""
    given = io.load_model(input_path, announce=False)  # its repairs were logged once
    views = [OutputView(v.name or "") for v in given.graph.outputs]
    runs = run_model(given, batches, config.provider)
    return measure(
        runs, run_model(model, batches, config.provider), views, FidelityCriteria()
    ).min_sqnr_db


def _place(
    calibrated_fp32: ir.Model,
    reference: ir.Model,
    quantized: QDQResult,
    config: CompileConfig,
    progress: Callable[[str], None] | None,
    executor: Executor | None = None,
    calibration: CalibrationData | None = None,
) -> tuple[Placement | None, dict[str, Any], list[dict[str, np.ndarray]]]:
    """The precision decision on the first calibration samples: placement, fidelity, samples.

    Candidates are quantized from ``calibrated_fp32`` and compared with ``reference`` on
    the data's first ``config.verify_samples`` samples, one per run: criteria that judge
    each input on its own (per-input IoU, a regression output's spread between inputs)
    need runs that are inputs.

    Without data to check on (``--ranges`` alone, ``--check-samples 0``) the all-int8
    model is kept unchecked, and the section says why.
    """
    if calibration is None or not config.verify_samples:
        why = "no calibration data" if calibration is None else "--check-samples 0"
        logger.warning("int8 fidelity against fp32 was not checked (%s)", why)
        return None, {"checked": False, "reason": why}, []
    # Calibration judged this data already, unless ranges were loaded instead.
    batches = calibration.head(config.verify_samples, judge=bool(config.ranges))
    placement = choose_precision(
        calibrated_fp32,
        config,
        batches,
        progress,
        int8=quantized,
        fp32=reference,
        executor=executor,
    )
    assert placement.fidelity is not None  # the all-int8 trial always runs
    fidelity = {
        **placement.fidelity.to_dict(),
        "samples": len(batches),
        "floor_db": config.min_sqnr,
    }
    return placement, fidelity, batches


def _place_for_latency(
    model: ir.Model,
    calibrated_fp32: ir.Model,
    baseline: ir.Model,
    qdq: InsertQDQPass,
    keep_fp32: Mapping[str, str],
    input_path: str | os.PathLike,
    config: CompileConfig,
    feeds: Mapping[str, np.ndarray] | None,
    accept: Callable[[ir.Model], bool] | None = None,
    holding: Sequence[ir.Model] = (),
) -> LatencyPlacement:
    """Reverts int8 units ONNX Runtime does not fuse; times int8 against optimised fp32.

    Units are requantized from ``calibrated_fp32``; ``baseline`` is the optimised fp32
    model timed against, on ``feeds`` (the first sample; None: random inputs). ``accept``
    checks a placement with reverted units against the fidelity criteria; ``holding``:
    other models the compile holds, whose weight maps are closed before timing.
    """
    quantize = Requantizer(
        calibrated_fp32,
        qdq.numerics,
        exclude=qdq.exclude,
        op_types=qdq.op_types,
        prevent_skip_layernorm=config.runs_on_cpu,
    )
    with tempfile.TemporaryDirectory(prefix="onnxq-fp32-") as tmp:
        fp32 = io.save_model(baseline, Path(tmp) / "fp32.onnx")
        return place_for_latency(
            model,
            quantize,
            fp32=fp32,
            original=input_path,
            keep_fp32=keep_fp32,
            feeds=feeds,
            accept=accept,
            holding=holding,
        )


def _first_sample(calibration: CalibrationData | None) -> Mapping[str, np.ndarray] | None:
    """The first calibration sample (batch 1): what latency is timed on; None without data."""
    if calibration is None:
        return None
    return calibration.head(1)[0]


def _after_reversion(
    model: ir.Model,
    checked: Sequence[tuple[ir.Model, FidelityResult]],
    before: dict[str, Any],
) -> dict[str, Any]:
    """The fidelity section for the model the latency step changed (same samples, criteria).

    The latency step keeps only reversions its ``accept`` check passed, and that check
    measured this very model (``checked``: each model it measured, with its result) on
    the check samples against the reference: its result describes the model written.
    """
    result = next((r for m, r in checked if m is model), None)
    if result is None or not result.passed:
        # place_for_latency returns the placement accept passed, or none reverted.
        why = "was not checked" if result is None else f"misses them: {_failures(result)}"
        raise VerificationError(
            f"int8 after the latency step's fp32 reversions {why} (fidelity criteria; "
            "without the latency check the placement stays as checked)"
        )
    keep = {k: v for k, v in before.items() if k not in result.to_dict()}
    return {**keep, **result.to_dict()}


def _failures(result: FidelityResult) -> str:
    """The failed checks, in one line."""
    return "; ".join(f"{c.view} {c.kind} {c.value} < {c.floor}" for c in result.failures)


def _result(records: list[PassRecord], kind: type[_R]) -> _R | None:
    """The result of the step that produced a ``kind`` result (typed, not found by name)."""
    return next((r.result for r in records if isinstance(r.result, kind)), None)


def _ranges_summary(ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Counts and the widest ranges: the tensors most likely to lose precision."""
    widest = sorted(ranges.items(), key=lambda item: item[1][0] - item[1][1])[:5]
    return {
        "tensors": len(ranges),
        "widest": {name: [lo, hi] for name, (lo, hi) in widest},
    }
