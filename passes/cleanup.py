"""Graph cleanup: constant folding, no-op removal, dead code, topological order.

Cleanup runs first so that every later pass sees weights as initializers (vendor models
often keep them in ``Constant`` nodes), no Dropout/Identity/no-op arithmetic between the
ops it pattern-matches, and nodes in topological order.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules import common as rules

__all__ = ["FoldConstantsPass", "RemoveNoOpsPass", "cleanup_passes"]

logger = logging.getLogger(__name__)


class FoldConstantsPass(ir.passes.InPlacePass):
    """Folds subgraphs whose inputs are all constant (onnxscript's constant folder)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = optimizer.fold_constants(model)
        return ir.passes.PassResult(model, modified=result.modified)


# Local patterns that compute their input unchanged. Each is exact in fp32.
_NO_OP_RULES = [
    rules.dropout_inference_rule,
    rules.dropout_zero_rule,
    *rules.add_0_rule.commute(),
    *rules.mul_by_1_rule.commute(),
    rules.sub_0_rule,
    rules.div_by_1_rule,
    rules.no_op_cast_rule,
    rules.no_op_expand_rule,
    rules.no_op_transpose_rule,
    rules.transpose_transpose_rule,
    rules.reshape_reshape_rule,
]


class RemoveNoOpsPass(RewritePass):
    """Removes Dropout in inference, x+0, x*1, x-0, x/1, and no-op Cast/Expand/Transpose."""

    def __init__(self) -> None:
        super().__init__(_NO_OP_RULES)

    def __repr__(self) -> str:
        return "RemoveNoOpsPass()"


def cleanup_passes() -> list[ir.passes.PassBase]:
    """Returns the cleanup passes in the order they must run, with why for each."""
    return [
        # Weights stored as Constant nodes become initializers, which the fusion and
        # quantization passes (and ONNX Runtime's QDQ fusions) look for.
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        FoldConstantsPass(),
        RemoveNoOpsPass(),
        common_passes.IdentityEliminationPass(),
        common_passes.DeduplicateHashedInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
        # Later passes key their analysis and reports on node and value names.
        common_passes.NameFixPass(),
    ]
