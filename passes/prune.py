"""Pruning: magnitude, 2:4 and mask-file sparsity, and structured removal of channels.

ONNX Runtime's CPU provider has no sparse kernels, so zeros alone buy no speed. What each
kind of ``--prune`` buys here:

- ``unstructured:S`` (per layer) or ``unstructured:S:global``: the fraction S of smallest
  |w| of every Conv/Gemm/MatMul weight becomes 0. Latency and file size stay the same; the
  zip-compressed size shrinks (reported), which is what a download or an app bundle pays.
- ``2:4``: in every group of 4 consecutive weights along the input-channel axis the 2
  largest stay: the pattern GPU sparse tensor cores run faster; no speed-up on ONNX
  Runtime's CPU provider.
- ``mask:masks.npz``: initializer name -> 0/1 mask, e.g. from ``torch.nn.utils.prune``.
- ``channels:S`` (L1, or ``channels:S:l2``): whole output channels are removed and every
  consumer loses the matching input channels: a smaller dense model, faster everywhere.
  Kept channel counts are rounded to multiples of 8 (layers wider than 8): ONNX Runtime's
  NCHWc convolutions pad channels to blocks of 8 or 16, so 11 channels run as slowly as 16.

Channel pruning runs after BatchNormalization folding. A folded weight is
``W' = gamma / sqrt(var + eps) * W``, so the norm of a folded output channel already carries
BN's scale (the BN-aware importance), and a removed channel's folded bias goes with it:
the pruned model computes exactly what the fused model computes with every removed slice
(weights, biases, consumer rows) set to 0. A BN left unfused is sliced like any other
per-channel parameter.

The channel analysis gives every pruned producer's output a *channel space*. Layouts say
which spaces make up a tensor's channel axis: a Concat joins layouts end to end, a Flatten
after global pooling (or of a static C x H x W) repeats each channel ``H * W`` times, and
element-wise ops with two such inputs (residual Add, squeeze-excite Mul) tie their spaces
into one group (union-find). A group is pruned with one index set chosen by the summed
importance of its producers; a group that reaches a graph output or an op the analysis does
not know is left whole, so the result is always a valid graph.

With calibration data, channel pruning also compensates biases (mean-activation
compensation): a consumer that loses input channel ``c`` loses ``W[:, c] * x_c`` from its
output, and adds its expectation ``W[:, c] * mean(x_c)`` to its bias instead, with
``mean(x_c)`` the per-channel mean of the consumer's own input over the calibration data,
measured before pruning (after any Relu or pooling, which do not commute with a constant).
It is exact for channels that are constant on the data (e.g. dead or saturated units) and,
for padded convolutions, approximate at the borders; elsewhere it removes the mean shift a
pruned channel leaves, which is most of the accuracy lost without fine-tuning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq import runtime
from onnxq.calibration.collect import _instrumented_copy
from onnxq.calibration.data import CalibrationData
from onnxq.errors import InputError

__all__ = [
    "KINDS",
    "ApplyMasksPass",
    "PruneChannelsPass",
    "PruneSpec",
    "PruneWeightsPass",
    "RemovedSlice",
    "load_masks",
    "measure_sparsity",
    "zipped_size",
]

logger = logging.getLogger(__name__)

KINDS = (
    "unstructured:S",
    "unstructured:S:global",
    "channels:S",
    "channels:S:l2",
    "channels:S:compensate",
    "2:4",
    "mask:FILE",
)
TWO_FOUR_NOTE = (
    "2:4 pattern for GPU sparse tensor cores; no speed-up on ONNX Runtime's CPU provider"
)
_UNSTRUCTURED_NOTE = (
    "zeros only: same latency and file size on ONNX Runtime; smaller once compressed"
)
_STANDARD = ("", "ai.onnx")


# ---------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """A parsed ``--prune`` request.

    Attributes:
        kind: ``unstructured``, ``channels``, ``2:4`` or ``mask``.
        sparsity: Fraction of weights (or channels) to remove, in [0, 1).
        scope: ``layer`` or ``global`` (unstructured), ``l1`` or ``l2`` (channels).
        masks: The ``.npz`` of masks (``mask`` kind).
        exclude: Node names, regular expressions or op types never pruned.
        compensate: Channels only: move the removed channels' mean contribution into the
            consumers' biases (needs calibration data). Opt-in: measured on digits it wins
            back 10 of 16 points at 0.3 but loses 16 more at 0.5 (benchmarks/README.md).
    """

    kind: str
    sparsity: float = 0.0
    scope: str = ""
    masks: str | None = None
    exclude: tuple[str, ...] = ()
    compensate: bool = False

    @classmethod
    def parse(cls, text: str, exclude: Sequence[str] = ()) -> PruneSpec:
        """Parses a request such as ``channels:0.3[:l2][:compensate]``.

        The forms are ``unstructured:S[:global]``, ``channels:S[:l2][:compensate]``,
        ``2:4`` and ``mask:FILE.npz``.

        Raises:
            InputError: Unknown kind or scope, or a sparsity outside [0, 1).
        """
        kind, _, rest = text.strip().partition(":")
        exclude = tuple(exclude)
        if text.strip() == "2:4":
            return cls("2:4", 0.5, exclude=exclude)
        if kind == "mask" and rest:
            return cls("mask", masks=rest, exclude=exclude)
        scopes = {"unstructured": ("layer", "global"), "channels": ("l1", "l2")}
        if kind not in scopes or not rest:
            raise InputError(f"unknown prune kind '{text}'; choose from {', '.join(KINDS)}")
        sparsity, *options = rest.split(":")
        flags = ("compensate",) if kind == "channels" else ()
        unknown = [o for o in options if o not in scopes[kind] + flags]
        if unknown or sum(o in scopes[kind] for o in options) > 1:
            allowed = ", ".join(scopes[kind] + flags)
            raise InputError(f"bad {kind} options '{':'.join(options)}'; choose from {allowed}")
        scope = next((o for o in options if o in scopes[kind]), scopes[kind][0])
        return cls(
            kind,
            _parse_sparsity(sparsity),
            scope,
            exclude=exclude,
            compensate="compensate" in options,
        )

    def passes(
        self, calibration: CalibrationData | None = None, *, provider: str = "cpu"
    ) -> list[ir.passes.PassBase]:
        """Returns the passes that carry out this request, in order.

        Args:
            calibration: Data for channel pruning's bias compensation (used with
                ``compensate``; other kinds ignore it).
            provider: Execution provider that runs the calibration data.

        Raises:
            InputError: The mask file cannot be read.
        """
        if self.kind == "channels":
            # The removed channels leave shape computations (Reshape's Concat) unused.
            return [
                PruneChannelsPass(
                    self.sparsity,
                    norm=self.scope,
                    exclude=self.exclude,
                    calibration=calibration if self.compensate else None,
                    provider=provider,
                ),
                common_passes.RemoveUnusedNodesPass(),
            ]
        if self.kind == "mask":
            return [ApplyMasksPass(load_masks(self.masks or ""), exclude=self.exclude)]
        method = "2:4" if self.kind == "2:4" else self.scope
        return [PruneWeightsPass(self.sparsity, method=method, exclude=self.exclude)]


def _parse_sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"sparsity must be in [0, 1), got '{text}'") from None
    if not 0 <= value < 1:
        raise InputError(f"sparsity must be in [0, 1), got {value:g}")
    return value


class _Exclusions:
    """Node names, regular expressions (full match) and op types kept out of pruning."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        try:
            self._regexes = [re.compile(p) for p in self.patterns]
        except re.error as e:
            raise InputError(f"bad prune exclusion pattern: {e}") from None

    def __call__(self, node: ir.Node) -> bool:
        if node.op_type in self.patterns:
            return True
        return any(r.fullmatch(node.name or "") for r in self._regexes)


