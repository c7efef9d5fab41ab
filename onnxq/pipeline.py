"""The compile pipeline: ordered onnx_ir passes, per-pass records, verification, compile_model().

The data path reads straight through::

    load -> cleanup -> fuse -> (prune) -> (user passes) -> calibrate -> insert QDQ -> save

Passes are ordinary ``onnx_ir.passes`` passes run by ``onnx_ir.passes.PassManager``; each
is wrapped in a ``RecordedPass`` that times it, counts nodes and, with ``verify``, checks
the model after it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq import io
from onnxq.calibration.data import CalibrationData, open_calibration_data
from onnxq.calibration.ranges_file import load_ranges, save_ranges
from onnxq.config import CompileConfig
from onnxq.errors import CompileError, InputError, VerificationError
from onnxq.numerics import numerics_for
from onnxq.passes.cleanup import MIN_OPSET
from onnxq.passes.prune import measure_sparsity
from onnxq.verify import Verifier, check_fidelity, check_latency, check_loads

__all__ = [
    "PassRecord",
    "RecordedPass",
    "Step",
    "available_passes",
    "build_pipeline",
    "compile_model",
    "load_pass",
    "register_pass",
    "run_pipeline",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of the pipeline, with the stage it belongs to and why it runs there.

    Attributes:
        stage: Pipeline stage (``cleanup``, ``fuse``, ``prune``, ``user``, ``quantize``).
        pass_: The ``onnx_ir`` pass.
        why: One line saying why the pass runs at this point.
        exact: Whether the pass preserves fp32 outputs (verification compares it exactly).
    """

    stage: str
    pass_: ir.passes.PassBase
    why: str
    exact: bool = True

    @property
    def name(self) -> str:
        """The pass's class name."""
        return type(self.pass_).__name__


@dataclasses.dataclass
class PassRecord:
    """What one pass did: the per-pass line of the compile report."""

    stage: str
    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_abs_diff: float | None = None


