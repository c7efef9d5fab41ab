"""Typed pass results: what a pass found or did travels in its ``PassResult``, not on the pass.

Follows onnxscript's ``FoldConstantsResult``: a dataclass subclass of
``onnx_ir.passes.PassResult``. ``details`` holds the JSON-ready summary every pass may give
(shown in the per-pass records of the compile report); passes with data a later step
needs (calibration ranges, QDQ coverage) subclass it with typed fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

__all__ = ["DetailedPassResult", "details_of"]


@dataclasses.dataclass
class DetailedPassResult(ir.passes.PassResult):
    """A ``PassResult`` with a JSON-ready summary of what the pass did.

    Attributes:
        details: Plain, JSON-serialisable facts (counts, names, notes) for the report.
    """

    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def details_of(result: ir.passes.PassResult) -> dict[str, Any]:
    """The JSON-ready details of any pass result (empty for plain ``PassResult``)."""
    if isinstance(result, DetailedPassResult):
        return dict(result.details)
    return {}