# ---------------------------------------------------------------------------- weights


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _is_standard(node: ir.Node, *op_types: str) -> bool:
    return node.domain in _STANDARD and node.op_type in op_types


def _input_axis(node: ir.Node) -> int | None:
    """The input-channel axis of a node's constant weight, or None when it has none."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = _const(weight)
    if array is None or array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
        return None
    if _is_standard(node, "Conv"):
        return 1
    if _is_standard(node, "Gemm"):
        return 1 if _attr(node, "transB", 0) else 0
    if _is_standard(node, "MatMul") and array.ndim == 2:
        return 0
    return None


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


@dataclasses.dataclass
class _Weight:
    """A prunable constant weight: the value, the layer it is reported under, its Cin axis."""

    value: ir.Value
    layer: str
    axis: int

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


def _weights(model: ir.Model, excluded: Callable[[ir.Node], bool]) -> list[_Weight]:
    """Conv/Gemm/MatMul constant weights of the main graph, each once (weights may be shared)."""
    found: dict[ir.Value, _Weight] = {}
    for node in model.graph:
        axis = _input_axis(node)
        if axis is None or excluded(node) or node.inputs[1] in found:
            continue
        found[node.inputs[1]] = _Weight(node.inputs[1], node.name or node.inputs[1].name, axis)
    return list(found.values())


def _sparsity(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0)) / max(array.size, 1)


def measure_sparsity(model: ir.Model, min_sparsity: float = 0.01) -> dict[str, object]:
    """Reports the zeros already in Conv/Gemm/MatMul weights (e.g. pruned in Torch).

    Args:
        model: The fp32 model (weights as initializers).
        min_sparsity: Layers with fewer zeros than this are left out of ``layers``.

    Returns:
        ``{"weights", "zeros", "sparsity", "layers": {layer: sparsity}}``.
    """
    weights = _weights(model, lambda node: False)
    total = sum(w.array.size for w in weights)
    zeros = sum(int(np.count_nonzero(w.array == 0)) for w in weights)
    layers = {w.layer: round(_sparsity(w.array), 4) for w in weights}
    return {
        "weights": total,
        "zeros": zeros,
        "sparsity": round(zeros / total, 4) if total else 0.0,
        "layers": {k: v for k, v in layers.items() if v >= min_sparsity},
    }


def zipped_size(model: ir.Model) -> int:
    """Bytes of the serialized model after zlib compression: what zeros save in transit."""
    return len(zlib.compress(ir.serde.serialize_model(model).SerializeToString(), 6))


def load_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Loads ``initializer name -> 0/1 mask`` arrays from an ``.npz``.

    Raises:
        InputError: The file cannot be read.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read prune masks '{path}': {e}") from None


class _MaskWeightsPass(ir.passes.InPlacePass):
    """Shared by the sparsity passes: choose masks, zero the weights, report what changed."""

    note = ""

    def __init__(self, exclude: Sequence[str] = ()):
        super().__init__()
        self.exclude = tuple(exclude)
        self._excluded = _Exclusions(exclude)
        self.summary: dict[str, object] = {}

    def _targets(self, model: ir.Model) -> list[_Weight]:
        weights = _weights(model, self._excluded)
        if not weights:
            raise InputError(
                "nothing to prune: the model has no Conv/Gemm/MatMul with constant weights"
                + (f" outside --prune-exclude {list(self.exclude)}" if self.exclude else "")
            )
        return weights

    def _keep(self, weights: list[_Weight]) -> list[np.ndarray | None]:
        """One boolean keep-mask per weight (None: leave that weight as it is)."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        weights = self._targets(model)
        zipped_before = zipped_size(model)
        modified = False
        layers: dict[str, list[float]] = {}
        for weight, keep in zip(weights, self._keep(weights), strict=True):
            before = weight.array
            after = before if keep is None else np.where(keep, before, 0).astype(before.dtype)
            if not np.array_equal(before, after):
                weight.value.const_value = ir.tensor(after, name=weight.value.name)
                modified = True
            layers[weight.layer] = [round(_sparsity(before), 4), round(_sparsity(after), 4)]
        total = sum(w.array.size for w in weights)
        zeros = sum(int(np.count_nonzero(w.array == 0)) for w in weights)
        self.summary = {
            "sparsity": round(zeros / max(total, 1), 4),
            "layers": layers,  # layer -> [sparsity before, after]
            "zipped_bytes_before": zipped_before,
            "zipped_bytes_after": zipped_size(model) if modified else zipped_before,
            "note": self.note,
        }
        logger.info("%r: %.1f%% of pruned weights are 0", self, 100 * zeros / max(total, 1))
        return ir.passes.PassResult(model, modified=modified)


