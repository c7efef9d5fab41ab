"""Dynamic int8: constant-weight MatMul/Gemm and LSTM in ONNX Runtime's dynamic-quantized form.

No calibration: activations are quantized at run time, per tensor, by
``DynamicQuantizeLinear`` (uint8, asymmetric, from each run's own min and max); weights are
quantized ahead of time, int8 symmetric, per output column where that pays (see
`weight_granularity`). A MatMul or Gemm becomes::

    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul(x_s * W_s)
                                                                       [-> Add(bias)]

the standard-ONNX form ``onnxruntime.quantization.quantize_dynamic`` also writes, which
ONNX Runtime's CPU provider fuses at session creation into one ``DynamicQuantizeMatMul``
(bias included; ``MatMulIntegerToFloat`` when the quantized input is shared). An LSTM
becomes ``com.microsoft.DynamicQuantizeLSTM`` (weights transposed to ``[dirs, in, 4H]``,
per-channel scales ``[dirs, 4H]``). An embedding table (Gather of a constant 2-D table)
is stored uint8 (per tensor, asymmetric); the rows looked up are dequantized.

Left fp32, with the reason in the result:

- a MatMul whose both inputs are activations (attention's Q.K^T and P.V): nothing to
  quantize ahead of time, and quantizing both at run time costs more than it saves;
- computation on values derived only from integer or boolean graph inputs (attention
  masks, positions): their exact values (0/1, -1e4, indices) matter, not their range;
- Conv, unless asked (``conv=True``): ONNX Runtime's ``ConvInteger`` has no fused
  kernel and its dequantizing Cast/Mul run on the whole output, so it is usually slower
  than fp32 Conv; the compile measures it on the compiling machine and asks only when it
  pays (`onnxq.compiler`). Asked, a Conv becomes ``DynamicQuantizeLinear(x) ->
  ConvInteger(x_q, W_q) -> Cast -> Mul(x_s * W_s) [-> Add(bias)]``, int8 weights with
  per-output-channel scales and one zero point (ONNX Runtime's kernel takes no other);
- GRU and RNN: ONNX Runtime has no dynamic-quantized kernel for them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxq.numerics import Numerics
from onnxq.passes.qdq import (
    QuantParams,
    _compile_pattern,
    _initializer,
    _is_const,
    _is_float,
    quantize_weight,
)
from onnxq.passes.results import DetailedPassResult

__all__ = [
    "CONV_NOT_ASKED",
    "DYNAMIC_OPS",
    "PER_COLUMN_MIN_GAIN_DB",
    "DynamicQuantResult",
    "QuantizeDynamicPass",
    "weight_granularity",
]

logger = logging.getLogger(__name__)

# The op types dynamic int8 considers; coverage and reasons are reported over these.
DYNAMIC_OPS = frozenset({"MatMul", "Gemm", "LSTM", "GRU", "RNN", "Conv", "ConvTranspose"})
_MS_DOMAIN = "com.microsoft"
# Per-column MatMul weight scales must cut the weight's quantization noise by this much
# (dB) to be worth their run-time cost (see `weight_granularity`).
PER_COLUMN_MIN_GAIN_DB = 1.0
# Ops that select from their first input by the indices in the others: their output
# carries the data's values, not the indices' (an embedding lookup is no mask).
_SELECTORS = frozenset({"Gather", "GatherElements", "GatherND"})

_BOTH_ACTIVATIONS = (
    "both inputs are activations (no constant weight): dynamic int8 quantizes weights "
    "ahead of time, and quantizing both inputs at run time costs more than it saves"
)
_FROM_INTEGERS = (
    "its input is computed only from integer/boolean model inputs (mask or position "
    "arithmetic): exact values, not a range, matter; stays fp32"
)
CONV_NOT_ASKED = (
    "ONNX Runtime's ConvInteger has no fused kernel and is usually slower than fp32 Conv: "
    "dynamic mode keeps Conv fp32 unless measured to pay"
)
_NO_KERNEL = {
    "Conv": CONV_NOT_ASKED,
    "ConvTranspose": "no dynamic int8 ConvTranspose kernel in ONNX Runtime; stays fp32",
    "GRU": "ONNX Runtime has no dynamic-quantized GRU kernel (com.microsoft has "
    "DynamicQuantizeLSTM only); stays fp32",
    "RNN": "ONNX Runtime has no dynamic-quantized RNN kernel; stays fp32",
}


@dataclasses.dataclass
class DynamicQuantResult(DetailedPassResult):
    """Dynamic int8 quantization.

    ``details`` holds ``numerics``, ``quantized_nodes``, ``not_quantized`` (node -> why it
    stays fp32) and ``coverage`` (op type -> ``{quantized, total}``), the keys of
    `onnxq.passes.results.QDQResult`, so the compile report reads both alike; and
    ``weight_scales`` (MatMul/Gemm node -> ``per-column`` or ``per-tensor``).
    """


def weight_granularity(
    weight: np.ndarray, qmax: int, min_gain_db: float = PER_COLUMN_MIN_GAIN_DB
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A ``[K, N]`` weight in int8, per column or per tensor: ``(q, scale, per_column)``.

    Per-column scales cost run time in ONNX Runtime's fused dynamic kernels
    (``DynamicQuantizeMatMul``/``MatMulIntegerToFloat``): measured at M=1024, 1 thread,
    AVX-512 VNNI, ORT 1.32, the per-column output scaling took 6-8% more than one scale
    at K=256 and 2% at K=1024 (the scaling is per output element, the product per K).
    So a weight gets per-column scales only where they cut its quantization noise by at
    least ``min_gain_db`` (columns of different ranges, as trained weights have); where
    the columns' ranges are alike (e.g. uniform initialisations), one scale is as
    faithful and faster.
    """
    q_col, s_col = quantize_weight(weight, 1, qmax)
    q_all, s_all = quantize_weight(weight, None, qmax)
    w = np.asarray(weight, dtype=np.float32)
    noise_col = float(np.square(q_col * s_col - w, dtype=np.float64).sum())
    noise_all = float(np.square(q_all * s_all - w, dtype=np.float64).sum())
    if noise_all <= noise_col * 10 ** (min_gain_db / 10):
        return q_all, s_all, False
    return q_col, s_col, True


