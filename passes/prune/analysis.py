"""Channel dataflow analysis: which producers' channels make up each tensor (reads, never edits)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.passes.prune.weights import STANDARD_DOMAINS, const

__all__ = ["ChannelAnalysis", "Layout", "ParamSlice", "Segment", "Space", "analyze_channels"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of a tensor's channel axis: ``size`` channels of one space, ``inner`` wide each."""

    space: int | None  # None: channels no producer here can remove
    size: int
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which channel spaces make up the channel axis of one tensor."""

    axis: int
    rank: int
    segments: tuple[Segment, ...]

    @property
    def spaces(self) -> list[int]:
        return [s.space for s in self.segments if s.space is not None]

    @property
    def width(self) -> int:
        return sum(s.size * s.inner for s in self.segments)

    def removed(self, removed: Mapping[int, np.ndarray]) -> np.ndarray:
        """Indices along ``axis`` that disappear when spaces lose ``removed`` channels."""
        parts, offset = [], 0
        for seg in self.segments:
            channels = removed.get(seg.space) if seg.space is not None else None
            if channels is not None and channels.size:
                parts.append(
                    offset + (channels[:, None] * seg.inner + np.arange(seg.inner)).ravel()
                )
            offset += seg.size * seg.inner
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class ParamSlice:
    """A parameter sliced along ``axis`` wherever the activation ``layout`` loses channels."""

    node: ir.Node
    index: int
    axis: int
    layout: Layout


@dataclasses.dataclass
class Space:
    """The output channels of one producer (Conv, Gemm or MatMul with constant weights)."""

    node: ir.Node
    weight_axis: int
    size: int


# Ops whose output channel c depends only on input channel c (element-wise or spatial).
_TRANSPARENT = frozenset(
    {
        "Relu", "LeakyRelu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu",
        "Selu", "Softplus", "Identity", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "Resize",
    }
)  # fmt: skip
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})


class ChannelAnalysis:
    """Walks the graph once, assigning layouts, tying spaces and collecting slices.

    Every pruned producer's output gets a *channel space*. Layouts say which spaces make up
    a tensor's channel axis: a Concat joins layouts end to end, a Flatten after global
    pooling (or of a static C x H x W) repeats each channel ``H * W`` times, and element-wise
    ops with two such inputs (residual Add, squeeze-excite Mul) tie their spaces into one
    group (union-find). A group that reaches a graph output or an op the analysis does not
    know is blocked (left whole), so pruning the rest always gives a valid graph.

    The analysis only reads the graph; ``surgery.apply_removal`` makes the edits.

    Args:
        graph: The graph to analyse (the main graph; subgraph uses block a space).
        excluded: Whether a node's outputs must stay whole (it makes no space).
    """

    def __init__(self, graph: ir.Graph, excluded: Callable[[ir.Node], bool]):
        self.graph = graph
        self.excluded = excluded
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.layouts: dict[ir.Value, Layout] = {}
        self.slices: list[ParamSlice] = []
        self.consumers: list[ParamSlice] = []  # the weights that lose input channels
        self.group_convs: list[tuple[ir.Node, Layout]] = []
        self.flattens: list[tuple[ir.Node, Layout]] = []
        handlers: dict[str, Callable[[ir.Node], bool]] = {
            "Conv": self._conv,
            "Gemm": self._gemm,
            "MatMul": self._matmul,
            "BatchNormalization": self._batch_norm,
            "Concat": self._concat,
            "Flatten": self._flatten,
            "Reshape": self._flatten,
        }
        handlers.update(dict.fromkeys(_TRANSPARENT, self._transparent))
        handlers.update(dict.fromkeys(_ELEMENTWISE, self._elementwise))
        self.handlers = handlers

    # -------------------------------------------------------------- union-find

    def find(self, space: int) -> int:
        """The root of the group ``space`` belongs to."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def groups(self) -> dict[int, list[int]]:
        """Spaces tied together, keyed by their group's root (every space is in one group)."""
        groups: dict[int, list[int]] = {}
        for space in range(len(self.spaces)):
            groups.setdefault(self.find(space), []).append(space)
        return groups

    def _unite(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.spaces[ra].size != self.spaces[rb].size:
            self._block([ra, rb], "tied to a tensor of another width")
        self.parent[rb] = ra

    def _block(self, spaces: Iterable[int], reason: str) -> None:
        for space in spaces:
            self.blocked.setdefault(space, reason)

    # -------------------------------------------------------------- walk

    def run(self) -> None:
        """Assigns layouts in graph order, then blocks spaces that escape the graph."""
        for node in self.graph:
            inputs = [self.layouts.get(v) for v in node.inputs if v is not None]
            handler = self.handlers.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
            if handler is not None and handler(node):
                continue
            reason = f"reaches {node.op_type} '{node.name}'"
            self._block((s for lay in inputs if lay for s in lay.spaces), reason)
        for value, layout in self.layouts.items():
            if value.is_graph_output():
                self._block(layout.spaces, f"reaches graph output '{value.name}'")
            elif any(use.node.graph is not self.graph for use in value.uses()):
                self._block(layout.spaces, "used inside a subgraph")

    def _layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.layouts.get(value)

    def _produce(self, node: ir.Node, weight_axis: int, size: int, rank: int, bias: int | None):
        """Makes ``node``'s output a new channel space (unless excluded)."""
        if self.excluded(node):
            return
        space = len(self.spaces)
        self.spaces.append(Space(node, weight_axis, size))
        self.parent.append(space)
        layout = Layout(rank - 1 if node.op_type == "MatMul" else 1, rank, (Segment(space, size),))
        self.layouts[node.outputs[0]] = layout
        self.slices.append(ParamSlice(node, 1, weight_axis, layout))
        if bias is not None:
            self.slices.append(ParamSlice(node, bias, const(node.inputs[bias]).ndim - 1, layout))

    def _consume(self, node: ir.Node, layout: Layout | None, axis: int, want_axis: int) -> bool:
        """Slices ``node``'s weight along ``axis`` for an input whose channel axis must match."""
        if layout is None:
            return True
        if layout.axis != want_axis:
            return False
        self.slices.append(ParamSlice(node, 1, axis, layout))
        self.consumers.append(self.slices[-1])
        return True

    # -------------------------------------------------------------- handlers

    def _conv(self, node: ir.Node) -> bool:
        layout, weight = self._layout(node.inputs[0]), const(node.inputs[1])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or (bias is not None and const(bias) is None):
            return layout is None
        group = node.attributes.get_int("group", 1)
        if group > 1:
            return self._depthwise(node, layout, weight, group)
        ok = self._consume(node, layout, 1, 1)
        self._produce(node, 0, weight.shape[0], weight.ndim, 2 if bias is not None else None)
        return ok

    def _depthwise(self, node: ir.Node, layout: Layout | None, weight: np.ndarray, group: int):
        """Depthwise Conv keeps channel c in channel c: slice it and pass the layout on."""
        if layout is None or not group == weight.shape[0] == layout.width or weight.shape[1] != 1:
            return layout is None
        self._per_channel(node, layout, [1, 2])
        self.group_convs.append((node, layout))
        return True

    def _per_channel(self, node: ir.Node, layout: Layout, params: Sequence[int]) -> None:
        """A node whose 1-D (or leading-axis) params follow its input's channels."""
        for index in params:
            if index < len(node.inputs) and node.inputs[index] is not None:
                self.slices.append(ParamSlice(node, index, 0, layout))
        self.layouts[node.outputs[0]] = layout

    def _gemm(self, node: ir.Node) -> bool:
        layout, weight = self._layout(node.inputs[0]), const(node.inputs[1])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or node.attributes.get_int("transA", 0) or self._layout(bias) is not None:
            return layout is None
        trans = node.attributes.get_int("transB", 0)
        ok = self._consume(node, layout, 1 if trans else 0, 1)
        width = weight.shape[0 if trans else 1]
        bias_array = const(bias)
        if bias is None or (bias_array is not None and bias_array.size == 1):
            self._produce(node, 0 if trans else 1, width, 2, None)
        elif bias_array is not None and bias_array.shape[-1:] == (bias_array.size,) == (width,):
            self._produce(node, 0 if trans else 1, width, 2, 2)
        return ok

    def _matmul(self, node: ir.Node) -> bool:
        layout, weight = self._layout(node.inputs[0]), const(node.inputs[1])
        if weight is None or weight.ndim != 2 or self._layout(node.inputs[1]) is not None:
            return layout is None
        rank = layout.rank if layout else _rank(node.inputs[0])
        ok = self._consume(node, layout, 0, (rank or 0) - 1)
        if rank:
            self._produce(node, 1, weight.shape[1], rank, None)
        return ok

    def _batch_norm(self, node: ir.Node) -> bool:
        layout = self._layout(node.inputs[0])
        params = [const(v) for v in node.inputs[1:]]
        if layout is None or layout.axis != 1 or any(p is None for p in params):
            return layout is None
        if any(o.uses() for o in node.outputs[1:]):
            return False
        self._per_channel(node, layout, [1, 2, 3, 4])
        return True

    def _transparent(self, node: ir.Node) -> bool:
        layout = self._layout(node.inputs[0])
        rest = [v for v in node.inputs[1:] if v is not None]
        if layout is None or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return layout is None and not any(self._layout(v) for v in rest)
        if any(const(v) is None for v in rest):
            return False
        if node.op_type == "Resize" and not _resize_keeps_channels(node, layout.axis):
            return False
        self.layouts[node.outputs[0]] = layout
        return True

    def _elementwise(self, node: ir.Node) -> bool:
        a, b = (self._layout(v) for v in node.inputs)
        if a is None and b is None:
            return True
        if a is not None and b is not None:
            return self._tie(node, a, b)
        layout, other = (a, 1) if a is not None else (b, 0)
        value = node.inputs[other]
        array = const(value)
        shape = array.shape if array is not None else _static_shape(value)
        if shape is None or len(shape) > layout.rank:
            return False
        axis = layout.axis - (layout.rank - len(shape))
        if axis >= 0 and shape[axis] != 1:
            if array is None or shape[axis] != layout.width:
                return False
            self.slices.append(ParamSlice(node, other, axis, layout))
        self.layouts[node.outputs[0]] = layout
        return True

    def _tie(self, node: ir.Node, a: Layout, b: Layout) -> bool:
        """Both inputs carry channels: they must line up one to one (residual Add)."""
        if (a.axis, a.rank) != (b.axis, b.rank) or len(a.segments) != len(b.segments):
            return False
        for sa, sb in zip(a.segments, b.segments, strict=True):
            if (sa.size, sa.inner) != (sb.size, sb.inner) or (sa.space is None) != (
                sb.space is None
            ):
                return False
        for sa, sb in zip(a.segments, b.segments, strict=True):
            if sa.space is not None:
                self._unite(sa.space, sb.space)
        self.layouts[node.outputs[0]] = a
        return True

    def _concat(self, node: ir.Node) -> bool:
        layouts = [self._layout(v) for v in node.inputs]
        known = [lay for lay in layouts if lay is not None]
        if not known:
            return True
        rank = known[0].rank
        axis = node.attributes.get_int("axis", 0) % rank
        segments: list[Segment] = []
        for value, layout in zip(node.inputs, layouts, strict=True):
            if layout is not None:
                if layout.axis != axis:
                    return False
                segments += layout.segments
                continue
            shape = _static_shape(value)
            if shape is None or len(shape) != rank:
                return False
            segments.append(Segment(None, shape[axis]))
        self.layouts[node.outputs[0]] = Layout(axis, rank, tuple(segments))
        return True

    def _flatten(self, node: ir.Node) -> bool:
        """Flatten(axis=1), or a Reshape to (N, C*H*W): channel c becomes H*W rows."""
        layout = self._layout(node.inputs[0])
        if layout is None:
            return True
        shape = _static_shape(node.inputs[0], leading_dynamic=True)
        out = node.outputs[0].shape
        if layout.axis != 1 or shape is None:
            return False
        spatial = math.prod(shape[2:])
        if node.op_type == "Flatten":
            if node.attributes.get_int("axis", 1) != 1:
                return False
        elif (
            out is None
            or len(out) != 2
            or out[0] != node.inputs[0].shape[0]
            or out[1] != math.prod(shape[1:])
        ):
            return False
        segments = tuple(Segment(s.space, s.size, s.inner * spatial) for s in layout.segments)
        flat = Layout(1, 2, segments)
        self.layouts[node.outputs[0]] = flat
        if node.op_type == "Reshape":
            self.flattens.append((node, flat))
        return True


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _static_shape(value: ir.Value, leading_dynamic: bool = False) -> tuple[int, ...] | None:
    """The value's shape when every dim (but the batch, if allowed) is a known size.

    A dim of -1 or 0 (older exporters' way of writing a dynamic one) is not a known size.
    """
    if value.shape is None:
        return None
    dims = list(value.shape)
    if leading_dynamic and dims:
        dims[0] = 1
    return tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None


def _resize_keeps_channels(node: ir.Node, axis: int) -> bool:
    scales = const(node.inputs[2]) if len(node.inputs) > 2 else None
    has_sizes = len(node.inputs) > 3 and node.inputs[3] is not None
    return not has_sizes and scales is not None and scales.size > axis and scales[axis] == 1


def analyze_channels(graph: ir.Graph, excluded: Callable[[ir.Node], bool]) -> ChannelAnalysis:
    """Runs the channel analysis of ``graph`` (which it leaves untouched) and returns it."""
    analysis = ChannelAnalysis(graph, excluded)
    analysis.run()
    return analysis
