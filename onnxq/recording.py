"""Pipeline recording: steps, per-pass records, and running steps through onnx_ir's PassManager."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxq.errors import CompileError, InputError, VerificationError
from onnxq.passes.results import details_of
from onnxq.verify import Verifier

__all__ = ["PassRecord", "RecordedPass", "Step", "count_nodes", "run_pipeline"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of the pipeline, with the stage it belongs to and why it runs there.

    Attributes:
        stage: Pipeline stage (``cleanup``, ``fuse``, ``prune``, ``user``, ``quantize``).
        pass_: The ``onnx_ir`` pass.
        why: One line saying why the pass runs at this point (shown by ``onnxq passes``
            and in the compile report).
        preserves_outputs: Whether the pass keeps the model's outputs: ``--verify`` then
            compares them with the previous step's within the tolerance; otherwise
            (quantization) with the fp32 reference by SQNR.
        resets_reference: The pass changes the outputs by design (pruning): ``--verify``
            only checks the model is valid and runs, and later steps are compared with
            its outputs.
    """

    stage: str
    pass_: ir.passes.PassBase
    why: str
    preserves_outputs: bool = True
    resets_reference: bool = False

    @property
    def name(self) -> str:
        """The pass's class name."""
        return type(self.pass_).__name__


@dataclasses.dataclass
class PassRecord:
    """What one pass did: the per-pass line of the compile report.

    ``result`` is the pass's ``PassResult`` (typed results carry data later steps need);
    it stays out of ``to_dict``.
    """

    stage: str
    name: str
    why: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_abs_diff: float | None = None
    result: ir.passes.PassResult | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (without the pass result)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "result"
        }


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
            why=self.step.why,
            modified=result.modified,
            seconds=round(seconds, 4),
            nodes_before=before,
            nodes_after=count_nodes(result.model),
            details=details_of(result),
            result=result,
        )
        if self.verifier is not None:
            record.max_abs_diff = self.verifier.check(
                f"pass {self.step.name} ({self.step.stage})",
                result.model,
                preserves_outputs=self.step.preserves_outputs,
                resets_reference=self.step.resets_reference,
            )
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
