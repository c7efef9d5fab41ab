"""Typed pass results: what a pass found or did travels in its ``PassResult``, not on the pass.

Follows onnxscript's ``FoldConstantsResult``: a dataclass subclass of
``onnx_ir.passes.PassResult``. ``details`` holds the JSON-ready summary every pass may give
(shown in the per-pass records of the compile report); passes with data a later step
needs (calibration ranges, QDQ coverage) subclass it with typed fields.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

if TYPE_CHECKING:
    from onnxq.calibration.memory import MemoryPlan
    from onnxq.passes.prune import RemovedSlice

__all__ = [
    "CalibrationResult",
    "ChannelPruneResult",
    "DetailedPassResult",
    "FoldBatchNormResult",
    "QDQResult",
    "details_of",
]


@dataclasses.dataclass
class DetailedPassResult(ir.passes.PassResult):
    """A ``PassResult`` with a JSON-ready summary of what the pass did.

    Attributes:
        details: Plain, JSON-serialisable facts (counts, names, notes) for the report.
    """

    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FoldBatchNormResult(DetailedPassResult):
    """BatchNormalization folding: ``details`` is the compile report's ``fusion`` section."""


@dataclasses.dataclass
class CalibrationResult(DetailedPassResult):
    """Calibrated ranges, and how calibration fit its memory budget.

    Attributes:
        ranges: The ``(lo, hi)`` applied, by tensor name.
        plan: How calibration fit its memory budget (batch size, passes over the data);
            None for preloaded ranges.
    """

    ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    plan: MemoryPlan | None = None


@dataclasses.dataclass
class QDQResult(DetailedPassResult):
    """QDQ insertion, for the compile report's int8 sections.

    ``details`` holds ``numerics``, ``quantized_nodes``, ``not_quantized`` (node -> why it
    stays fp32), ``quantized_tensors`` and ``coverage`` (op type -> ``{quantized, total}``).

    Attributes:
        scale_groups: Each quantized range (its source tensor's name) -> the int8 nodes
            that use it: the units a precision search keeps fp32.
    """

    scale_groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ChannelPruneResult(DetailedPassResult):
    """Channel pruning.

    Attributes:
        removed: Every sliced parameter, with the indices removed.
    """

    removed: list[RemovedSlice] = dataclasses.field(default_factory=list)


def details_of(result: ir.passes.PassResult) -> dict[str, Any]:
    """The JSON-ready details of any pass result (empty for plain ``PassResult``)."""
    if isinstance(result, DetailedPassResult):
        return dict(result.details)
    return {}