def count_nodes(model: ir.Model) -> int:
    """Counts nodes in the graph and all its subgraphs."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


class RecordedPass(ir.passes.PassBase):
    """Runs one pipeline step, timing it, counting nodes and optionally verifying it."""

    def __init__(self, step: Step, records: list[PassRecord], verifier: Verifier | None):
        self.step = step
        self.records = records
        self.verifier = verifier

    @property
    def in_place(self) -> bool:
        return self.step.pass_.in_place

    @property
    def changes_input(self) -> bool:
        return self.step.pass_.changes_input

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = count_nodes(model)
        start = time.perf_counter()
        result = self.step.pass_(model)
        seconds = time.perf_counter() - start
        record = PassRecord(
            stage=self.step.stage,
            name=self.step.name,
            modified=result.modified,
            seconds=round(seconds, 4),
            nodes_before=before,
            nodes_after=count_nodes(result.model),
            details=dict(getattr(self.step.pass_, "summary", {}) or {}),
        )
        if self.verifier is not None:
            record.max_abs_diff = self.verifier.check(self.step, result.model)
        self.records.append(record)
        logger.info(
            "%-36s modified=%-5s %7.3fs nodes %d -> %d",
            record.name,
            record.modified,
            seconds,
            before,
            record.nodes_after,
        )
        return result

    def __repr__(self) -> str:
        return f"RecordedPass({self.step.pass_!r})"


# ---------------------------------------------------------------------------- registry

_USER_PASSES: dict[str, type[ir.passes.PassBase]] = {}


def register_pass(cls: type[ir.passes.PassBase]) -> type[ir.passes.PassBase]:
    """Registers a user pass class so ``onnxq passes`` lists it (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
        raise TypeError(f"{cls!r} is not an onnx_ir.passes.PassBase subclass")
    _USER_PASSES[cls.__name__] = cls
    return cls


def available_passes() -> dict[str, tuple[str, str]]:
    """Returns ``{pass name: (stage, one-line description)}`` for every pass onnxq can run."""
    found: dict[str, tuple[str, str]] = {}
    for stage, cls in _listed_passes():
        found.setdefault(cls.__name__, (stage, _first_line(cls)))
    for name, cls in _USER_PASSES.items():
        found.setdefault(name, ("user", _first_line(cls)))
    return found


def _first_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def load_pass(spec: str) -> ir.passes.PassBase:
    """Instantiates a user pass from ``package.module:ClassOrFactory``.

    Raises:
        InputError: The spec cannot be imported or does not produce an onnx_ir pass.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad pass spec '{spec}': expected package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import '{module_name}' for pass '{spec}': {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"'{attr}' not found in module '{module_name}' (or not callable)")
    pass_ = factory()
    if not isinstance(pass_, ir.passes.PassBase):
        raise InputError(f"'{spec}' did not produce an onnx_ir.passes.PassBase instance")
    return pass_


# ---------------------------------------------------------------------------- building


def _cleanup_steps(opset: int) -> list[Step]:
    from onnxq.passes.cleanup import cleanup_passes

    why = "cleanup: weights as initializers, constants folded, no-ops and dead code removed"
    return [Step("cleanup", p, why) for p in cleanup_passes(opset)]


def _fuse_steps() -> list[Step]:
    from onnxq.passes.cleanup import dedup_passes
    from onnxq.passes.fuse import FoldBatchNormPass, PoolingToGlobalPass

    return [
        Step("fuse", FoldBatchNormPass(), "fold BN into Conv/Gemm weights: exact and free"),
        # Unused BN parameters must not be saved.
        Step("fuse", common_passes.RemoveUnusedNodesPass(), "drop the folded BN's weights"),
        *(
            Step("fuse", p, "merge equal weights, once BN folding no longer needs them apart")
            for p in dedup_passes()
        ),
        Step("fuse", PoolingToGlobalPass(), "spatial mean as GlobalAveragePool: has int8"),
    ]


def _prune_steps(config: CompileConfig, calibration: CalibrationData | None) -> list[Step]:
    from onnxq.prune_spec import PruneSpec

    if not config.prune:
        return []
    spec = PruneSpec.parse(config.prune, exclude=config.prune_exclude)
    if spec.compensate and calibration is None:
        raise InputError(f"--prune {config.prune}: compensate needs --calibration-data")
    # After BN folding: a folded channel's norm carries BN's scale (BN-aware importance),
    # and before quantization, so calibration sees the pruned model.
    why = f"--prune {config.prune}: after BN folding, before calibration"
    passes = spec.passes(calibration, provider=config.provider)
    return [Step("prune", p, why, exact=False) for p in passes]


def _quantize_steps(config: CompileConfig, calibration: CalibrationData | None) -> list[Step]:
    from onnxq.passes.calibrate import CalibrateRangesPass
    from onnxq.passes.fuse import MarkFusedUnitsPass
    from onnxq.passes.qdq import InsertQDQPass

    if config.ranges:
        ranges, _ = load_ranges(config.ranges)
        calibrate = CalibrateRangesPass(ranges=ranges)
    else:
        calibrate = CalibrateRangesPass(
            calibration,
            method=config.calibration_method,
            params={"percentile": config.percentile}
            if config.calibration_method == "percentile"
            else None,
            provider=config.provider,
            # The fidelity check reuses these instead of running fp32 again.
            keep_outputs=config.verify_samples,
        )
    qdq = InsertQDQPass(
        numerics_for(config.target), exclude=config.exclude, op_types=config.op_types
    )
    return [
        # Marked here, on the final fp32 graph, so pruning and user passes cannot leave
        # stale marks behind.
        Step("quantize", MarkFusedUnitsPass(), "mark conv+relu units: no Q/DQ inside a unit"),
        Step("quantize", calibrate, "ranges from fp32 activations, streamed", exact=True),
        Step("quantize", qdq, "int8 QDQ where ONNX Runtime fuses int8 kernels", exact=False),
        # The fp32 weights replaced by int8 ones must not be saved.
        Step(
            "quantize",
            common_passes.RemoveUnusedNodesPass(),
            "drop replaced fp32 weights",
            exact=False,
        ),
        Step("quantize", common_passes.TopologicalSortPass(), "keep nodes in order", exact=False),
        # A weight shared by two nodes gets one DequantizeLinear per use: names must differ.
        Step("quantize", common_passes.NameFixPass(), "unique node and value names", exact=False),
    ]


def _listed_passes() -> list[tuple[str, type[ir.passes.PassBase]]]:
    """Every pass onnxq can run, with its stage, for ``onnxq passes``."""
    from onnxq.passes.calibrate import CalibrateRangesPass
    from onnxq.passes.fuse import MarkFusedUnitsPass
    from onnxq.passes.prune import ApplyMasksPass, PruneChannelsPass, PruneWeightsPass
    from onnxq.passes.qdq import InsertQDQPass

    fixed = [(s.stage, type(s.pass_)) for s in _cleanup_steps(0) + _fuse_steps()]
    prune = [("prune", c) for c in (PruneWeightsPass, PruneChannelsPass, ApplyMasksPass)]
    quantize = [("quantize", c) for c in (MarkFusedUnitsPass, CalibrateRangesPass, InsertQDQPass)]
    return fixed + prune + quantize


def build_pipeline(
    config: CompileConfig,
    extra_passes: Sequence[ir.passes.PassBase] = (),
    *,
    opset: int = MIN_OPSET,
    calibration: CalibrationData | None = None,
) -> list[Step]:
    """Returns the ordered steps that compile a model under ``config``.

    Args:
        config: The compile configuration.
        extra_passes: User passes, run after fusion and before quantization, so they see
            a clean fp32 graph and their result is calibrated and quantized.
        opset: The model's default-domain opset (older models are upgraded first).
        calibration: Calibration data, required to quantize unless ``config.ranges``;
            channel pruning uses it (when given) to compensate biases.
    """
    steps = _cleanup_steps(opset) + _fuse_steps() + _prune_steps(config, calibration)
    # User passes run on fp32 and must keep its outputs (checked with --verify's tolerance)
    # unless the pass class says ``exact = False`` (then only the SQNR floor applies).
    steps += [
        Step("user", p, "user pass", exact=bool(getattr(p, "exact", True))) for p in extra_passes
    ]
    if config.quantize:
        steps += _quantize_steps(config, calibration)
    return steps


def run_pipeline(
    model: ir.Model, steps: Sequence[Step], *, verifier: Verifier | None = None
) -> tuple[ir.Model, list[PassRecord]]:
    """Runs ``steps`` on ``model`` (in place) with onnx_ir's PassManager.

    Raises:
        VerificationError: With a verifier, the first pass that breaks the model.
        CompileError: A pass failed; the message names it.
    """
    records: list[PassRecord] = []
    manager = ir.passes.PassManager([RecordedPass(s, records, verifier) for s in steps])
    try:
        result = manager(model)
    except ir.passes.PassError as e:
        cause = _root_cause(e)
        if isinstance(cause, (InputError, CompileError, VerificationError)):
            raise cause from e
        failed = steps[len(records)].name if len(records) < len(steps) else "?"
        raise CompileError(f"pass {failed} failed: {type(cause).__name__}: {cause}") from e
    return result.model, records


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, ir.passes.PassError) and error.__cause__ is not None:
        error = error.__cause__
    return error


_NEEDS_DATA = (
    "static int8 needs calibration data: pass --calibration-data with a .npz keyed by the "
    "model's input names (axis 0 = samples), a folder of .npy/.npz files or images, or "
    "pkg.module:fn; or --ranges from an earlier --save-ranges; or --no-quantize for fp32"
)


def _open_calibration(config: CompileConfig, model: ir.Model) -> CalibrationData | None:
    """Opens and validates the calibration data before any pass runs.

    Quantizing needs it (unless ``config.ranges``); pruning uses it when given, also for
    fp32 output, to compensate biases.
    """
    needed = config.quantize and not config.ranges
    if needed and not config.calibration:
        raise InputError(_NEEDS_DATA)
    if not config.calibration or not (needed or config.prune):
        return None
    return open_calibration_data(
        config.calibration, model, batch_size=config.batch_size, max_samples=config.max_samples
    )


def compile_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig | None = None,
    *,
    extra_passes: Sequence[ir.passes.PassBase] = (),
) -> dict[str, Any]:
    """Compiles an ONNX file and writes the result; returns the compile report.

    The input file is never modified; the output is written atomically, and only once
    the int8 model passed its fidelity check against fp32 (``config.min_sqnr``).

    Args:
        input_path: The model to compile.
        output_path: Where to write the compiled model (must differ from the input).
        config: Compile configuration (default: int8, which needs calibration data).
        extra_passes: User passes (see ``build_pipeline``).

    Raises:
        InputError: Bad model, data or settings (nothing is written).
        VerificationError: The int8 model is not close enough to fp32 (nothing is written).
    """
    config = config or CompileConfig()
    io.check_output_path(input_path, output_path)
    model = io.load_model(input_path)
    calibration = _open_calibration(config, model)
    steps = build_pipeline(
        config, extra_passes, opset=model.opset_imports.get("", MIN_OPSET), calibration=calibration
    )
    verifier = Verifier(model, config.tolerance, config.min_sqnr) if config.verify else None
    nodes_before = count_nodes(model)
    # fp32 stages first: sparsity is measured on their result and, when pruning, the
    # pruned fp32 model is the reference the int8 model is checked against.
    split = next((i for i, s in enumerate(steps) if s.stage == "quantize"), len(steps))
    model, records = run_pipeline(model, steps[:split], verifier=verifier)
    sparsity = measure_sparsity(model)
    reference = Path(input_path)
    if config.prune and config.quantize:
        reference = Path(output_path).with_name(f".{Path(output_path).name}.pruned-fp32.onnx")
        io.save_model(model, reference)
    try:
        if split < len(steps):
            model, more = run_pipeline(model, steps[split:], verifier=verifier)
            records += more
        report: dict[str, Any] = {
            "kind": "compile",
            "input": str(input_path),
            "output": str(output_path),
            "config": config.to_dict(),
            "nodes_before": nodes_before,
            "nodes_after": count_nodes(model),
            "size_before": Path(input_path).stat().st_size,
            "passes": [dataclasses.asdict(r) for r in records],
            "fusion": _details(records, "FoldBatchNormPass"),
            "sparsity": sparsity,
        }
        if config.prune:
            report["pruning"] = {r.name: r.details for r in records if r.stage == "prune"}
        if config.quantize:
            report.update(
                _finish_int8(model, input_path, output_path, config, steps, records, reference)
            )
        else:
            # The int8 path runs its model before publishing it; fp32 must at least load.
            check_loads(model, "compiled fp32 model not written")
            io.save_model(model, output_path)
    finally:
        if reference != Path(input_path):
            reference.unlink(missing_ok=True)
    report["size_after"] = Path(output_path).stat().st_size
    return report


def _finish_int8(
    model: ir.Model,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig,
    steps: Sequence[Step],
    records: list[PassRecord],
    reference: str | os.PathLike,
) -> dict[str, Any]:
    """Saves ranges, checks the deployed int8 model against fp32, then publishes it.

    ``reference`` is the fp32 model the int8 one is checked against: the input, or the
    pruned fp32 model when pruning (which changes the outputs by design).
    """
    calibrate = next(s.pass_ for s in steps if s.name == "CalibrateRangesPass")
    if config.save_ranges:
        save_ranges(
            config.save_ranges, calibrate.ranges, {"input": str(input_path), **calibrate.summary}
        )
    quantize = _details(records, "InsertQDQPass")
    output_path = Path(output_path)
    # Written beside the output, checked, then renamed: a failed check leaves nothing.
    staging = output_path.with_name(f".{output_path.name}.staging.onnx")
    try:
        io.save_model(model, staging)
        report: dict[str, Any] = {
            "calibration": {**calibrate.summary, "ranges": _ranges_summary(calibrate.ranges)},
            "numerics": quantize.get("numerics"),
            "quantized_nodes": quantize.get("quantized_nodes", []),
            "not_quantized": quantize.get("not_quantized", {}),
            "coverage": quantize.get("coverage", {}),
        }
        if config.calibration and config.verify_samples:
            data = open_calibration_data(
                config.calibration,
                model,
                batch_size=config.batch_size,
                max_samples=config.verify_samples,
            )
            report["fidelity"] = check_fidelity(
                reference,
                staging,
                data,
                min_sqnr=config.min_sqnr,
                provider=config.provider,
                reference_outputs=calibrate.reference,
            )
        else:
            why = "no calibration data" if not config.calibration else "--check-samples 0"
            logger.warning("int8 fidelity against fp32 was not checked (%s)", why)
            report["fidelity"] = {"checked": False, "reason": why}
        if config.check_latency:
            report["latency"] = check_latency(input_path, staging)
        os.replace(staging, output_path)
    finally:
        staging.unlink(missing_ok=True)
    return report


def _ranges_summary(ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Counts and the widest ranges: the tensors most likely to lose precision."""
    widest = sorted(ranges.items(), key=lambda item: item[1][0] - item[1][1])[:5]
    return {
        "tensors": len(ranges),
        "widest": {name: [lo, hi] for name, (lo, hi) in widest},
    }


def _details(records: list[PassRecord], name: str) -> dict[str, Any]:
    """The summary a named pass left in its record."""
    return next((r.details for r in records if r.name == name), {})
