"""ReduceMean over the spatial axes of an NCHW tensor -> GlobalAveragePool.

Torch's ``AdaptiveAvgPool2d(1)`` and ``x.mean((2, 3), keepdim=True)`` export as
``ReduceMean(x, axes=[-1, -2], keepdims=1)``. For a rank-4 ``x`` this is exactly::

    ReduceMean(x, axes={2, 3}, keepdims=1) == GlobalAveragePool(x)

GlobalAveragePool has an int8 kernel in ONNX Runtime (QLinearGlobalAveragePool);
ReduceMean has none, so the rewrite lets the classifier head stay in int8. With
``keepdims=0`` the result is ``Flatten(GlobalAveragePool(x), axis=1)`` (N, C).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

__all__ = ["reduce_mean_to_global_average_pool_rule"]


def _spatial_axes(rank: int, axes: list[int]) -> bool:
    return sorted(a % rank for a in axes) == list(range(2, rank))


def _axes(node: ir.Node) -> list[int] | None:
    """The reduced axes: the ``axes`` input (opset 18+) or attribute (before), if constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = node.inputs[1].const_value
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    attribute = node.attributes.get("axes")
    return None if attribute is None else [int(a) for a in attribute.as_ints()]


class ReduceMeanToGlobalAveragePool(pattern.RewriteRuleClassBase):
    """Replaces a spatial ReduceMean of an NCHW tensor with GlobalAveragePool."""

    def pattern(self, op, x):
        return op.ReduceMean(
            x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"]
        )

    def check(self, context, x: ir.Value, out: ir.Value) -> MatchResult:
        del context
        result = MatchResult()
        node = out.producer()
        if x.shape is None or len(x.shape) != 4:
            return result.fail("input rank is not 4 (NCHW)")
        axes = _axes(node)
        if axes is None:
            return result.fail("axes are not constant (or absent: all axes)")
        if not _spatial_axes(4, axes):
            return result.fail("axes are not the spatial axes")
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return result.fail("noop_with_empty_axes is set")
        return result

    def rewrite(self, op, x: ir.Value, out: ir.Value):
        pooled = op.GlobalAveragePool(x)
        if out.producer().attributes.get_int("keepdims", 1):
            return pooled
        return op.Flatten(pooled, axis=1)


reduce_mean_to_global_average_pool_rule = ReduceMeanToGlobalAveragePool.rule()
