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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq import io, runtime
from onnxq.config import CompileConfig
from onnxq.errors import CompileError, InputError, VerificationError
from onnxq.inputs import input_specs, random_inputs

__all__ = [
    "PassRecord",
    "RecordedPass",
    "Step",
    "Verifier",
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


class Verifier:
    """Checks a model after each pass: ONNX checker, then outputs on ONNX Runtime.

    Exact passes are compared with the previous stage (max abs difference relative to
    each output's magnitude); inexact ones (quantization) with the fp32 reference by SQNR.
    """

    def __init__(self, model: ir.Model, tolerance: float, min_sqnr: float, seed: int = 0):
        self.tolerance = tolerance
        self.min_sqnr = min_sqnr
        try:
            self.feeds = random_inputs(input_specs(model), batch=2, seed=seed)
        except InputError as e:
            raise InputError(f"--verify needs sample inputs: {e}") from None
        self.reference = self._outputs(model, "input model")
        self.previous = self.reference

    def _outputs(self, model: ir.Model, stage: str) -> dict[str, np.ndarray]:
        try:
            session = runtime.create_session(model, optimization="disable")
            return runtime.run(session, self.feeds)
        except Exception as e:  # ORT raises several unrelated exception types
            raise VerificationError(f"{stage}: ONNX Runtime cannot run the model: {e}") from e

    def check(self, step: Step, model: ir.Model) -> float:
        """Verifies ``model`` after ``step`` and returns the largest relative difference.

        Raises:
            VerificationError: The model is invalid or its outputs moved too far.
        """
        label = f"pass {step.name} ({step.stage})"
        try:
            onnx.checker.check_model(ir.serde.serialize_model(model))
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0]
            raise VerificationError(f"{label} produced an invalid model: {first}") from e
        outputs = self._outputs(model, label)
        if step.exact:
            worst = _max_rel_diff(self.previous, outputs)
            if worst > self.tolerance:
                raise VerificationError(
                    f"{label} changed the outputs: max abs difference {worst:.3g} "
                    f"(relative to output magnitude) > tolerance {self.tolerance:g}"
                )
        else:
            worst = _max_rel_diff(self.reference, outputs)
            sqnr = min(_sqnr_db(self.reference[k], outputs[k]) for k in outputs)
            if sqnr < self.min_sqnr:
                raise VerificationError(
                    f"{label}: SQNR against fp32 {sqnr:.1f} dB < floor {self.min_sqnr:g} dB"
                )
        self.previous = outputs
        return worst


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _max_rel_diff(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, expected in ref.items():
        got = out[name]
        if got.shape != expected.shape:
            return float("inf")
        if not np.issubdtype(expected.dtype, np.floating):
            worst = max(worst, float(np.any(got != expected)) * np.inf)
            continue
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        worst = max(worst, float(np.max(np.abs(got - expected), initial=0.0)) / scale)
    return worst


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
    for step in _all_steps():
        found.setdefault(step.name, (step.stage, _first_line(step.pass_)))
    for name, cls in _USER_PASSES.items():
        found.setdefault(name, ("user", _first_line(cls)))
    return found


def _first_line(obj: object) -> str:
    doc = (type(obj).__doc__ if not isinstance(obj, type) else obj.__doc__) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


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


def _cleanup_steps() -> list[Step]:
    from onnxq.passes.cleanup import cleanup_passes

    why = "cleanup: weights as initializers, constants folded, no-ops and dead code removed"
    return [Step("cleanup", p, why) for p in cleanup_passes()]


def _fuse_steps() -> list[Step]:
    from onnxq.passes.fuse import FoldBatchNormPass, MarkFusedUnitsPass

    return [
        Step("fuse", FoldBatchNormPass(), "fold BN into Conv/Gemm weights: exact and free"),
        # Unused BN parameters must not be saved.
        Step("fuse", common_passes.RemoveUnusedNodesPass(), "drop the folded BN's weights"),
        Step("fuse", MarkFusedUnitsPass(), "mark conv+relu units: no Q/DQ inside a unit"),
    ]


def _all_steps() -> list[Step]:
    """Every step onnxq knows, for listing (quantization steps need no data to list)."""
    return _cleanup_steps() + _fuse_steps()


def build_pipeline(
    config: CompileConfig, extra_passes: Sequence[ir.passes.PassBase] = ()
) -> list[Step]:
    """Returns the ordered steps that compile a model under ``config``.

    Args:
        config: The compile configuration.
        extra_passes: User passes, run after fusion and before quantization, so they see
            a clean fp32 graph and their result is calibrated and quantized.
    """
    steps = _cleanup_steps() + _fuse_steps()
    steps += [Step("user", p, "user pass", exact=False) for p in extra_passes]
    if config.quantize:
        raise CompileError(
            "int8 quantization is not available yet; use --no-quantize for fp32 optimisation"
        )
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


def compile_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CompileConfig | None = None,
    *,
    extra_passes: Sequence[ir.passes.PassBase] = (),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compiles an ONNX file and writes the result; returns the compile report.

    The input file is never modified; the output is written atomically.

    Args:
        input_path: The model to compile.
        output_path: Where to write the compiled model (must differ from the input).
        config: Compile configuration (defaults: int8 with calibration data required).
        extra_passes: User passes (see ``build_pipeline``).
        progress: Called with a short message at each stage, for the CLI.
    """
    config = config or CompileConfig()
    io.check_output_path(input_path, output_path)
    model = io.load_model(input_path)
    size_before = Path(input_path).stat().st_size
    steps = build_pipeline(config, extra_passes)
    verifier = Verifier(model, config.tolerance, config.min_sqnr) if config.verify else None
    nodes_before = count_nodes(model)
    model, records = run_pipeline(model, steps, verifier=verifier)
    io.save_model(model, output_path)
    return {
        "input": str(input_path),
        "output": str(output_path),
        "config": config.to_dict(),
        "nodes_before": nodes_before,
        "nodes_after": count_nodes(model),
        "size_before": size_before,
        "size_after": Path(output_path).stat().st_size,
        "passes": [dataclasses.asdict(r) for r in records],
        "fusion": _fusion_summary(records),
    }


def _fusion_summary(records: list[PassRecord]) -> dict[str, Any]:
    for record in records:
        if record.name == "FoldBatchNormPass":
            return record.details
    return {}
