"""Typed pass results: what a pass found or did travels in its ``PassResult``, not on the pass.

Follows onnxscript's ``FoldConstantsResult``: a dataclass subclass of
``onnx_ir.passes.PassResult``. ``details`` holds the JSON-ready summary every pass may give
(shown in the per-pass records of the compile report); passes with data a later step
needs (calibration ranges, QDQ coverage) subclass it with typed fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from onnxq.calibration.memory import MemoryPlan
    from onnxq.passes.prune import RemovedSlice

__all__ = [
    "CalibrationResult",
    "ChannelPruneResult",
    "DetailedPassResult",
    "FoldBatchNormResult",
    "KeptOutputs",
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
class KeptOutputs(Mapping[str, np.ndarray]):
    """The model's outputs for the first calibration runs, each run as it was made.

    The fidelity check runs the candidate on the same runs (made again by
    `onnxq.calibration.data.split_batches`) and compares run by run: an output's axis 0
    need not list samples (a Transpose or Concat on axis 0, a CRNN's ``[time, batch,
    classes]``), so runs are never cut or re-sliced.

    As a mapping, an output whose axis 0 does list samples in every run reads as the runs
    joined along axis 0, cut to the first ``limit`` samples.

    Attributes:
        runs: Per run, the outputs by name.
        samples: Per run, how many samples it held.
        limit: The number of samples asked for (the last run may hold more).
    """

    runs: list[dict[str, np.ndarray]]
    samples: list[int]
    limit: int

    def _per_sample(self) -> list[str]:
        runs = list(zip(self.runs, self.samples, strict=True))
        names = self.runs[0] if self.runs else {}
        return [n for n in names if all(r[n].ndim and len(r[n]) == k for r, k in runs)]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._per_sample():
            raise KeyError(name)
        return np.concatenate([run[name] for run in self.runs])[: self.limit]

    def __iter__(self) -> Iterator[str]:
        return iter(self._per_sample())

    def __len__(self) -> int:
        return len(self._per_sample())


@dataclasses.dataclass
class CalibrationResult(DetailedPassResult):
    """Calibrated ranges, and fp32 outputs kept so the int8 check need not run fp32 again.

    Attributes:
        ranges: The ``(lo, hi)`` applied, by tensor name.
        reference: The float outputs of the first kept runs, each run whole (None: none
            kept, or they did not fit the memory cap).
        plan: How calibration fit its memory budget (batch size, passes over the data);
            None for preloaded ranges.
    """

    ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    reference: KeptOutputs | None = None
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