def integer_derived(graph: ir.Graph) -> set[ir.Value]:
    """Values computed only from integer/boolean graph inputs (and constants).

    Masks and positions: ``Cast(mask) -> Sub -> Mul(-1e4)``, ``Cast(arange)``. A value is
    integer-derived when every non-constant input of its producer is; for Gather and the
    like only the data input counts, so an embedding looked up by token ids is not.
    """
    derived: set[ir.Value] = {
        v for v in graph.inputs if v.dtype is not None and not v.dtype.is_floating_point()
    }
    for node in graph:  # topologically sorted by the cleanup stage
        inputs = node.inputs[:1] if node.op_type in _SELECTORS else node.inputs
        live = [v for v in inputs if v is not None and not _is_constant(v)]
        if live and all(v in derived for v in live):
            derived.update(node.outputs)
    return derived


def _is_constant(value: ir.Value) -> bool:
    # Small constants stay Constant nodes (cleanup lifts only larger ones to initializers).
    producer = value.producer()
    return _is_const(value) or (producer is not None and producer.op_type == "Constant")


def _is_table_lookup(node: ir.Node) -> bool:
    """An embedding lookup: Gather of rows of a constant 2-D float32 table by run-time ids.

    Stored int8 (one scale, 127 levels), looked up, and only the rows looked up
    dequantized: the table shrinks 4x for about the cost of one elementwise op on the
    rows (ONNX Runtime's ``quantize_dynamic`` stores tables as uint8 likewise).
    """
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return False
    table, ids = node.inputs[0], node.inputs[1]
    return (
        _is_const(table)
        and _is_float(table)
        and len(table.const_value.shape) == 2
        and ids is not None
        and not _is_const(ids)
    )


