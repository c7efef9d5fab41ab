"""QDQ insertion: int8 QuantizeLinear/DequantizeLinear placed where ONNX Runtime fuses them.

ONNX Runtime turns ``DQ -> op -> Q`` node units into int8 kernels (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd/Mul/Concat/AveragePool/GlobalAveragePool/Sigmoid/LeakyRelu) and
drops ``DQ -> op -> Q`` around data-movement ops (Reshape, Transpose, MaxPool, ...) when
both sides share one scale. A Q/DQ pair that lands in no such unit is pure overhead, so
placement is driven by the ops, not by the tensors:

- every activation input of an int8 op gets ``Q -> DQ`` (one pair per tensor, shared);
- an int8 op's output gets ``Q -> DQ`` after its fused Relu/Clip (never between them:
  ONNX Runtime folds the activation into the Q); Gemm and MatMul outputs only when an
  int8 op consumes them (ONNX Runtime produces float from them directly); graph outputs
  never (one scale for packed boxes and scores would ruin the scores);
- an op whose neighbours are all fp32 stays fp32: a standalone Q and DQ cost more;
- data-movement ops take their input's scale and zero point, so the pair is dropped;
- weights become per-channel int8 behind a DequantizeLinear; Conv/Gemm biases int32 with
  ``scale = input_scale * weight_scale``.

Integer types come from ``onnxq.numerics`` (7-bit GEMM weights on x86 without VNNI).

A model that already carries Q/DQ (a QAT export, `onnxq.training.qat`) keeps it: an input
that comes from a DequantizeLinear is not quantized again, a weight already behind one
stays as given (a QuantizeLinear of a constant is folded into its integers), its bias
becomes int32 at the given scales, and data-movement ops after an existing
DequantizeLinear pass its scale on rather than a calibrated one.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError
from onnxq.numerics import Numerics
from onnxq.passes.calibrate import RANGE_KEY
from onnxq.passes.fuse import UNIT_KEY, fused_activation
from onnxq.passes.results import QDQResult

__all__ = [
    "HALF_PRECISION",
    "INT8_OPS",
    "SHARED_SCALE_OPS",
    "InsertQDQPass",
    "QuantParams",
    "quantize_weight",
]

logger = logging.getLogger(__name__)

# Ops with an int8 kernel in ONNX Runtime's CPU provider -> indices of their activation
# inputs (None: all inputs).
INT8_OPS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Mul": (0, 1),
    "Concat": None,
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "LeakyRelu": (0,),
    "Sigmoid": (0,),
    "Softmax": (0,),
}
# Softmax's int8 kernel costs accuracy in attention for little speed: opt-in only.
_OPT_IN = frozenset({"Softmax"})

# Ops that move data without changing values: their output shares the input's scale.
SHARED_SCALE_OPS = frozenset(
    {
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
        "Expand", "Tile", "Resize", "MaxPool", "Split",
    }
)  # fmt: skip

# Ops whose multiply-accumulates int8 speeds up; the other int8 ops only avoid conversions.
_MAC_OPS = frozenset({"Conv", "Gemm", "MatMul"})
# ONNX Runtime runs these as int8 with a float output when no Q follows them.
_FLOAT_OUTPUT_OPS = frozenset({"Gemm", "MatMul"})

_NO_KERNEL = "no int8 kernel in ONNX Runtime's CPU provider; stays fp32"

# Half-precision tensors would need half-precision scales and ONNX Runtime's CPU int8
# kernels take float32 ones; no --target changes that.
HALF_PRECISION = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_HALF_REASON = (
    "float16 tensors are left as they are, whatever --target (int8 QDQ here quantizes "
    "float32 computation); compile the model's float32 export for int8"
)


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one quantized activation tensor."""

    scale: float
    zero_point: int
    dtype: type

    @classmethod
    def from_range(cls, low: float, high: float, dtype: type) -> QuantParams:
        """Affine parameters covering ``[low, high]`` (widened to include 0)."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        info = np.iinfo(dtype)
        if dtype == np.int8:  # symmetric: zero point 0
            bound = max(abs(low), abs(high))
            scale = bound / info.max if bound > 0 else 1.0
            return cls(float(np.float32(scale)), 0, dtype)
        scale = (high - low) / (info.max - info.min) if high > low else 1.0
        scale = float(np.float32(scale))
        zero_point = int(np.clip(round(info.min - low / scale), info.min, info.max))
        return cls(scale, zero_point, dtype)


def _compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(
            f"exclude pattern '{pattern}' is not a valid regular expression: {e}"
        ) from None


def _is_float(value: ir.Value | None) -> bool:
    # float16 models would need float16 scales: they are left as they are.
    return value is not None and value.dtype == ir.DataType.FLOAT


def _is_half(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in HALF_PRECISION


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _producer_is(value: ir.Value, op_type: str) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == op_type


class InsertQDQPass(ir.passes.InPlacePass):
    """Inserts int8 QDQ around the ops ONNX Runtime runs in int8, with per-channel weights."""

    def __init__(
        self,
        numerics: Numerics,
        *,
        exclude: Sequence[str] = (),
        op_types: Sequence[str] = (),
        keep_fp32: Mapping[str, str] | None = None,
        drop_isolated: bool = True,
    ):
        """Configures the pass.

        Args:
            numerics: Integer formats for the target CPU or GPU.
            exclude: Regular expressions of node names that stay fp32 (the user's choice).
            op_types: When given, only these op types are quantized.
            keep_fp32: Node name -> reason, for nodes a search decided to keep fp32
                (accuracy or latency); the reason is reported as the node's.
            drop_isolated: Drop int8 nodes whose Q/DQ would stand alone (pure overhead).

        The result is a `QDQResult`; its ``scale_groups`` maps each quantized range (its
        source tensor's name) to the int8 nodes that use it: the units a precision search
        keeps fp32.
        """
        super().__init__()
        self.keep_fp32 = dict(keep_fp32 or {})
        self.drop_isolated = drop_isolated
        self.numerics = numerics
        self.exclude = tuple(exclude)
        self._exclude_re = [_compile_pattern(p) for p in exclude]
        self.op_types = tuple(op_types)

    def __repr__(self) -> str:
        return (
            f"InsertQDQPass(target={self.numerics.target!r}, exclude={list(self.exclude)}, "
            f"op_types={list(self.op_types)})"
        )

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError("per-channel DequantizeLinear needs opset >= 13")

    # ------------------------------------------------------------------ selection

    def _skip_reason(self, node: ir.Node) -> str | None:
        """Why ``node`` stays fp32, or None when it runs in int8."""
        if node.domain not in ("", "ai.onnx"):
            return f"custom domain '{node.domain}'"
        if any(p.fullmatch(node.name or "") for p in self._exclude_re):
            return "excluded by --exclude"
        if any(_is_half(v) for v in (*node.inputs, *node.outputs)):
            return _HALF_REASON
        if node.name in self.keep_fp32:
            return self.keep_fp32[node.name]
        if self.op_types and node.op_type not in self.op_types:
            return "op type not in --op-types"
        unit = node.meta.get(UNIT_KEY)
        if unit is not None and unit != node.name:
            return "inside a fused unit"
        if node.op_type not in INT8_OPS:
            return _NO_KERNEL
        if node.op_type in _OPT_IN and node.op_type not in self.op_types:
            return "int8 Softmax is opt-in (add it to the op types): it costs accuracy"
        for value in self._activation_inputs(node):
            if not _is_float(value):
                return "non-float input"
            # An input that already comes from a DequantizeLinear (QAT) keeps its scale.
            prequantized = _producer_is(value, "DequantizeLinear")
            if not _is_const(value) and not prequantized and RANGE_KEY not in value.meta:
                return f"no calibrated range for input '{value.name}'"
        if node.op_type == "Conv" and not _is_weight(node.inputs[1]):
            return "Conv weight is not a constant"
        if not _is_float(node.outputs[0]):
            return "non-float output"
        return None

    @staticmethod
    def _activation_inputs(node: ir.Node) -> list[ir.Value]:
        indices = INT8_OPS.get(node.op_type)
        inputs = (
            list(node.inputs)
            if indices is None
            else [node.inputs[i] for i in indices if i < len(node.inputs)]
        )
        if node.op_type in ("Gemm", "MatMul"):
            # A constant B is a weight (quantized per channel), not an activation.
            inputs = [v for i, v in enumerate(inputs) if not (i == 1 and _is_weight(v))]
        return [v for v in inputs if v is not None]

    def _unit_output(self, node: ir.Node) -> ir.Value | None:
        """The tensor that gets the node's output Q: after a fused activation."""
        activation = fused_activation(node)
        tail = activation if activation is not None else node
        if node.op_type == "MatMul" and activation is None:
            consumers = node.outputs[0].consumers()
            if len(consumers) == 1 and consumers[0].meta.get(UNIT_KEY) == node.name:
                # MatMul + bias Add unit: ONNX Runtime runs DQ->MatMul as
                # MatMulIntegerToFloat with the bias fused; a Q between would split it.
                return None
        return tail.outputs[0]

    # ------------------------------------------------------------------ call

    def call(self, model: ir.Model) -> QDQResult:
        graph = model.graph
        int8_nodes, skipped = self._select(graph)
        if self.drop_isolated:
            int8_nodes = self._drop_isolated(int8_nodes, skipped)
        tensors = self._tensors_to_quantize(graph, int8_nodes)
        details = self._summarize(graph, int8_nodes, skipped, tensors)
        scale_groups = self._scale_groups(tensors, int8_nodes)
        params = self._params(tensors)
        # Bias quantization needs the scale of each node's (now dequantized) input.
        dequantized = {
            self._insert_pair(graph, value, params[value]): params[value]
            for value in sorted(params, key=lambda v: v.name or "")
        }
        weights = _WeightQuantizer(graph, self.numerics)
        for node in int8_nodes:
            weights.quantize_node(node, dequantized)
        logger.info(
            "Quantized %d nodes, %d activation tensors, %d weights",
            len(int8_nodes),
            len(params),
            weights.count,
        )
        modified = bool(params) or weights.count > 0 or weights.folded > 0
        return QDQResult(model, modified=modified, details=details, scale_groups=scale_groups)

    def _select(self, graph: ir.Graph) -> tuple[list[ir.Node], dict[str, str]]:
        int8_nodes, skipped = [], {}
        for node in graph:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            if node.op_type in SHARED_SCALE_OPS:
                continue
            reason = self._skip_reason(node)
            if reason is None:
                int8_nodes.append(node)
            elif reason != "inside a fused unit":
                skipped[node.name or node.op_type] = f"{node.op_type}: {reason}"
        for node in graph:  # nodes in If/Loop bodies: left fp32, said so
            for attr in node.attributes.values():
                if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    skipped[node.name or node.op_type] = (
                        f"{node.op_type}: subgraph bodies are kept fp32"
                    )
        return int8_nodes, skipped

    def _drop_isolated(self, int8_nodes: list[ir.Node], skipped: dict[str, str]) -> list[ir.Node]:
        """Leaves fp32 the int8 candidates whose Q/DQ would cost more than int8 saves.

        - A node with no int8 neighbour on either side would pay a standalone
          QuantizeLinear on every input and a DequantizeLinear on every output (e.g. a conv
          between two HardSwish, which has no int8 kernel); fp32 also lets ONNX Runtime
          fuse the activation into the conv.
        - An op without multiply-accumulates (Add, Mul, Concat, pools, Sigmoid...) saves
          nothing by itself in int8: it stays int8 only when every input already is, so
          no standalone QuantizeLinear is added for it.

        Repeated until stable, as dropping one node can isolate its neighbours.
        """
        kept = set(int8_nodes)
        changed = True
        while changed:
            changed = False
            for node in [n for n in int8_nodes if n in kept]:
                reason = self._isolation(node, kept)
                if reason:
                    kept.discard(node)
                    skipped[node.name or node.op_type] = f"{node.op_type}: {reason}"
                    changed = True
        return [n for n in int8_nodes if n in kept]

    def _isolation(self, node: ir.Node, kept: set[ir.Node]) -> str | None:
        if node.op_type in _FLOAT_OUTPUT_OPS:
            return None  # no output DQ needed, so never isolated
        inputs = [v for v in self._activation_inputs(node) if not _is_const(v)]
        from_int8 = [self._from_int8(v, kept) for v in inputs]
        if node.op_type not in _MAC_OPS and not all(from_int8):
            return "an input is fp32; int8 would add a standalone Q for no compute saved"
        output = self._unit_output(node)
        if not any(from_int8) and not (output is not None and self._to_int8(output, kept)):
            return "isolated between fp32 ops; a standalone Q and DQ would cost more"
        return None

    @staticmethod
    def _head(node: ir.Node | None) -> ir.Node | None:
        """The unit head of a fused-unit member (e.g. the Conv of its Relu)."""
        if node is None or node.graph is None:
            return node
        unit = node.meta.get(UNIT_KEY)
        if unit is None or unit == node.name:
            return node
        return next((n for n in node.graph if n.name == unit), node)

    def _from_int8(self, value: ir.Value, kept: set[ir.Node]) -> bool:
        producer = self._head(value.producer())
        if producer is None:
            return False
        if producer.op_type == "DequantizeLinear":
            return True  # already quantized (a QAT model): its Q/DQ is paid for
        if producer.op_type in SHARED_SCALE_OPS and producer.inputs:
            return self._from_int8(producer.inputs[0], kept)
        return producer in kept

    def _to_int8(self, value: ir.Value, kept: set[ir.Node]) -> bool:
        for consumer in value.consumers():
            if consumer in kept or consumer.op_type == "QuantizeLinear":
                return True
            if consumer.op_type in SHARED_SCALE_OPS and consumer.inputs[0] is value:
                if any(self._to_int8(out, kept) for out in consumer.outputs):
                    return True
        return False

    def _tensors_to_quantize(
        self, graph: ir.Graph, int8_nodes: list[ir.Node]
    ) -> dict[ir.Value, ir.Value]:
        """Maps each tensor to quantize to the tensor whose range sets its parameters."""
        source: dict[ir.Value, ir.Value] = {}
        kept = set(int8_nodes)
        for node in int8_nodes:
            for value in self._activation_inputs(node):
                if not _is_const(value) and not _producer_is(value, "DequantizeLinear"):
                    source[value] = value
            output = self._unit_output(node)
            if node.op_type in _FLOAT_OUTPUT_OPS and output is not None:
                # QGemm and MatMulIntegerToFloat output float: a Q only pays when an
                # int8 op consumes the result.
                output = output if self._to_int8(output, kept) else None
            # Graph outputs stay fp32: detection heads often pack boxes and scores in
            # one tensor, which one int8 scale would ruin.
            if (
                output is not None
                and not output.is_graph_output()
                and not any(c.op_type == "QuantizeLinear" for c in output.consumers())
            ):
                source[output] = output
        # Data-movement ops: the output shares its input's parameters, so ONNX Runtime
        # can drop the DQ/Q pair around them. Topological order propagates chains. A
        # DequantizeLinear already in the model (QAT) passes its own parameters on, when an
        # int8 op reads the result: calibrating that tensor again would quantize it twice.
        for node in graph:
            if node.op_type not in SHARED_SCALE_OPS or not node.inputs:
                continue
            origin = source.get(node.inputs[0])
            if origin is None and _existing_params(node.inputs[0]) is not None:
                if any(self._to_int8(out, kept) for out in node.outputs):
                    origin = node.inputs[0]
            if origin is None or (
                node.name in self.keep_fp32
                or any(p.fullmatch(node.name or "") for p in self._exclude_re)
            ):
                continue
            for output in node.outputs:
                if _is_float(output) and not output.is_graph_output():
                    source[output] = origin
        return {
            v: s
            for v, s in source.items()
            if RANGE_KEY in s.meta or _existing_params(s) is not None
        }

    def _scale_groups(
        self, tensors: dict[ir.Value, ir.Value], int8_nodes: list[ir.Node]
    ) -> dict[str, list[str]]:
        """Each quantized range (by its source tensor) -> the int8 nodes it touches.

        Keeping all of a group's nodes fp32 removes that range's Q/DQ: its producer unit no
        longer quantizes its output and no int8 consumer quantizes it as an input.
        """
        kept = set(int8_nodes)
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for value, source in tensors.items():
            ends = [self._head(value.producer())] + [self._head(c) for c in value.consumers()]
            groups[source.name or ""].update(n.name for n in ends if n in kept and n.name)
        return {name: sorted(nodes) for name, nodes in sorted(groups.items()) if nodes}

    def _params(self, tensors: dict[ir.Value, ir.Value]) -> dict[ir.Value, QuantParams]:
        dtype = self.numerics.activation_dtype
        return {
            value: _existing_params(src) or QuantParams.from_range(*src.meta[RANGE_KEY], dtype)
            for value, src in tensors.items()
        }

    @staticmethod
    def _insert_pair(graph: ir.Graph, value: ir.Value, qp: QuantParams) -> ir.Value:
        """Routes every use of ``value`` through a new Q -> DQ pair; returns the DQ output.

        The dequantized tensor takes the original name (so fp32 and int8 models can be
        compared tensor by tensor); the original becomes ``<name>_prequant``. Graph
        inputs keep their names, and a graph input that is also a graph output stays one
        (passed through exactly, under its name).
        """
        name = value.name or "tensor"
        is_input = value in graph.inputs
        scale = _initializer(graph, f"{name}_scale", np.array(qp.scale, np.float32))
        zero_point = _initializer(graph, f"{name}_zero_point", np.array(qp.zero_point, qp.dtype))
        quantized = ir.Value(name=f"{name}_quantized")
        dequantized = ir.Value(
            name=f"{name}_dequantized" if is_input else name,
            type=value.type,
            shape=value.shape,
        )
        passed_through = [i for i, out in enumerate(graph.outputs) if out is value]
        value.replace_all_uses_with(dequantized, replace_graph_outputs=True)
        if is_input:
            # Outputs of the input itself stay it: exact, under the input's name.
            for index in passed_through:
                graph.outputs[index] = value
        else:
            value.name = f"{name}_prequant"
        q = ir.node(
            "QuantizeLinear",
            [value, scale, zero_point],
            outputs=[quantized],
            name=f"{name}_QuantizeLinear",
        )
        dq = ir.node(
            "DequantizeLinear",
            [quantized, scale, zero_point],
            outputs=[dequantized],
            name=f"{name}_DequantizeLinear",
        )
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:  # a graph input: quantize before everything
            graph.insert_before(graph.node(0), [q, dq])
        return dequantized

    def _summarize(
        self,
        graph: ir.Graph,
        int8_nodes: list[ir.Node],
        skipped: dict[str, str],
        tensors: dict[ir.Value, ir.Value],
    ) -> dict[str, object]:
        """Coverage over float-computing nodes: int8 units, shared-scale ops, fp32 rest."""
        heads = {n.name for n in int8_nodes}
        int8 = {n.name for n in int8_nodes}
        coverage: dict[str, dict[str, int]] = collections.defaultdict(
            lambda: {"quantized": 0, "total": 0}
        )
        for node in graph:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            if not any(_is_float(v) or _is_half(v) for v in node.outputs):
                skipped.pop(node.name or node.op_type, None)  # shape arithmetic, not compute
                continue
            in_unit = node.meta.get(UNIT_KEY) in heads
            shared = node.op_type in SHARED_SCALE_OPS and any(o in tensors for o in node.outputs)
            if in_unit or shared:
                int8.add(node.name)
            coverage[node.op_type]["total"] += 1
            coverage[node.op_type]["quantized"] += node.name in int8
        return {
            "numerics": self.numerics.describe(),
            "quantized_nodes": sorted(int8),
            "not_quantized": dict(sorted(skipped.items())),
            "quantized_tensors": len(tensors),
            "coverage": {k: dict(v) for k, v in sorted(coverage.items())},
        }


def _quantized_weight(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear of a weight quantized before compiling (a QAT export), if any.

    Its input is a constant integer tensor, or a QuantizeLinear of a constant (which
    onnxscript's folder leaves alone), and its scale and zero point are constants.
    """
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    if not all(_is_const(v) for v in dq.inputs[1:] if v is not None):
        return None
    source = dq.inputs[0]
    if _is_const(source):
        return dq
    q = source.producer()
    if (
        q is not None
        and q.op_type == "QuantizeLinear"
        and all(_is_const(v) for v in q.inputs if v is not None)
    ):
        return dq
    return None


def _is_weight(value: ir.Value | None) -> bool:
    """A float constant the pass quantizes, or a weight already quantized."""
    return _is_const(value) or _quantized_weight(value) is not None


def _existing_params(value: ir.Value) -> QuantParams | None:
    """Per-tensor parameters of a DequantizeLinear already in the model (QAT), if any."""
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale, zero_point = (producer.inputs[i] if len(producer.inputs) > i else None for i in (1, 2))
    if not _is_const(scale) or scale.const_value.size != 1:
        return None
    zp = zero_point.const_value.numpy() if _is_const(zero_point) else np.array(0, np.uint8)
    return QuantParams(float(scale.const_value.numpy().reshape(())), int(zp), zp.dtype.type)


def quantize_weight(
    weight: np.ndarray, axis: int | None, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a weight: ``(q, scale)``, per channel along ``axis``.

    Args:
        weight: The float weight.
        axis: The channel axis (None: one scale for the whole tensor).
        qmax: Largest magnitude (127, or 63 for 7-bit weights).

    Returns:
        The int8 weight and the float32 scales (shape ``[weight.shape[axis]]`` or ``[]``).
    """
    # One float32 temporary at most: a weight can be GBs (a 2.3 GB MatMul weight
    # peaked at 4x its size with astype's copy, abs, round and clip each allocating).
    w = np.asarray(weight, dtype=np.float32)
    reduce = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    amax = np.maximum(w.max(axis=reduce), -w.min(axis=reduce)).astype(np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = w / scale.reshape(shape)
    np.round(q, out=q)
    return np.clip(q, -qmax, qmax, out=q).astype(np.int8), scale


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = value.const_value.shape
    value.type = ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


class _WeightQuantizer:
    """Quantizes the constant weights and biases of int8 nodes (cached per tensor)."""

    def __init__(self, graph: ir.Graph, numerics: Numerics):
        self.graph = graph
        self.numerics = numerics
        self.count = 0
        self.folded = 0  # QuantizeLinear of constant weights folded into integers
        self._cache: dict[tuple[str, int, int], tuple[ir.Value, np.ndarray]] = {}

    def quantize_node(self, node: ir.Node, params: dict[ir.Value, QuantParams]) -> None:
        """Replaces ``node``'s weight (and bias) with int8 (int32) behind DequantizeLinear."""
        op = node.op_type
        if op == "Conv":
            self._weight_and_bias(node, 1, 0, self._conv_qmax(node), params)
        elif op == "Gemm" and _is_weight(node.inputs[1]):
            trans_b = node.attributes.get_int("transB", 0)
            self._weight_and_bias(node, 1, 0 if trans_b else 1, self.numerics.weight_qmax, params)
        elif op == "MatMul" and _is_weight(node.inputs[1]):
            weight = node.inputs[1]
            rank = len(weight.const_value.shape) if _is_const(weight) else 0
            self._weight(node, 1, 1 if rank == 2 else None, self.numerics.weight_qmax)
        else:
            self._constant_inputs(node)

    def _conv_qmax(self, node: ir.Node) -> int:
        if not _is_const(node.inputs[1]):
            return self.numerics.weight_qmax  # already quantized: kept as it is
        weight_shape = node.inputs[1].const_value.shape
        group = node.attributes.get_int("group", 1)
        if group > 1 and group == weight_shape[0] and weight_shape[1] == 1:
            return self.numerics.depthwise_weight_qmax
        return self.numerics.weight_qmax

    def _weight_and_bias(
        self, node: ir.Node, index: int, axis: int, qmax: int, params: dict
    ) -> None:
        weight_scale = self._weight(node, index, axis, qmax)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        x_params = params.get(node.inputs[0]) or _existing_params(node.inputs[0])
        if bias is None or not _is_const(bias) or x_params is None or weight_scale is None:
            return
        b = bias.const_value.numpy().astype(np.float64)
        if weight_scale.size == 1:
            weight_scale = np.full(b.shape, weight_scale.reshape(()), np.float32)
        if b.ndim != 1 or b.shape[0] != weight_scale.shape[0]:
            return  # broadcast Gemm C: left fp32
        scale = (x_params.scale * weight_scale).astype(np.float32)
        info = np.iinfo(np.int32)
        q = np.clip(np.round(b / scale.astype(np.float64)), info.min, info.max).astype(np.int32)
        self._replace_with_dq(node, 2, q, scale, np.zeros_like(q), axis=0)

    def _weight(self, node: ir.Node, index: int, axis: int | None, qmax: int) -> np.ndarray | None:
        value = node.inputs[index]
        dq = _quantized_weight(value)
        if dq is not None:
            return self._prequantized(dq, axis)
        key = (value.name or "", -1 if axis is None else axis, qmax)
        if key in self._cache:
            dq_out, scale = self._cache[key]
            node.replace_input_with(index, dq_out)
            return scale
        q, scale = quantize_weight(value.const_value.numpy(), axis, qmax)
        dq_out = self._replace_with_dq(node, index, q, scale, np.zeros_like(scale, np.int8), axis)
        self._cache[key] = (dq_out, scale)
        self.count += 1
        return scale

    def _prequantized(self, dq: ir.Node, axis: int | None) -> np.ndarray | None:
        """Keeps a weight quantized before compiling; returns its scales for the bias.

        A QuantizeLinear of a constant is folded into the integer constant it computes
        (ONNX rounds half to even, as NumPy does), so the file stores int8 weights.
        """
        scale = dq.inputs[1].const_value.numpy().astype(np.float32)
        q = None if _is_const(dq.inputs[0]) else dq.inputs[0].producer()
        if q is not None:
            w = q.inputs[0].const_value.numpy().astype(np.float32)
            zero_point = q.inputs[2] if len(q.inputs) > 2 else None
            zp = zero_point.const_value.numpy() if zero_point is not None else np.array(0, np.uint8)
            shape = [1] * w.ndim
            shape[q.attributes.get_int("axis", 1)] = -1

            def broadcast(a: np.ndarray) -> np.ndarray:
                return a.reshape(shape) if a.size > 1 else a.reshape(())

            ints = np.round(w / broadcast(scale)) + broadcast(zp.astype(np.float32))
            info = np.iinfo(zp.dtype)
            folded = np.clip(ints, info.min, info.max).astype(zp.dtype)
            name = f"{q.inputs[0].name or dq.name}_quantized"
            dq.replace_input_with(0, _initializer(self.graph, name, folded))
            self.folded += 1
        rank = len(dq.inputs[0].const_value.shape)
        if scale.size > 1 and dq.attributes.get_int("axis", 1) % rank != axis:
            return None  # scales along another axis than the output channels: no int32 bias
        return scale.reshape(-1)

    def _constant_inputs(self, node: ir.Node) -> None:
        """Per-tensor quantization of constant operands (e.g. Add/Mul by a constant)."""
        dtype = self.numerics.activation_dtype
        for index, value in enumerate(node.inputs):
            if (
                index in (INT8_OPS.get(node.op_type) or range(len(node.inputs)))
                and _is_const(value)
                and _is_float(value)
            ):
                array = value.const_value.numpy().astype(np.float32)
                qp = QuantParams.from_range(float(array.min()), float(array.max()), dtype)
                info = np.iinfo(dtype)
                q = np.clip(np.round(array / qp.scale) + qp.zero_point, info.min, info.max)
                self._replace_with_dq(
                    node,
                    index,
                    q.astype(dtype),
                    np.array(qp.scale, np.float32),
                    np.array(qp.zero_point, dtype),
                    axis=None,
                )

    def _replace_with_dq(
        self,
        node: ir.Node,
        index: int,
        q: np.ndarray,
        scale: np.ndarray,
        zero_point: np.ndarray,
        axis: int | None,
    ) -> ir.Value:
        original = node.inputs[index]
        name = original.name or f"{node.name}_input{index}"
        q_init = _initializer(self.graph, f"{name}_quantized", q)
        s_init = _initializer(self.graph, f"{name}_scale", scale)
        z_init = _initializer(self.graph, f"{name}_zero_point", zero_point)
        out = ir.Value(name=f"{name}_dequantized", type=original.type, shape=original.shape)
        attributes = {} if axis is None or scale.ndim == 0 else {"axis": axis}
        dq = ir.node(
            "DequantizeLinear",
            [q_init, s_init, z_init],
            attributes=attributes,
            outputs=[out],
            name=f"{name}_DequantizeLinear",
        )
        self.graph.insert_before(node, dq)
        node.replace_input_with(index, out)
        return out
