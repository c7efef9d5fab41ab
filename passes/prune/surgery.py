"""Channel surgery: removes the analysed channels from parameters, groups and Reshapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.passes.prune.analysis import ChannelAnalysis
from onnxq.passes.prune.weights import const

__all__ = ["RemovedSlice", "affected_values", "apply_removal", "new_constant", "replace_constant"]


@dataclasses.dataclass(frozen=True)
class RemovedSlice:
    """Indices removed from one node input along one axis (original indexing).

    Zeroing these slices in the unpruned model gives exactly the pruned model's outputs
    (without bias compensation, which also changes consumers' biases).
    """

    node: str
    input_index: int
    axis: int
    indices: tuple[int, ...]


def apply_removal(
    graph: ir.Graph, analysis: ChannelAnalysis, removed: dict[int, np.ndarray]
) -> list[RemovedSlice]:
    """Slices parameters, fixes depthwise groups and Reshapes; returns what was removed."""
    edits: dict[tuple[ir.Node, int], list[tuple[int, np.ndarray]]] = {}
    for piece in analysis.slices:
        indices = piece.layout.removed(removed)
        if indices.size:
            edits.setdefault((piece.node, piece.index), []).append((piece.axis, indices))
    done = []
    for (node, index), cuts in edits.items():
        array = const(node.inputs[index])
        for axis, indices in cuts:
            done.append(RemovedSlice(node.name or "", index, axis, tuple(int(i) for i in indices)))
        for axis, indices in sorted(cuts, key=lambda cut: -cut[0]):
            array = np.delete(array, indices, axis=axis)
        replace_constant(graph, node, index, array)
    for node, layout in analysis.group_convs:
        cut = layout.removed(removed).size
        if cut:
            node.attributes["group"] = ir.AttrInt64(
                "group", node.attributes.get_int("group", 1) - cut
            )
    for node, layout in analysis.flattens:
        if layout.removed(removed).size:
            _reshape_to_flatten(node)
    return done


def new_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Registers ``array`` as a new initializer named ``name`` (made unique) and returns it."""
    while name in graph.initializers:
        name += "_"
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Gives ``node`` the sliced constant; a weight shared with others gets its own copy."""
    old = node.inputs[index]
    if len(old.uses()) == 1 and not old.is_graph_input() and not old.is_graph_output():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    name = f"{old.name}.pruned.{node.name}"
    new = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=old.type,
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(new)
    node.replace_input_with(index, new)
    if not old.uses() and old.name in graph.initializers:
        graph.initializers.pop(old.name)


def _reshape_to_flatten(node: ir.Node) -> None:
    """A Reshape to (N, C*H*W) whose C shrank: Flatten(axis=1) needs no shape constant."""
    node.op_type = "Flatten"
    node.resize_inputs(1)
    node.attributes.clear()
    node.attributes["axis"] = ir.AttrInt64("axis", 1)


def affected_values(analysis: ChannelAnalysis, removed: dict[int, np.ndarray]) -> list[ir.Value]:
    """Values whose channel axis shrank (their shapes are inferred again)."""
    return [
        value
        for value, layout in analysis.layouts.items()
        if layout.removed(removed).size and not value.is_graph_output()
    ]
