"""Bias compensation: removed channels' mean contribution moves into their consumers' biases."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq import runtime
from onnxq.inputs import FeedBatches
from onnxq.passes.prune.analysis import ChannelAnalysis
from onnxq.passes.prune.surgery import new_constant, replace_constant
from onnxq.passes.prune.weights import const, is_standard

__all__ = ["compensate_biases", "lost_contributions"]

logger = logging.getLogger(__name__)


def lost_contributions(
    model: ir.Model,
    analysis: ChannelAnalysis,
    removed: dict[int, np.ndarray],
    calibration: FeedBatches,
    provider: str,
) -> dict[ir.Node, np.ndarray]:
    """Per consumer, the mean of what its removed input channels add to each output.

    Mean-activation compensation: a consumer that loses input channel ``c`` loses
    ``W[:, c] * x_c`` from its output, and adds its expectation ``W[:, c] * mean(x_c)`` to
    its bias instead, with ``mean(x_c)`` the per-channel mean of the consumer's own input
    over the calibration data, measured before pruning (after any Relu or pooling, which do
    not commute with a constant). It is exact for channels that are constant on the data
    (e.g. dead or saturated units) and, for padded convolutions, approximate at the borders;
    elsewhere it removes the mean shift a pruned channel leaves, which is most of the
    accuracy lost without fine-tuning.

    For input channels ``R`` with mean input ``m``: ``sum_{c in R, k} W[o, c, k] * m[c]``
    (``k`` the kernel positions of a Conv), in the consumer's original output indexing.
    """
    cuts = [(piece, piece.layout.removed(removed)) for piece in analysis.consumers]
    cuts = [(piece, indices) for piece, indices in cuts if indices.size]
    if not cuts:
        return {}
    means = _channel_means(
        model, {piece.node.inputs[0]: piece.layout.axis for piece, _ in cuts}, calibration, provider
    )
    lost = {}
    for piece, indices in cuts:
        mean = means.get(piece.node.inputs[0])
        if mean is None:
            continue
        weight = const(piece.node.inputs[1]).astype(np.float64)
        rows = np.moveaxis(np.take(weight, indices, axis=piece.axis), piece.axis, 0)
        per_output = np.tensordot(mean[indices], rows, axes=1)  # (outputs, *kernel)
        lost[piece.node] = per_output.reshape(len(per_output), -1).sum(axis=1)
    return lost


def _channel_means(
    model: ir.Model, axes: Mapping[ir.Value, int], data: FeedBatches, provider: str
) -> dict[ir.Value, np.ndarray]:
    """Streams the calibration data and returns each value's mean along its channel axis.

    Only a running sum per channel is kept, so memory does not grow with the samples.
    """
    sums: dict[ir.Value, np.ndarray] = {}
    counts: dict[ir.Value, int] = {}
    for arrays in _run_exposing(model, list(axes), data, provider):
        for value, array in arrays.items():
            axis = axes[value] % array.ndim
            other = tuple(i for i in range(array.ndim) if i != axis)
            total = array.sum(axis=other, dtype=np.float64)
            sums[value] = sums[value] + total if value in sums else total
            counts[value] = counts.get(value, 0) + array.size // max(array.shape[axis], 1)
    logger.info("bias compensation: channel means of %d tensors", len(sums))
    return {value: sums[value] / counts[value] for value in sums if counts[value]}


def _run_exposing(
    model: ir.Model, values: Sequence[ir.Value], data: FeedBatches, provider: str
) -> Iterator[dict[ir.Value, np.ndarray]]:
    """Runs the data on a copy of ``model`` whose ``values`` are outputs; yields them per batch.

    The only place pruning runs ONNX Runtime. The model itself is not changed.
    """
    wanted = {value.name: value for value in values}
    probe = runtime.Probe(
        model,
        lambda graph: [v for node in graph for v in node.outputs if v.name in wanted],
        provider=provider,
    )
    if len(probe.names) < len(wanted):
        # ONNX Runtime needs a type to return a value; those consumers go uncompensated.
        logger.warning(
            "bias compensation skips %d untyped tensor(s)", len(wanted) - len(probe.names)
        )
    if not probe.names:
        return
    for batch in data:
        yield {wanted[name]: array for name, array in probe.run(batch).items()}


def compensate_biases(
    graph: ir.Graph,
    analysis: ChannelAnalysis,
    removed: dict[int, np.ndarray],
    lost: Mapping[ir.Node, np.ndarray],
) -> int:
    """Adds each consumer's lost mean contribution to its bias; returns how many took it."""
    done = 0
    for node, delta in lost.items():
        layout = analysis.layouts.get(node.outputs[0])
        if layout is not None:  # the consumer lost output channels of its own
            delta = np.delete(delta, layout.removed(removed))
        if node.op_type == "MatMul":
            _add_after_matmul(graph, node, delta)
            done += 1
        elif _add_to_bias(graph, node, delta):
            done += 1
    return done


def _add_to_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> bool:
    """Adds ``delta`` to a Conv or Gemm bias (input 2), creating it when there is none."""
    dtype = const(node.inputs[1]).dtype
    if node.op_type == "Gemm":
        # Y = alpha * A @ B + beta * C: the lost term is scaled by alpha, C by beta.
        alpha, beta = (
            node.attributes.get_float("alpha", 1.0),
            node.attributes.get_float("beta", 1.0),
        )
        if beta == 0:
            logger.info("bias compensation skips Gemm '%s': beta is 0", node.name)
            return False
        delta = delta * alpha / beta
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        node.resize_inputs(3)
        node.replace_input_with(2, new_constant(graph, f"{node.name}.bias", delta.astype(dtype)))
        return True
    array = const(bias)
    if array is None:
        logger.info("bias compensation skips '%s': its bias is not a constant", node.name)
        return False
    replace_constant(graph, node, 2, (array + delta).astype(array.dtype))
    return True


def _add_after_matmul(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> None:
    """MatMul has no bias input: folds into the Add of a MatMul + bias pair, or adds one."""
    out = node.outputs[0]
    delta = delta.astype(const(node.inputs[1]).dtype)
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output() and is_standard(uses[0].node, "Add"):
        add, index = uses[0].node, 1 - uses[0].idx
        array = const(add.inputs[index])
        if array is not None and array.ndim and array.shape[-1] == delta.size:
            replace_constant(graph, add, index, (array + delta).astype(array.dtype))
            return
    biased = ir.Value(name=f"{out.name}.compensated", shape=out.shape, type=out.type)
    ir.convenience.replace_all_uses_with(out, biased, replace_graph_outputs=True)
    if biased.is_graph_output():  # the graph's interface keeps its names
        out.name, biased.name = biased.name, out.name
    bias = new_constant(graph, f"{node.name}.bias", delta)
    graph.insert_after(
        node, ir.Node("", "Add", [out, bias], outputs=[biased], name=f"{node.name}.bias_add")
    )