class PruneWeightsPass(_MaskWeightsPass):
    """Zeros the smallest Conv/Gemm/MatMul weights (per layer, global, or 2:4 pattern).

    Args:
        sparsity: Fraction of each weight (``layer``) or of all weights (``global``) set to
            0; ignored by ``2:4``, which is 50% by construction.
        method: ``layer``, ``global`` or ``2:4``.
        exclude: Node names, regular expressions or op types left dense.
    """

    def __init__(
        self, sparsity: float = 0.5, *, method: str = "layer", exclude: Sequence[str] = ()
    ):
        super().__init__(exclude)
        if method not in ("layer", "global", "2:4"):
            raise InputError(f"unknown prune method '{method}'; choose from layer, global, 2:4")
        self.sparsity = _parse_sparsity(str(sparsity))
        self.method = method
        self.note = TWO_FOUR_NOTE if method == "2:4" else _UNSTRUCTURED_NOTE

    def __repr__(self) -> str:
        return (
            f"PruneWeightsPass(sparsity={self.sparsity:g}, method={self.method!r}, "
            f"exclude={list(self.exclude)})"
        )

    def _keep(self, weights: list[_Weight]) -> list[np.ndarray | None]:
        if self.method == "2:4":
            return [_two_four_keep(w.array, w.axis) for w in weights]
        if self.method == "layer":
            return [_magnitude_keep(np.abs(w.array), self.sparsity) for w in weights]
        # Global: one threshold over every weight, so sensitive small layers keep more.
        flat = np.concatenate([np.abs(w.array).ravel() for w in weights])
        keep = _magnitude_keep(flat, self.sparsity)
        bounds = np.cumsum([0, *(w.array.size for w in weights)])
        return [
            keep[lo:hi].reshape(w.array.shape)
            for w, lo, hi in zip(weights, bounds[:-1], bounds[1:], strict=True)
        ]