class QuantizeDynamicPass(ir.passes.InPlacePass):
    """Rewrites constant-weight MatMul/Gemm, LSTM and embedding tables into dynamic int8."""

    def __init__(
        self,
        numerics: Numerics,
        *,
        exclude: Sequence[str] = (),
        op_types: Sequence[str] = (),
        conv: bool = False,
    ):
        """Configures the pass.

        Args:
            numerics: The target's weight range (7-bit weights where u8s8 GEMM can
                saturate, as for static int8).
            exclude: Regular expressions of node names that stay fp32.
            op_types: When given, only these op types are quantized.
            conv: Rewrite Conv as ConvInteger too (see the module docstring).
        """
        super().__init__()
        self.conv = conv
        self.numerics = numerics
        self.exclude = tuple(exclude)
        self._exclude_re = [_compile_pattern(p) for p in exclude]
        self.op_types = tuple(op_types)
        self._activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self._weights: dict[tuple[str, bool], tuple[ir.Value, ir.Value, ir.Value, bool]] = {}
        self._scales: dict[str, str] = {}

    def __repr__(self) -> str:
        return (
            f"QuantizeDynamicPass(target={self.numerics.target!r}, "
            f"exclude={list(self.exclude)}, op_types={list(self.op_types)}"
            + (", conv=True)" if self.conv else ")")
        )

    def call(self, model: ir.Model) -> DynamicQuantResult:
        graph = model.graph
        self._activations, self._weights, self._scales = {}, {}, {}
        from_integers = integer_derived(graph)
        quantized: list[str] = []
        skipped: dict[str, str] = {}
        coverage: dict[str, dict[str, int]] = collections.defaultdict(
            lambda: {"quantized": 0, "total": 0}
        )
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type not in DYNAMIC_OPS and not _is_table_lookup(node):
                continue
            name = node.name or node.op_type
            coverage[node.op_type]["total"] += 1
            reason = self._skip_reason(node, from_integers)
            if reason is not None:
                skipped[name] = reason
                continue
            rewrite = {
                "LSTM": self._rewrite_lstm,
                "Gather": self._rewrite_gather,
                "Conv": self._rewrite_conv,
            }
            rewrite.get(node.op_type, self._rewrite_matmul)(graph, node)
            quantized.append(name)
            coverage[node.op_type]["quantized"] += 1
        if "LSTM" in coverage and coverage["LSTM"]["quantized"]:
            model.opset_imports.setdefault(_MS_DOMAIN, 1)
        logger.info("Dynamic int8: %d nodes quantized, %d kept fp32", len(quantized), len(skipped))
        details = {
            "numerics": {**self.numerics.describe(), "activations": "uint8, dynamic per tensor"},
            "quantized_nodes": sorted(quantized),
            "not_quantized": dict(sorted(skipped.items())),
            "coverage": {k: dict(v) for k, v in sorted(coverage.items())},
            "weight_scales": dict(sorted(self._scales.items())),
        }
        return DynamicQuantResult(model, modified=bool(quantized), details=details)

    # ------------------------------------------------------------------ selection

    def _skip_reason(self, node: ir.Node, from_integers: set[ir.Value]) -> str | None:
        """Why ``node`` stays fp32, or None when it is rewritten."""
        if any(p.fullmatch(node.name or "") for p in self._exclude_re):
            return "excluded by --exclude"
        if self.op_types and node.op_type not in self.op_types:
            return "op type not in --op-types"
        if node.op_type in _NO_KERNEL and not (node.op_type == "Conv" and self.conv):
            return _NO_KERNEL[node.op_type]
        if node.op_type == "Gather":
            return None  # a table lookup (see _is_table_lookup)
        x = node.inputs[0]
        # An LSTM's Y output may be unused (no type inferred): its input decides.
        if not _is_float(x) or not any(_is_float(v) for v in node.outputs):
            return "not float32 computation"
        if x in from_integers:
            return _FROM_INTEGERS
        if node.op_type == "LSTM":
            return self._lstm_reason(node)
        if node.op_type == "Conv":
            w = node.inputs[1]
            if not _is_const(w) or not _is_float(w):
                return "Conv weight is not a constant float32 tensor"
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and not _is_const(bias):
                return "Conv bias is not a constant"
            return None
        weight = node.inputs[1]
        if _is_const(x) or not _is_const(weight):
            return _BOTH_ACTIVATIONS if not _is_const(weight) else "constant activation input"
        if not _is_float(weight) or len(weight.const_value.shape) != 2:
            return "weight is not a 2-D float32 matrix (MatMulInteger's per-column scales)"
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
                return "Gemm with transA or alpha != 1 (not rewritten; stays fp32)"
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and attrs.get_float("beta", 1.0) != 1.0:
                return "Gemm with beta != 1 (not rewritten; stays fp32)"
        return None

    @staticmethod
    def _lstm_reason(node: ir.Node) -> str | None:
        w, r = node.inputs[1], node.inputs[2]
        if not (_is_const(w) and _is_const(r)):
            return "LSTM weights are not constants"
        if node.attributes.get_int("layout", 0) != 0:
            return "LSTM with layout=1 (DynamicQuantizeLSTM takes sequence-first input)"
        if len(node.inputs) > 7 and node.inputs[7] is not None:
            return "LSTM with peepholes (not rewritten; stays fp32)"
        return None

    # ------------------------------------------------------------------ rewriting

    def _quantized_input(
        self, graph: ir.Graph, node: ir.Node
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``DynamicQuantizeLinear`` of ``node``'s input 0, once per tensor (shared)."""
        x = node.inputs[0]
        if x not in self._activations:
            base = x.name or f"{node.name}_input"
            outputs = [
                ir.Value(name=f"{base}_dynq", type=ir.TensorType(ir.DataType.UINT8), shape=x.shape),
                ir.Value(name=f"{base}_dynq_scale", type=ir.TensorType(ir.DataType.FLOAT)),
                ir.Value(name=f"{base}_dynq_zero_point", type=ir.TensorType(ir.DataType.UINT8)),
            ]
            quantize = ir.node(
                "DynamicQuantizeLinear", [x], outputs=outputs, name=f"{base}_DynamicQuantize"
            )
            producer = x.producer()
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, quantize)
            else:  # a graph input
                graph.insert_before(graph.node(0), quantize)
            self._activations[x] = (outputs[0], outputs[1], outputs[2])
        return self._activations[x]

    def _matmul_weight(
        self, graph: ir.Graph, weight: ir.Value, transposed: bool
    ) -> tuple[ir.Value, ir.Value, ir.Value, bool]:
        """int8 ``[K, N]`` weight, scales, zero point, per-column? (cached per tensor)."""
        key = (weight.name or "", transposed)
        if key not in self._weights:
            w = weight.const_value.numpy()
            q, scale, per_column = weight_granularity(
                w.T if transposed else w, self.numerics.weight_qmax
            )
            name = weight.name or "weight"
            self._weights[key] = (
                _initializer(graph, f"{name}_dynq", q),
                _initializer(graph, f"{name}_dynq_scale", scale),
                # One zero point either way: all are 0 (symmetric), and one is what the
                # fused kernels read fastest.
                _initializer(graph, f"{name}_dynq_zero_point", np.array(0, np.int8)),
                per_column,
            )
        return self._weights[key]

    def _rewrite_matmul(self, graph: ir.Graph, node: ir.Node) -> None:
        x_q, x_scale, x_zp = self._quantized_input(graph, node)
        trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        w_q, w_scale, w_zp, per_column = self._matmul_weight(graph, node.inputs[1], trans_b)
        base = node.name or node.op_type
        self._scales[base] = "per-column" if per_column else "per-tensor"
        product = ir.node("MatMulInteger", [x_q, w_q, x_zp, w_zp], name=f"{base}_MatMulInteger")
        as_float = ir.node("Cast", product.outputs, attributes={"to": ir.DataType.FLOAT})
        scales = ir.node("Mul", [x_scale, w_scale], name=f"{base}_scales")
        result = ir.node("Mul", [as_float.outputs[0], scales.outputs[0]], name=f"{base}_dequant")
        new = [product, as_float, scales, result]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            new.append(ir.node("Add", [result.outputs[0], bias], name=f"{base}_bias"))
        as_float.name = f"{base}_cast"
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]]
        )

    def _rewrite_conv(self, graph: ir.Graph, node: ir.Node) -> None:
        x_q, x_scale, x_zp = self._quantized_input(graph, node)
        w = node.inputs[1].const_value.numpy()  # [M, C/group, k...]
        q, scale = quantize_weight(w.reshape(w.shape[0], -1), 0, self.numerics.weight_qmax)
        name = node.inputs[1].name or "conv_weight"
        base = node.name or "Conv"
        # Per output channel, broadcast over [N, M, spatial...].
        channel_shape = (1, -1, *([1] * (w.ndim - 2)))
        w_q = _initializer(graph, f"{name}_dynq", q.reshape(w.shape))
        w_zp = _initializer(graph, f"{name}_dynq_zero_point", np.array(0, np.int8))
        w_scale = _initializer(graph, f"{name}_dynq_scale", scale.reshape(channel_shape))
        attributes = {k: v for k, v in node.attributes.items()}
        product = ir.node(
            "ConvInteger", [x_q, w_q, x_zp, w_zp], attributes=attributes, name=f"{base}_ConvInteger"
        )
        as_float = ir.node(
            "Cast", product.outputs, attributes={"to": ir.DataType.FLOAT}, name=f"{base}_cast"
        )
        scales = ir.node("Mul", [x_scale, w_scale], name=f"{base}_scales")
        result = ir.node("Mul", [as_float.outputs[0], scales.outputs[0]], name=f"{base}_dequant")
        new = [product, as_float, scales, result]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            b = bias.const_value.numpy().reshape(channel_shape)
            b_value = _initializer(graph, f"{bias.name or base}_dynq_bias", b.astype(np.float32))
            new.append(ir.node("Add", [result.outputs[0], b_value], name=f"{base}_bias"))
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]]
        )

    def _rewrite_lstm(self, graph: ir.Graph, node: ir.Node) -> None:
        w_q, w_scale, w_zp = self._lstm_weight(graph, node.inputs[1])
        r_q, r_scale, r_zp = self._lstm_weight(graph, node.inputs[2])
        inputs = [*node.inputs[:8]] + [None] * (8 - len(node.inputs))
        inputs[1], inputs[2] = w_q, r_q
        attributes = {k: v for k, v in node.attributes.items() if k != "layout"}
        outputs = [ir.Value(name=f"{v.name}_dynq" if v.name else None) for v in node.outputs]
        lstm = ir.node(
            "DynamicQuantizeLSTM",
            [*inputs, w_scale, w_zp, r_scale, r_zp],
            attributes=attributes,
            domain=_MS_DOMAIN,
            outputs=outputs,
            name=f"{node.name or 'LSTM'}_dynq",
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [lstm], list(node.outputs), outputs
        )

    def _rewrite_gather(self, graph: ir.Graph, node: ir.Node) -> None:
        """Looks rows up in a uint8 table, then dequantizes only the rows looked up."""
        table = node.inputs[0]
        # One scale for the table: ONNX Runtime's per-axis DequantizeLinear is a slow path
        # (the zoo LSTM's lookup took 2.3x its fp32 time per column, 1.0x per tensor).
        # uint8 over [min, max], not int8 over +-max: all 256 levels cover the table's
        # values even where its range is lopsided (the zoo encoder's logits: 1 dB nearer
        # fp32 than with int8 tables, the same form as ONNX Runtime's quantize_dynamic).
        w = table.const_value.numpy()
        params = QuantParams.from_range(w.min(), w.max(), np.uint8)
        q = np.clip(np.round(w / np.float32(params.scale)) + params.zero_point, 0, 255)
        zero_point = np.array(params.zero_point, np.uint8)
        name = table.name or "table"
        base = node.name or "Gather"
        lookup = ir.node(
            "Gather",
            [_initializer(graph, f"{name}_dynq", q.astype(np.uint8)), node.inputs[1]],
            attributes={"axis": 0},
            name=f"{base}_int8",
        )
        dequantize = ir.node(
            "DequantizeLinear",
            [
                lookup.outputs[0],
                _initializer(graph, f"{name}_dynq_scale", np.array(params.scale, np.float32)),
                _initializer(graph, f"{name}_dynq_zero_point", zero_point),
            ],
            name=f"{base}_dequantize",
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [lookup, dequantize], [node.outputs[0]], dequantize.outputs
        )

    def _lstm_weight(self, graph: ir.Graph, weight: ir.Value) -> tuple[ir.Value, ...]:
        """LSTM ``W``/``R`` ``[dirs, 4H, in]`` as int8 ``[dirs, in, 4H]``, scales ``[dirs, 4H]``."""
        w = weight.const_value.numpy()
        dirs, gates, width = w.shape
        q, scale = quantize_weight(w.reshape(dirs * gates, width), 0, self.numerics.weight_qmax)
        q = np.ascontiguousarray(q.reshape(dirs, gates, width).transpose(0, 2, 1))
        scale = scale.reshape(dirs, gates)
        name = weight.name or "lstm_weight"
        return (
            _initializer(graph, f"{name}_dynq", q),
            _initializer(graph, f"{name}_dynq_scale", scale),
            _initializer(graph, f"{name}_dynq_zero_point", np.zeros_like(scale, np.int8)),
        )
