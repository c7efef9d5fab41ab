"""QuantizeDynamicPass: where dynamic int8 fires, where it must not, and its numerics on ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_builders import build_model, seeded
from ort_helpers import op_types, ort_outputs, to_ir

from onnxq import runtime
from onnxq.config import CompileConfig
from onnxq.evaluate import sqnr_db
from onnxq.numerics import numerics_for
from onnxq.passes.dynamic import QuantizeDynamicPass, integer_derived, weight_granularity
from onnxq.pipeline import build_pipeline
from onnxq.recording import run_pipeline

# Dynamic int8 (uint8 activations per tensor, int8 per-channel weights) on Gaussian data
# measures ~40 dB on these nets; 30 dB leaves room for 7-bit weights (avx2) and noise
# while failing on any wrong scale, layout or transposition (those give < 5 dB).
SQNR_FLOOR_DB = 30.0
# The LSTM compounds the error over 16 steps through its state: a looser floor.
LSTM_SQNR_FLOOR_DB = 25.0

MLP = """
mlp (float[N,64] x) => (float[N,16] y) {
    [mm] a = MatMul (x, w1)
    [relu] r = Relu (a)
    [gemm] y = Gemm <transB = 1> (r, w2, b2)
}
"""


def _mlp():
    normal = seeded(0)
    weights = {"w1": normal(64, 32, scale=0.2), "w2": normal(16, 32, scale=0.2), "b2": normal(16)}
    return build_model(MLP, weights)


def _quantize(proto: onnx.ModelProto, **kwargs):
    model = to_ir(onnx.shape_inference.infer_shapes(proto))
    result = QuantizeDynamicPass(numerics_for("vnni"), **kwargs)(model)
    return model, result


def _optimized_ops(model, tmp_path) -> list[str]:
    path = tmp_path / "optimized.onnx"
    runtime.create_session(model, optimization="all", threads=1, optimized_model_path=path)
    return [n.op_type for n in onnx.load(path).graph.node]


def test_matmul_and_gemm_become_fused_dynamic_int8(tmp_path):
    proto = _mlp()
    model, result = _quantize(proto)
    assert result.modified
    assert result.details["quantized_nodes"] == ["gemm", "mm"]
    assert op_types(model).count("MatMulInteger") == 2
    assert "MatMul" not in op_types(model) and "Gemm" not in op_types(model)
    # ONNX Runtime fuses the standard-ONNX form into its dynamic int8 kernels.
    fused = _optimized_ops(model, tmp_path)
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 2
    x = {"x": seeded(1)(8, 64)}
    ref, got = ort_outputs(proto, x)["y"], runtime.run(runtime.create_session(model), x)["y"]
    assert sqnr_db(ref, got) > SQNR_FLOOR_DB


def test_weights_are_per_channel_int8():
    model, _ = _quantize(_mlp())
    scales = [v.const_value.numpy() for k, v in model.graph.initializers.items() if "scale" in k]
    assert sorted(s.shape for s in scales) == [(16,), (32,)]
    weights = [v for v in model.graph.initializers.values() if v.dtype == onnx.TensorProto.INT8]
    assert {v.name for v in weights} >= {"w1_dynq", "w2_dynq"}


def test_both_activations_matmul_stays_fp32():
    proto = build_model(
        """
        attn (float[N,8,16] q, float[N,8,16] k) => (float[N,8,8] s) {
            [kt] t = Transpose <perm = [0, 2, 1]> (k)
            [scores] s = MatMul (q, t)
        }
        """
    )
    model, result = _quantize(proto)
    assert not result.modified
    assert "both inputs are activations" in result.details["not_quantized"]["scores"]
    assert "MatMulInteger" not in op_types(model)


def test_mask_and_position_arithmetic_stays_fp32():
    normal = seeded(2)
    proto = build_model(
        """
        enc (int64[N,L] ids, int64[N,L] mask) => (float[N,L,8] y, float[N,L,8] p) {
            [embed] e = Gather (table, ids)
            [proj] h = MatMul (e, w)
            [mask_f] m = Cast <to = 1> (mask)
            [mask_u] mu = Unsqueeze (m, axis)
            [mask_bias] mb = Mul (mu, big)
            [masked] y = Add (h, mb)
            [pos_proj] p = MatMul (mu, wp)
        }
        """,
        {
            "table": normal(50, 8),
            "w": normal(8, 8),
            "axis": np.array([2], np.int64),
            "big": np.array(-1e4, np.float32),
            "wp": normal(1, 8),
        },
    )
    model, result = _quantize(proto)
    # The embedding looked up by ids carries the table's values: table and projection
    # are quantized (the table stored uint8, the rows looked up dequantized).
    assert result.details["quantized_nodes"] == ["embed", "proj"]
    assert "DequantizeLinear" in op_types(model)
    assert "integer/boolean model inputs" in result.details["not_quantized"]["pos_proj"]
    derived = {v.name for v in integer_derived(model.graph)}
    assert {"m", "mu", "mb"} <= derived
    assert not {"e", "h", "y"} & derived
    feeds = {"ids": np.arange(6).reshape(1, 6), "mask": np.array([[1, 1, 1, 0, 0, 1]])}
    got, ref = runtime.run(runtime.create_session(model), feeds), ort_outputs(proto, feeds)
    np.testing.assert_array_equal(got["p"], ref["p"])
    # y is h (int8) plus the exact mask bias: compare the unmasked positions.
    keep = feeds["mask"][0] == 1
    assert sqnr_db(ref["y"][0, keep], got["y"][0, keep]) > SQNR_FLOOR_DB


@pytest.mark.parametrize(
    ("graph", "node", "fragment"),
    [
        (
            "c (float[1,3,8,8] x) => (float[1,4,6,6] y) { [conv] y = Conv (x, w) }",
            "conv",
            "ConvInteger",
        ),
        (
            "g (float[5,1,4] x) => (float[5,1,1,8] y) "
            "{ [gru] y = GRU <hidden_size = 8> (x, w, r) }",
            "gru",
            "no dynamic-quantized GRU",
        ),
    ],
    ids=["conv", "gru"],
)
def test_ops_without_a_paying_dynamic_kernel_stay_fp32(graph, node, fragment):
    normal = seeded(3)
    weights = (
        {"w": normal(4, 3, 3, 3)}
        if node == "conv"
        else {"w": normal(1, 24, 4), "r": normal(1, 24, 8)}
    )
    _, result = _quantize(build_model(graph, weights))
    assert not result.modified
    assert fragment in result.details["not_quantized"][node]


def test_exclude_and_op_types_keep_nodes_fp32():
    _, result = _quantize(_mlp(), exclude=["mm"])
    assert result.details["quantized_nodes"] == ["gemm"]
    assert result.details["not_quantized"]["mm"] == "excluded by --exclude"
    _, result = _quantize(_mlp(), op_types=["MatMul"])
    assert result.details["quantized_nodes"] == ["mm"]


def test_lstm_zoo_model_becomes_dynamic_quantize_lstm(tmp_path):
    torch = pytest.importorskip("torch")
    from onnxq.export import export_torch
    from onnxq.models import lstm

    path = tmp_path / "lstm.onnx"
    export_torch(lstm(), (1, 16), path, input_dtype=torch.int64, exporter="torchscript")
    model = to_ir(onnx.load(path))
    steps = build_pipeline(CompileConfig(mode="dynamic", target="vnni"), opset=17)
    model, _ = run_pipeline(model, steps)
    assert "DynamicQuantizeLSTM" in op_types(model)
    assert "LSTM" not in op_types(model)
    tokens = {"input": np.random.default_rng(0).integers(0, 1000, (8, 16))}
    ref = ort_outputs(path, tokens)["output"]
    got = runtime.run(runtime.create_session(model), tokens)["output"]
    assert sqnr_db(ref, got) > LSTM_SQNR_FLOOR_DB


def test_gather_of_activations_or_integers_is_no_table_lookup():
    proto = build_model(
        """
        g (float[N,8] x, int64[3] ids) => (float[3,8] y, int64[1] d) {
            [rows] y = Gather (x, ids)
            [shape] s = Shape (x)
            [dim] d = Gather (s, first)
        }
        """,
        {"first": np.array([0], np.int64)},
    )
    model, result = _quantize(proto)
    assert not result.modified and result.details["coverage"] == {}
    assert op_types(model) == ["Gather", "Shape", "Gather"]


CONV_NET = """
c (float[N,8,16,16] x) => (float[N,16,16,16] y) {
    [conv] c = Conv <pads = [1, 1, 1, 1], group = 1> (x, w, b)
    [relu] r = Relu (c)
    [dw] y = Conv <pads = [1, 1, 1, 1], group = 16> (r, wd)
}
"""


def _conv_net() -> onnx.ModelProto:
    normal = seeded(7)
    return build_model(
        CONV_NET,
        {"w": normal(16, 8, 3, 3, scale=0.2), "b": normal(16), "wd": normal(16, 1, 3, 3)},
    )


def test_conv_becomes_conv_integer_when_asked():
    proto = _conv_net()
    model, result = _quantize(proto, conv=True)
    assert sorted(result.details["quantized_nodes"]) == ["conv", "dw"]
    ops = op_types(model)
    assert ops.count("ConvInteger") == 2 and "Conv" not in ops
    x = {"x": seeded(8)(2, 8, 16, 16)}
    # Per-channel weights and dynamic activations: ~35 dB measured; a wrong channel axis
    # for the scales or the bias gives < 10 dB.
    assert sqnr_db(ort_outputs(proto, x)["y"], ort_outputs(model, x)["y"]) > SQNR_FLOOR_DB


def test_conv_stays_fp32_unless_asked():
    model, result = _quantize(_conv_net())
    assert not result.modified and "ConvInteger" not in op_types(model)
    assert "unless measured to pay" in result.details["not_quantized"]["conv"]


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    return build_model(
        f"m (float[N,{k}] x) => (float[N,{n}] y) {{ [mm] y = MatMul (x, w) }}", {"w": w}
    )


def test_per_column_scales_where_column_ranges_differ():
    # Columns 10x apart in range: one scale would waste most levels of the narrow ones.
    w = np.random.default_rng(11).uniform(-1, 1, (64, 32)).astype(np.float32)
    w *= np.geomspace(0.1, 1.0, 32, dtype=np.float32)
    proto = _one_matmul(w)
    model, result = _quantize(proto)
    assert result.details["weight_scales"] == {"mm": "per-column"}
    assert model.graph.initializers["w_dynq_scale"].const_value.numpy().shape == (32,)
    x = {"x": seeded(12)(16, 64)}
    assert sqnr_db(ort_outputs(proto, x)["y"], ort_outputs(model, x)["y"]) > SQNR_FLOOR_DB


def test_one_scale_where_column_ranges_are_alike(tmp_path):
    # Every column spans [-1, 1]: per-column scales would equal the one scale, and cost
    # run time in ONNX Runtime's fused kernels.
    w = np.random.default_rng(13).uniform(-1, 1, (64, 32)).astype(np.float32)
    w[0], w[1] = 1.0, -1.0
    proto = _one_matmul(w)
    model, result = _quantize(proto)
    assert result.details["weight_scales"] == {"mm": "per-tensor"}
    assert model.graph.initializers["w_dynq_scale"].const_value.numpy().shape == ()
    assert _optimized_ops(model, tmp_path).count("DynamicQuantizeMatMul") == 1
    x = {"x": seeded(14)(16, 64)}
    assert sqnr_db(ort_outputs(proto, x)["y"], ort_outputs(model, x)["y"]) > SQNR_FLOOR_DB


def test_weight_granularity_threshold():
    w = np.random.default_rng(15).uniform(-1, 1, (64, 32)).astype(np.float32)
    w *= np.linspace(0.5, 1.0, 32, dtype=np.float32)
    *_, per_column = weight_granularity(w, 127, min_gain_db=0.0)
    assert per_column
    *_, per_column = weight_granularity(w, 127, min_gain_db=20.0)
    assert not per_column


def test_lopsided_table_uses_all_uint8_levels():
    # A table in [-0.5, 1.5]: int8 over +-1.5 would leave a third of its levels unused
    # (steps of 1.5/127, rounding error up to 0.0059); uint8 over [-0.5, 1.5]: 2/255.
    table = np.random.default_rng(16).uniform(-0.5, 1.5, (50, 8)).astype(np.float32)
    table[0, :2] = -0.5, 1.5
    proto = build_model(
        "g (int64[N] ids) => (float[N,8] y) { [embed] y = Gather (table, ids) }",
        {"table": table},
    )
    model, result = _quantize(proto)
    assert result.details["quantized_nodes"] == ["embed"]
    stored = model.graph.initializers["table_dynq"].const_value.numpy()
    assert stored.dtype == np.uint8 and stored.min() == 0 and stored.max() == 255
    ids = {"ids": np.arange(50)}
    got = runtime.run(runtime.create_session(model), ids)["y"]
    # Rounding error at most half a step (plus float32 slack).
    np.testing.assert_allclose(got, table, rtol=0, atol=2.0 / 255 / 2 * 1.01)
