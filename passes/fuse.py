"""Conv-BN-ReLU fusion: BatchNormalization folding and fused-unit marking.

BatchNormalization after Conv/ConvTranspose/Gemm is folded into the preceding op's weight
and bias (exact algebra, onnxscript's rules)::

    y = gamma * (W*x + b - mean) / sqrt(var + eps) + beta
      = (s * W) * x + (s * (b - mean) + beta),    s = gamma / sqrt(var + eps)

A following Relu, or a Clip whose lower bound is 0 (ReLU6), is marked as part of the
producer's unit so that QDQ insertion places no Quantize/Dequantize between them: ONNX
Runtime then absorbs the activation into the output QuantizeLinear (its Relu/Clip-Quant
fusion) and runs the whole unit as one int8 kernel. MatMul followed by an Add of a
constant is marked as one linear unit for the same reason.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules import common as rules

from onnxq.passes.results import DetailedPassResult, FoldBatchNormResult
from onnxq.passes.rules.pooling import reduce_mean_to_global_average_pool_rule

__all__ = [
    "ACTIVATION_KEY",
    "UNIT_KEY",
    "FoldBatchNormPass",
    "MarkFusedUnitsPass",
    "PoolingToGlobalPass",
    "fused_activation",
]

logger = logging.getLogger(__name__)

# node.meta keys: the unit a node belongs to (the producer's name), and on the producer
# the activation node absorbed into it.
UNIT_KEY = "onnxq.unit"
ACTIVATION_KEY = "onnxq.activation"

# Producers whose following Relu/ReLU6 ONNX Runtime absorbs into the output Q.
_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


# The ops a BatchNormalization is folded into.
_BN_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def _count_op(model: ir.Model, op_type: str) -> int:
    return _count_op_types(model, {op_type})


def _count_op_types(model: ir.Model, op_types: frozenset[str] | set[str]) -> int:
    return sum(n.op_type in op_types for n in ir.traversal.RecursiveGraphIterator(model.graph))


class FoldBatchNormPass(RewritePass):
    """Folds BatchNormalization into the preceding Conv, ConvTranspose or Gemm."""

    def __init__(self) -> None:
        super().__init__(
            [
                rules.fuse_batchnorm_into_conv_rule,
                rules.fuse_batchnorm_into_conv_transpose_rule,
                rules.fuse_batchnorm_into_gemm_rule,
            ]
        )

    def call(self, model: ir.Model) -> FoldBatchNormResult:
        before = _count_op(model, "BatchNormalization")
        # The rule builds a new Conv that takes over the BN's output name; give it back the
        # user's Conv name (for --exclude and reports).
        names = {
            bn.outputs[0].name: bn.inputs[0].producer().name
            for bn in ir.traversal.RecursiveGraphIterator(model.graph)
            if bn.op_type == "BatchNormalization" and bn.inputs[0].producer() is not None
        }
        result = super().call(model)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "BatchNormalization" and node.outputs[0].name in names:
                node.name = names[node.outputs[0].name]
        after = _count_op(model, "BatchNormalization")
        if before == 0 and _count_op_types(model, _BN_PRODUCERS):
            # Exporters that optimise (torch's dynamo exporter with optimize=True) already
            # folded BN; this is the expected case, not an error.
            note = "no BatchNormalization in the model: already fused by the exporter, if any"
        elif before == 0:
            # Nothing a BN could have followed: do not claim the exporter fused anything.
            note = (
                "no BatchNormalization in the model and no Conv/ConvTranspose/Gemm: "
                "nothing to fold, nothing already fused"
            )
        else:
            note = f"folded {before - after} of {before} BatchNormalization nodes"
            if after:
                note += (
                    f"; {after} left (not after a Conv/ConvTranspose/Gemm with constant weights)"
                )
        logger.info(note)
        details = {"batchnorm_before": before, "batchnorm_after": after, "note": note}
        return FoldBatchNormResult(result.model, modified=result.modified, details=details)

    def __repr__(self) -> str:
        return "FoldBatchNormPass()"


class PoolingToGlobalPass(RewritePass):
    """Rewrites spatial ReduceMean as GlobalAveragePool (which has an int8 kernel)."""

    def __init__(self) -> None:
        super().__init__([reduce_mean_to_global_average_pool_rule])

    def __repr__(self) -> str:
        return "PoolingToGlobalPass()"


def _const_value(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _is_relu_like(node: ir.Node) -> bool:
    """True for Relu and for a Clip whose lower bound is 0 (ReLU6 and friends)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip" or len(node.inputs) < 2:
        return False
    low = _const_value(node.inputs[1])
    return low is not None and low.size == 1 and float(low.reshape(())) == 0.0


def _single_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def fused_activation(node: ir.Node) -> ir.Node | None:
    """Returns the activation node marked as fused into ``node``, if any."""
    return node.meta.get(ACTIVATION_KEY)


class MarkFusedUnitsPass(ir.passes.InPlacePass):
    """Marks Conv/Gemm/MatMul(+Add bias)(+Relu/ReLU6) chains as single fused units.

    The marks live in ``node.meta`` (never serialized): every node of a unit gets
    ``meta["onnxq.unit"] = <producer name>``, and the producer gets
    ``meta["onnxq.activation"] = <activation node>``. The graph itself is unchanged.
    """

    def call(self, model: ir.Model) -> DetailedPassResult:
        counts = {"conv_act": 0, "linear_bias": 0, "units": 0}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type not in _LINEAR or node.domain not in ("", "ai.onnx"):
                continue
            if node.name is None:
                continue
            if node.meta.get(UNIT_KEY, node.name) != node.name:
                continue  # e.g. the bias Add of a MatMul unit: not a unit of its own
            self._mark(node, counts)
        logger.info("Marked %d fused units (%s)", counts["units"], counts)
        # Only in-memory metadata changed: the graph computes the same thing.
        return DetailedPassResult(model, modified=False, details=counts)

    @staticmethod
    def _mark(node: ir.Node, counts: dict[str, int]) -> None:
        node.meta[UNIT_KEY] = node.name
        tail = node
        nxt = _single_consumer(tail.outputs[0])
        if node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
            other = nxt.inputs[1] if nxt.inputs[0] is tail.outputs[0] else nxt.inputs[0]
            if _const_value(other) is not None:
                nxt.meta[UNIT_KEY] = node.name
                counts["linear_bias"] += 1
                tail = nxt
                nxt = _single_consumer(tail.outputs[0])
        if nxt is not None and _is_relu_like(nxt):
            nxt.meta[UNIT_KEY] = node.name
            node.meta[ACTIVATION_KEY] = nxt
            counts["conv_act"] += 1
        counts["units"] += 1