def _magnitude_keep(magnitude: np.ndarray, sparsity: float) -> np.ndarray:
    """Keeps all but exactly ``round(sparsity * size)`` smallest entries (ties broken)."""
    drop = round(sparsity * magnitude.size)
    keep = np.ones(magnitude.size, dtype=bool)
    if drop:
        keep[np.argpartition(magnitude.ravel(), drop - 1)[:drop]] = False
    return keep.reshape(magnitude.shape)


def _two_four_keep(array: np.ndarray, axis: int) -> np.ndarray | None:
    """Keeps the 2 largest of every 4 consecutive weights along ``axis`` (None: Cin % 4)."""
    if array.shape[axis] % 4:
        logger.info(
            "2:4 skips a weight of shape %s: input channels not a multiple of 4", array.shape
        )
        return None
    moved = np.moveaxis(np.abs(array), axis, -1)
    groups = moved.reshape(-1, 4)
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(groups, axis=1, kind="stable")[:, 2:], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


class ApplyMasksPass(_MaskWeightsPass):
    """Multiplies initializers by given 0/1 masks (from an ``.npz`` or Torch's prune).

    Args:
        masks: Initializer name -> mask of the initializer's shape, holding only 0 and 1.
        exclude: Node names, regular expressions or op types whose weights stay dense.
    """

    note = "masks from file: zeros only, same latency on ONNX Runtime"

    def __init__(self, masks: Mapping[str, np.ndarray], *, exclude: Sequence[str] = ()):
        super().__init__(exclude)
        self.masks = dict(masks)
        for name, mask in self.masks.items():
            if not np.isin(mask, (0, 1)).all():
                raise InputError(f"mask for '{name}' must hold only 0 and 1")

    def __repr__(self) -> str:
        return f"ApplyMasksPass(masks={len(self.masks)} initializers)"

    def _targets(self, model: ir.Model) -> list[_Weight]:
        targets = []
        excluded = {
            node.inputs[1] for node in model.graph if len(node.inputs) > 1 and self._excluded(node)
        }
        for name, mask in self.masks.items():
            value = model.graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise InputError(f"mask '{name}' names no initializer of the model")
            shape = tuple(value.const_value.shape)
            if tuple(mask.shape) != shape:
                raise InputError(
                    f"mask '{name}' has shape {tuple(mask.shape)}, its initializer {shape}"
                )
            if value not in excluded:
                targets.append(_Weight(value, name, 0))
        return targets

    def _keep(self, weights: list[_Weight]) -> list[np.ndarray | None]:
        return [self.masks[w.value.name].astype(bool) for w in weights]


# ---------------------------------------------------------------------------- channels


