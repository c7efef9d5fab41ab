"""Residual Add before LayerNormalization as Sum, so ONNX Runtime does not fuse a SkipLayerNorm."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxq.passes.results import DetailedPassResult

__all__ = ["PreventSkipLayerNormFusionPass", "SkipLayerNormResult", "without_skip_layernorm"]

logger = logging.getLogger(__name__)

_ONNX = ("", "ai.onnx")


@dataclasses.dataclass
class SkipLayerNormResult(DetailedPassResult):
    """``details``: ``rewritten`` (the Add nodes now Sum) and ``count``."""


def _fusable_add(norm: ir.Node) -> ir.Node | None:
    """The Add ONNX Runtime would fuse with ``norm`` into SkipLayerNormalization, if any.

    ORT's ``SkipLayerNormFusion`` takes an Add of two 3-D inputs of one shape whose only
    consumer is the LayerNormalization (and not a graph output).
    """
    add = norm.inputs[0].producer() if norm.inputs and norm.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or add.domain not in _ONNX:
        return None
    out = add.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None
    a, b = add.inputs
    if a is None or b is None or a.shape is None or b.shape is None:
        return None
    if len(a.shape) != 3 or a.shape != b.shape:
        return None
    return add


class PreventSkipLayerNormFusionPass(ir.passes.InPlacePass):
    """Writes the residual ``Add`` that feeds a ``LayerNormalization`` as a 2-input ``Sum``.

    ONNX Runtime's session optimiser fuses ``Add -> LayerNormalization`` into
    ``com.microsoft.SkipLayerNormalization``, whose CPU kernel (1.32) is a scalar loop:
    measured 6.5-7.6x slower than ``Add`` + ``LayerNormalization`` at [1|8, 128, 256|768],
    1 or 2 threads (1.09 ms vs 0.15 ms at [8, 128, 256]: a third of the zoo encoder's
    dynamic int8 time at batch 8). ``Sum`` of two tensors computes the same sum bit for
    bit, and no ORT fusion matches it. For the CPU provider only: on CUDA the fused kernel
    is the fast one.
    """

    def call(self, model: ir.Model) -> SkipLayerNormResult:
        rewritten: list[str] = []
        for norm in list(model.graph):
            if norm.op_type != "LayerNormalization" or norm.domain not in _ONNX:
                continue
            add = _fusable_add(norm)
            if add is None:
                continue
            name = add.name or "Add"
            total = ir.node("Sum", list(add.inputs), name=name)
            # (the Sum's output takes the Add's name, type and shape)
            ir.convenience.replace_nodes_and_values(
                model.graph, add, [add], [total], [add.outputs[0]], [total.outputs[0]]
            )
            rewritten.append(name)
        if rewritten:
            logger.info("SkipLayerNorm fusion prevented at %d residual Adds", len(rewritten))
        return SkipLayerNormResult(
            model,
            modified=bool(rewritten),
            details={"rewritten": rewritten, "count": len(rewritten)},
        )


def without_skip_layernorm(model: ir.Model) -> ir.Model:
    """``model`` with its fusable residual Adds as Sum: a copy when any, else ``model`` itself.

    The copy shares the weights. In a QDQ model only the Adds left fp32 change: a quantized
    Add feeds a QuantizeLinear, not the LayerNormalization, and stays an int8 unit.
    """
    rewritten = model.clone()
    return rewritten if PreventSkipLayerNormFusionPass()(rewritten).modified else model
