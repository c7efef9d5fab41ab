"""Graph cleanup: constant folding, no-op removal, dead code, topological order.

Cleanup runs first so that every later pass sees weights as initializers (vendor models
often keep them in ``Constant`` nodes), no Dropout/Identity/no-op arithmetic between the
ops it pattern-matches, and nodes in topological order. The order, with onnx_ir's common
passes in between, is in `onnxq.pipeline.build_pipeline`.
"""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules import common as rules

from onnxq.passes.results import DetailedPassResult
from onnxq.passes.rules.identity_arithmetic import identity_arithmetic_rules

__all__ = [
    "MIN_OPSET",
    "EliminateIdentityPass",
    "FoldConstantsPass",
    "InferShapesPass",
    "RemoveNoOpsPass",
    "UpgradeOpsetPass",
]

logger = logging.getLogger(__name__)


# Per-channel DequantizeLinear (axis attribute) exists from opset 13 on.
MIN_OPSET = 13


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    """Upgrades models below opset 13 with ONNX's version converter (vendor models)."""

    def __init__(self, target: int = MIN_OPSET) -> None:
        super().__init__()
        self.target = target

    def __repr__(self) -> str:
        return f"UpgradeOpsetPass(target={self.target})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", self.target)
        try:
            proto = onnx.version_converter.convert_version(ir.to_proto(model), self.target)
        except Exception as e:  # the converter raises bare RuntimeError/ValueError
            raise ir.passes.PassError(
                f"cannot upgrade the model from opset {current} to {self.target}: {e}"
            ) from e
        note = f"upgraded the model from opset {current} to {self.target}"
        logger.warning("%s (per-channel quantization needs it)", note)
        details = {"note": note, "from": current, "to": self.target}
        upgraded = ir.from_proto(proto)
        _keep_external_data_folders(model, upgraded)
        return DetailedPassResult(upgraded, modified=True, details=details)


def _keep_external_data_folders(source: ir.Model, target: ir.Model) -> None:
    """Gives ``target``'s external tensors the data folders ``source``'s had.

    A proto round trip keeps only each tensor's file name relative to its model, so
    without this the upgraded model would look for its ``.data`` file in the working
    directory (models over 2 GB keep their weights external).
    """
    folders = {
        (t.location, t.offset): t.base_dir
        for graph in source.graphs()
        for v in graph.initializers.values()
        if isinstance(t := v.const_value, ir.ExternalTensor)
    }
    for graph in target.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                tensor.base_dir = folders.get((tensor.location, tensor.offset), tensor.base_dir)


def _compatible(declared: ir.Shape, inferred: ir.Shape) -> bool:
    if len(declared) != len(inferred):
        return False
    return all(
        not isinstance(a, int) or not isinstance(b, int) or a == b
        for a, b in zip(declared, inferred, strict=True)
    )


def _type_snapshot(model: ir.Model) -> dict[str, tuple[object, object]]:
    values = [*model.graph.inputs, *(o for n in model.graph for o in n.outputs)]
    return {
        v.name or "": (v.dtype, None if v.shape is None else tuple(str(d) for d in v.shape))
        for v in values
    }


class InferShapesPass(ir.passes.InPlacePass):
    """Infers types and shapes, replacing declared output shapes that contradict them.

    Vendor models sometimes declare graph-output shapes the graph does not produce; strict
    shape inference then fails and checkers reject the model. Declared shapes that agree
    with inference are kept (they carry the user's dimension names).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _type_snapshot(model)
        declared = {value: value.shape for value in model.graph.outputs}
        for value in declared:
            value.shape = None
        common_passes.ShapeInferencePass(strict_mode=False)(model)
        repaired = []
        for value, shape in declared.items():
            if value.shape is None or (shape is not None and _compatible(shape, value.shape)):
                value.shape = shape
            elif shape is not None:
                repaired.append(f"{value.name}: declared {list(shape)}, is {list(value.shape)}")
        if repaired:
            logger.warning("Replaced wrong declared output shapes: %s", "; ".join(repaired))
        # onnx_ir's pass always reports a change; compare what it actually set.
        return DetailedPassResult(
            model,
            modified=_type_snapshot(model) != before,
            details={"repaired_output_shapes": repaired},
        )


class EliminateIdentityPass(common_passes.IdentityEliminationPass):
    """Removes Identity nodes, except those a graph output needs.

    Kept: one that gives a graph output a second name, and one that makes a subgraph
    output of a value from an outer scope.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if node.op_type == "Identity" and node.inputs else None
        if source is not None and node.outputs[0].is_graph_output():
            # onnx_ir 1.1 merges outputs (y, z=Identity(y)) into (z, z): output y is lost.
            if source.is_graph_output():
                return False
            # A subgraph (If/Loop branch) output must be produced inside the subgraph: ONNX
            # Runtime refuses "an outer scope value being returned directly", and onnx_ir
            # would also rename the outer value to the branch output's name.
            producer = source.producer()
            if producer is not None and producer.graph is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


class FoldConstantsPass(ir.passes.InPlacePass):
    """Folds subgraphs whose inputs are all constant (onnxscript's constant folder)."""

    # onnxscript's defaults (8192 in, 262144 out) leave weight arithmetic unfolded, e.g.
    # ``weight_orig * weight_mask`` from an un-finalized torch.nn.utils.prune, and then
    # the weight is neither prunable nor quantizable. Weight-sized folds are cheap.
    size_limit = 1 << 24
    # A fold whose constant input stays in the model for another consumer adds a second
    # copy of that data: a tied embedding's Transpose for the LM head (Gather keeps the
    # embedding) grew a decoder from 21.6 to 29.8 MB. Above this many bytes such a node is
    # left for ONNX Runtime, which folds it in memory when the session starts.
    shared_fold_bytes = 1 << 20

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # An initializer that is also a graph input is a default the caller may override,
        # not a constant. onnxscript's shape evaluators (e.g. Gather of a Shape) still read
        # its value, and it drops such an initializer once unused, which leaves a required
        # input that no caller feeds. So its value is hidden while folding and restored.
        overridable = {v: v.const_value for v in model.graph.inputs if v.is_initializer()}
        for value in overridable:
            value.const_value = None
        try:
            result = optimizer.fold_constants(
                model,
                input_size_limit=self.size_limit,
                output_size_limit=self.size_limit,
                should_fold=self._should_fold,
            )
        finally:
            for value, tensor in overridable.items():
                value.const_value = tensor
                if value.name not in model.graph.initializers:
                    model.graph.register_initializer(value)
        return ir.passes.PassResult(model, modified=result.modified)

    def _should_fold(self, node: ir.Node) -> bool | None:
        """False for a node whose fold would duplicate a large constant kept for others."""
        for value in node.inputs:
            if value is None or value.const_value is None:
                continue
            if value.const_value.nbytes < self.shared_fold_bytes:
                continue
            if any(user is not node for user, _ in value.uses()) or value.is_graph_output():
                logger.debug("not folding %s: %s is also used elsewhere", node.name, value.name)
                return False
        return None  # onnxscript's own decision


# Local patterns that compute their input unchanged. Each is exact in fp32.
_NO_OP_RULES = [
    rules.dropout_inference_rule,
    rules.dropout_zero_rule,
    # Exact constants only: onnxscript's add_0/mul_by_1 rules also take x + 1e-10.
    *identity_arithmetic_rules,
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