@dataclasses.dataclass(frozen=True)
class _Segment:
    """A run of a tensor's channel axis: ``size`` channels of one space, ``inner`` wide each."""

    space: int | None  # None: channels no producer here can remove
    size: int
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which channel spaces make up the channel axis of one tensor."""

    axis: int
    rank: int
    segments: tuple[_Segment, ...]

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
class _Slice:
    """A parameter sliced along ``axis`` wherever the activation ``layout`` loses channels."""

    node: ir.Node
    index: int
    axis: int
    layout: _Layout


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


@dataclasses.dataclass
class _Space:
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


class _ChannelAnalysis:
    """Walks the graph once, assigning layouts, tying spaces and collecting slices."""

    def __init__(self, graph: ir.Graph, excluded: Callable[[ir.Node], bool]):
        self.graph = graph
        self.excluded = excluded
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.layouts: dict[ir.Value, _Layout] = {}
        self.slices: list[_Slice] = []
        self.consumers: list[_Slice] = []  # the weights that lose input channels
        self.group_convs: list[tuple[ir.Node, _Layout]] = []
        self.flattens: list[tuple[ir.Node, _Layout]] = []
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
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

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
        for node in self.graph:
            inputs = [self.layouts.get(v) for v in node.inputs if v is not None]
            handler = self.handlers.get(node.op_type) if node.domain in _STANDARD else None
            if handler is not None and handler(node):
                continue
            reason = f"reaches {node.op_type} '{node.name}'"
            self._block((s for lay in inputs if lay for s in lay.spaces), reason)
        for value, layout in self.layouts.items():
            if value.is_graph_output():
                self._block(layout.spaces, f"reaches graph output '{value.name}'")
            elif any(use.node.graph is not self.graph for use in value.uses()):
                self._block(layout.spaces, "used inside a subgraph")

    def _layout(self, value: ir.Value | None) -> _Layout | None:
        return None if value is None else self.layouts.get(value)

    def _produce(self, node: ir.Node, weight_axis: int, size: int, rank: int, bias: int | None):
        """Makes ``node``'s output a new channel space (unless excluded)."""
        if self.excluded(node):
            return
        space = len(self.spaces)
        self.spaces.append(_Space(node, weight_axis, size))
        self.parent.append(space)
        layout = _Layout(
            rank - 1 if node.op_type == "MatMul" else 1, rank, (_Segment(space, size),)
        )
        self.layouts[node.outputs[0]] = layout
        self.slices.append(_Slice(node, 1, weight_axis, layout))
        if bias is not None:
            self.slices.append(_Slice(node, bias, _const(node.inputs[bias]).ndim - 1, layout))

    def _consume(self, node: ir.Node, layout: _Layout | None, axis: int, want_axis: int) -> bool:
        """Slices ``node``'s weight along ``axis`` for an input whose channel axis must match."""
        if layout is None:
            return True
        if layout.axis != want_axis:
            return False
        self.slices.append(_Slice(node, 1, axis, layout))
        self.consumers.append(self.slices[-1])
        return True

    # -------------------------------------------------------------- handlers

    def _conv(self, node: ir.Node) -> bool:
        layout, weight = self._layout(node.inputs[0]), _const(node.inputs[1])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or (bias is not None and _const(bias) is None):
            return layout is None
        group = _attr(node, "group", 1)
        if group > 1:
            return self._depthwise(node, layout, weight, group)
        ok = self._consume(node, layout, 1, 1)
        self._produce(node, 0, weight.shape[0], weight.ndim, 2 if bias is not None else None)
        return ok

    def _depthwise(self, node: ir.Node, layout: _Layout | None, weight: np.ndarray, group: int):
        """Depthwise Conv keeps channel c in channel c: slice it and pass the layout on."""
        if layout is None or not group == weight.shape[0] == layout.width or weight.shape[1] != 1:
            return layout is None
        self._per_channel(node, layout, [1, 2])
        self.group_convs.append((node, layout))
        return True

    def _per_channel(self, node: ir.Node, layout: _Layout, params: Sequence[int]) -> None:
        """A node whose 1-D (or leading-axis) params follow its input's channels."""
        for index in params:
            if index < len(node.inputs) and node.inputs[index] is not None:
                self.slices.append(_Slice(node, index, 0, layout))
        self.layouts[node.outputs[0]] = layout

    def _gemm(self, node: ir.Node) -> bool:
        layout, weight = self._layout(node.inputs[0]), _const(node.inputs[1])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or _attr(node, "transA", 0) or self._layout(bias) is not None:
            return layout is None
        trans = _attr(node, "transB", 0)
        ok = self._consume(node, layout, 1 if trans else 0, 1)
        width = weight.shape[0 if trans else 1]
        bias_array = _const(bias)
        if bias is None or (bias_array is not None and bias_array.size == 1):
            self._produce(node, 0 if trans else 1, width, 2, None)
        elif bias_array is not None and bias_array.shape[-1:] == (bias_array.size,) == (width,):
            self._produce(node, 0 if trans else 1, width, 2, 2)
        return ok

    def _matmul(self, node: ir.Node) -> bool:
        layout, weight = self._layout(node.inputs[0]), _const(node.inputs[1])
        if weight is None or weight.ndim != 2 or self._layout(node.inputs[1]) is not None:
            return layout is None
        rank = layout.rank if layout else _rank(node.inputs[0])
        ok = self._consume(node, layout, 0, (rank or 0) - 1)
        if rank:
            self._produce(node, 1, weight.shape[1], rank, None)
        return ok

    def _batch_norm(self, node: ir.Node) -> bool:
        layout = self._layout(node.inputs[0])
        params = [_const(v) for v in node.inputs[1:]]
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
        if any(_const(v) is None for v in rest):
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
        array = _const(value)
        shape = array.shape if array is not None else _static_shape(value)
        if shape is None or len(shape) > layout.rank:
            return False
        axis = layout.axis - (layout.rank - len(shape))
        if axis >= 0 and shape[axis] != 1:
            if array is None or shape[axis] != layout.width:
                return False
            self.slices.append(_Slice(node, other, axis, layout))
        self.layouts[node.outputs[0]] = layout
        return True

    def _tie(self, node: ir.Node, a: _Layout, b: _Layout) -> bool:
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
        axis = _attr(node, "axis", 0) % rank
        segments: list[_Segment] = []
        for value, layout in zip(node.inputs, layouts, strict=True):
            if layout is not None:
                if layout.axis != axis:
                    return False
                segments += layout.segments
                continue
            shape = _static_shape(value)
            if shape is None or len(shape) != rank:
                return False
            segments.append(_Segment(None, shape[axis]))
        self.layouts[node.outputs[0]] = _Layout(axis, rank, tuple(segments))
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
            if _attr(node, "axis", 1) != 1:
                return False
        elif (
            out is None
            or len(out) != 2
            or out[0] != node.inputs[0].shape[0]
            or out[1] != math.prod(shape[1:])
        ):
            return False
        segments = tuple(_Segment(s.space, s.size, s.inner * spatial) for s in layout.segments)
        flat = _Layout(1, 2, segments)
        self.layouts[node.outputs[0]] = flat
        if node.op_type == "Reshape":
            self.flattens.append((node, flat))
        return True


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _static_shape(value: ir.Value, leading_dynamic: bool = False) -> tuple[int, ...] | None:
    """The value's shape when every dim (but the batch, if allowed) is a known integer."""
    if value.shape is None:
        return None
    dims = list(value.shape)
    if leading_dynamic and dims:
        dims[0] = 1
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _resize_keeps_channels(node: ir.Node, axis: int) -> bool:
    scales = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    has_sizes = len(node.inputs) > 3 and node.inputs[3] is not None
    return not has_sizes and scales is not None and scales.size > axis and scales[axis] == 1


def _norms(weight: np.ndarray, axis: int, norm: str) -> np.ndarray:
    rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).astype(np.float64)
    return np.abs(rows).sum(axis=1) if norm == "l1" else np.sqrt((rows**2).sum(axis=1))


class PruneChannelsPass(ir.passes.InPlacePass):
    """Removes the least important output channels of Conv/Gemm/MatMul and their consumers.

    Args:
        sparsity: Fraction of each layer's (or residual group's) output channels removed.
        norm: Importance of a channel: ``l1`` or ``l2`` norm of its (BN-folded) weights.
        round_to: Keep a multiple of this many channels: ONNX Runtime's NCHWc convolutions
            pad channels to blocks of 8 (AVX2) or 16 (AVX-512), so 11 channels cost 16.
        exclude: Node names, regular expressions or op types whose outputs stay whole.
        calibration: Data to measure each consumer's mean input per channel (before
            pruning); every consumer then adds the mean contribution of its removed input
            channels to its bias. None: no compensation.
        provider: Execution provider that runs the calibration data.

    After ``call``, ``removed`` lists every sliced parameter (``RemovedSlice``) and
    ``summary["bias_compensated"]`` counts the consumers whose bias was compensated.
    """

    def __init__(
        self,
        sparsity: float = 0.3,
        *,
        norm: str = "l1",
        round_to: int = 8,
        exclude: Sequence[str] = (),
        calibration: CalibrationData | None = None,
        provider: str = "cpu",
    ):
        super().__init__()
        self.round_to = round_to
        if norm not in ("l1", "l2"):
            raise InputError(f"unknown channel importance '{norm}'; choose from l1, l2")
        self.sparsity = _parse_sparsity(str(sparsity))
        self.norm = norm
        self.exclude = tuple(exclude)
        self.calibration = calibration
        self.provider = provider
        self.summary: dict[str, object] = {}
        self.removed: list[RemovedSlice] = []

    def __repr__(self) -> str:
        return (
            f"PruneChannelsPass(sparsity={self.sparsity:g}, norm={self.norm!r}, "
            f"round_to={self.round_to}, exclude={list(self.exclude)}, "
            f"calibration={self.calibration!r})"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not _weights(model, lambda node: False):
            raise InputError(
                "nothing to prune: the model has no Conv/Gemm/MatMul with constant weights"
            )
        params_before = _parameters(model.graph)
        analysis = _ChannelAnalysis(model.graph, _Exclusions(self.exclude))
        analysis.run()
        removed = self._choose(analysis)
        # Measured on the unpruned model: what the removed channels carried on average.
        lost = (
            _lost_contributions(model, analysis, removed, self.calibration, self.provider)
            if self.calibration is not None
            else {}
        )
        self.removed = _apply(model.graph, analysis, removed)
        compensated = _compensate(model.graph, analysis, removed, lost)
        modified = bool(self.removed)
        if modified:
            for value in _affected(analysis, removed):
                value.shape = None
            common_passes.ShapeInferencePass()(model)
        self.summary = _channel_summary(analysis, removed, self.sparsity, self.norm)
        self.summary["parameters"] = [params_before, _parameters(model.graph)]
        self.summary["bias_compensated"] = compensated
        if compensated:
            self.summary["note"] += f"; bias compensated in {compensated} consumer(s)"
        logger.info("%r: %s", self, self.summary["note"])
        return ir.passes.PassResult(model, modified=modified)

    def _choose(self, analysis: _ChannelAnalysis) -> dict[int, np.ndarray]:
        """Per group root, the channels to remove, by the summed importance of its producers."""
        groups: dict[int, list[int]] = {}
        for space in range(len(analysis.spaces)):
            groups.setdefault(analysis.find(space), []).append(space)
        removed: dict[int, np.ndarray] = {}
        for root, members in groups.items():
            if any(m in analysis.blocked for m in members):
                continue
            score = sum(
                _norms(_const(s.node.inputs[1]), s.weight_axis, self.norm)
                for s in (analysis.spaces[m] for m in members)
            )
            size = analysis.spaces[root].size
            keep = _kept(size, self.sparsity, self.round_to)
            drop = np.sort(np.argsort(score, kind="stable")[: size - keep])
            for member in members:
                removed[member] = drop
        return removed


def _kept(size: int, sparsity: float, round_to: int) -> int:
    """Channels kept: ``(1 - sparsity) * size`` rounded to a multiple of ``round_to``."""
    keep = max(1, round(size * (1 - sparsity)))
    if round_to > 1 and size > round_to and sparsity > 0:
        keep = max(round_to, round(keep / round_to) * round_to)
    return min(keep, size)


def _apply(graph: ir.Graph, analysis: _ChannelAnalysis, removed: dict[int, np.ndarray]):
    """Slices parameters, fixes depthwise groups and Reshapes; returns what was removed."""
    edits: dict[tuple[ir.Node, int], list[tuple[int, np.ndarray]]] = {}
    for piece in analysis.slices:
        indices = piece.layout.removed(removed)
        if indices.size:
            edits.setdefault((piece.node, piece.index), []).append((piece.axis, indices))
    done = []
    for (node, index), cuts in edits.items():
        array = _const(node.inputs[index])
        for axis, indices in cuts:
            done.append(RemovedSlice(node.name or "", index, axis, tuple(int(i) for i in indices)))
        for axis, indices in sorted(cuts, key=lambda cut: -cut[0]):
            array = np.delete(array, indices, axis=axis)
        _replace_constant(graph, node, index, array)
    for node, layout in analysis.group_convs:
        cut = layout.removed(removed).size
        if cut:
            node.attributes["group"] = ir.AttrInt64("group", _attr(node, "group", 1) - cut)
    for node, layout in analysis.flattens:
        if layout.removed(removed).size:
            _reshape_to_flatten(node)
    return done


def _lost_contributions(
    model: ir.Model,
    analysis: _ChannelAnalysis,
    removed: dict[int, np.ndarray],
    calibration: CalibrationData,
    provider: str,
) -> dict[ir.Node, np.ndarray]:
    """Per consumer, the mean of what its removed input channels add to each output.

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
        weight = _const(piece.node.inputs[1]).astype(np.float64)
        rows = np.moveaxis(np.take(weight, indices, axis=piece.axis), piece.axis, 0)
        per_output = np.tensordot(mean[indices], rows, axes=1)  # (outputs, *kernel)
        lost[piece.node] = per_output.reshape(len(per_output), -1).sum(axis=1)
    return lost


def _channel_means(
    model: ir.Model, axes: Mapping[ir.Value, int], data: CalibrationData, provider: str
) -> dict[ir.Value, np.ndarray]:
    """Streams the calibration data and returns each value's mean along its channel axis.

    Only a running sum per channel is kept, so memory does not grow with the samples.
    """
    copy = _instrumented_copy(model)
    wanted = {value.name: value for value in axes}
    found = [v for node in copy.graph for v in node.outputs if v.name in wanted]
    typed = [v for v in found if v.type is not None]
    if len(typed) < len(wanted):
        # ONNX Runtime needs a type to return a value; those consumers go uncompensated.
        logger.warning("bias compensation skips %d untyped tensor(s)", len(wanted) - len(typed))
    present = {v.name for v in copy.graph.outputs}
    copy.graph.outputs.extend(v for v in typed if v.name not in present)
    names = [v.name for v in typed]
    if not names:
        return {}
    session = runtime.create_session(copy, provider=provider, optimization="disable")
    del copy
    sums = {name: np.zeros(0) for name in names}
    counts = dict.fromkeys(names, 0)
    for batch in data.batches():
        for name, array in zip(names, session.run(names, batch), strict=True):
            axis = axes[wanted[name]] % array.ndim
            other = tuple(i for i in range(array.ndim) if i != axis)
            total = array.sum(axis=other, dtype=np.float64)
            sums[name] = total if not sums[name].size else sums[name] + total
            counts[name] += array.size // max(array.shape[axis], 1)
    logger.info("bias compensation: channel means of %d tensors", len(names))
    return {wanted[n]: sums[n] / counts[n] for n in names if counts[n]}


def _compensate(
    graph: ir.Graph,
    analysis: _ChannelAnalysis,
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
    dtype = _const(node.inputs[1]).dtype
    if node.op_type == "Gemm":
        # Y = alpha * A @ B + beta * C: the lost term is scaled by alpha, C by beta.
        alpha, beta = _float_attr(node, "alpha"), _float_attr(node, "beta")
        if beta == 0:
            logger.info("bias compensation skips Gemm '%s': beta is 0", node.name)
            return False
        delta = delta * alpha / beta
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        node.resize_inputs(3)
        node.replace_input_with(2, _new_constant(graph, f"{node.name}.bias", delta.astype(dtype)))
        return True
    array = _const(bias)
    if array is None:
        logger.info("bias compensation skips '%s': its bias is not a constant", node.name)
        return False
    _replace_constant(graph, node, 2, (array + delta).astype(array.dtype))
    return True


def _add_after_matmul(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> None:
    """MatMul has no bias input: folds into the Add of a MatMul + bias pair, or adds one."""
    out = node.outputs[0]
    delta = delta.astype(_const(node.inputs[1]).dtype)
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output() and _is_standard(uses[0].node, "Add"):
        add, index = uses[0].node, 1 - uses[0].idx
        array = _const(add.inputs[index])
        if array is not None and array.ndim and array.shape[-1] == delta.size:
            _replace_constant(graph, add, index, (array + delta).astype(array.dtype))
            return
    biased = ir.Value(name=f"{out.name}.compensated", shape=out.shape, type=out.type)
    ir.convenience.replace_all_uses_with(out, biased, replace_graph_outputs=True)
    if biased.is_graph_output():  # the graph's interface keeps its names
        out.name, biased.name = biased.name, out.name
    bias = _new_constant(graph, f"{node.name}.bias", delta)
    graph.insert_after(
        node, ir.Node("", "Add", [out, bias], outputs=[biased], name=f"{node.name}.bias_add")
    )


def _new_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
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


def _float_attr(node: ir.Node, name: str) -> float:
    attr = node.attributes.get(name)
    return 1.0 if attr is None else attr.as_float()


def _replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
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


def _parameters(graph: ir.Graph) -> int:
    return sum(v.const_value.size for v in graph.initializers.values() if v.const_value is not None)


def _affected(analysis: _ChannelAnalysis, removed: dict[int, np.ndarray]) -> list[ir.Value]:
    """Values whose channel axis shrank (their shapes are inferred again)."""
    return [
        value
        for value, layout in analysis.layouts.items()
        if layout.removed(removed).size and not value.is_graph_output()
    ]


def _channel_summary(
    analysis: _ChannelAnalysis, removed: dict[int, np.ndarray], sparsity: float, norm: str
) -> dict[str, object]:
    reasons = {analysis.find(space): why for space, why in analysis.blocked.items()}
    layers, left = {}, {}
    for index, space in enumerate(analysis.spaces):
        name = space.node.name or ""
        cut = removed.get(index)
        layers[name] = [space.size, space.size - (0 if cut is None else cut.size)]
        if cut is None:
            left[name] = reasons.get(analysis.find(index), "excluded")
    # Totals over the layers that could be pruned: the layers left whole are listed apart.
    before = sum(v[0] for k, v in layers.items() if k not in left)
    after = sum(v[1] for k, v in layers.items() if k not in left)
    note = (
        f"removed {before - after} of {before} output channels "
        f"({100 * (before - after) / max(before, 1):.1f}%) in {len(layers) - len(left)} layers"
    )
    if left:
        note += f"; {len(left)} left whole (see left_unpruned)"
    return {
        "sparsity": sparsity,
        "importance": norm,
        "channels_before": before,
        "channels_after": after,
        "layers": layers,  # producer -> [channels before, after]
        "left_unpruned": left,  # producer -> why
        "note": note,
    }
