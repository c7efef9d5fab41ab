"""Tests for passes/qdq.py: placement ONNX Runtime fuses, integer numerics, fidelity."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from graph_builders import bn_stats, build_model, seeded

from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import InputError
from onnxq.evaluate import sqnr_db

# Conv-Relu, residual Add-Relu, MaxPool, GlobalAveragePool, Flatten and a Gemm head.
RESIDUAL_NET = """
net (float[1,3,16,16] x) => (float[1,10] y) {
    [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    [relu1] r1 = Relu (c1)
    [conv2] c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
    [bn2] n2 = BatchNormalization (c2, gamma2, beta2, mean2, var2)
    [add] a = Add (n2, r1)
    [relu2] r2 = Relu (a)
    [pool] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r2)
    [dw] d = Conv <group = 8, pads = [1, 1, 1, 1]> (p, wd, bd)
    [relu3] r3 = Relu (d)
    [gap] g = GlobalAveragePool (r3)
    [flat] f = Flatten (g)
    [fc] y = Gemm <transB = 1> (f, wf, bf)
}
"""


def _residual_weights() -> dict[str, np.ndarray]:
    normal = seeded(7)
    return {
        "w1": normal(8, 3, 3, 3, scale=0.4),
        "b1": normal(8, scale=0.1),
        "w2": normal(8, 8, 3, 3, scale=0.2),
        "b2": normal(8, scale=0.1),
        **{f"{k}2": v for k, v in bn_stats(8, seed=8).items()},
        "wd": normal(8, 1, 3, 3, scale=0.5),
        "bd": normal(8, scale=0.1),
        "wf": normal(10, 8, scale=0.5),
        "bf": normal(10, scale=0.1),
    }


@pytest.fixture
def residual_files(tmp_path: Path) -> tuple[Path, Path]:
    """The residual net on disk and 32 calibration samples for it."""
    model = build_model(RESIDUAL_NET, _residual_weights())
    path = tmp_path / "net.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=seeded(9)(32, 3, 16, 16))
    return path, calib


def _compile(src: Path, calib: Path, out_name: str = "int8.onnx", **options) -> tuple[Path, dict]:
    out = src.with_name(out_name)
    config = CompileConfig(calibration=str(calib), check_latency=False, **options)
    return out, compile_model(src, out, config).to_dict()


def _deployed_ops(path: Path, tmp_path: Path) -> collections.Counter:
    """The ops ONNX Runtime actually runs after its full (deployment) optimisation."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "deployed.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "deployed.onnx").graph.node)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _dq_feeding(model: onnx.ModelProto, node_name: str, index: int) -> onnx.NodeProto:
    consumer = next(n for n in model.graph.node if n.name == node_name)
    return next(n for n in model.graph.node if n.output[0] == consumer.input[index])


def test_onnxruntime_fuses_every_unit(residual_files, tmp_path):
    out, report = _compile(*residual_files)
    ops = _deployed_ops(out, tmp_path)
    # No float compute op is left between a DequantizeLinear and a QuantizeLinear:
    # MaxPool and Flatten remain, running on uint8 once their Q/DQ pair was dropped.
    assert not {"Conv", "Gemm", "MatMul", "Add", "Relu"} & set(ops), ops
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
    # The only conversion left is quantizing the float input; QGemm outputs float.
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0
    assert report["not_quantized"] == {}


def test_no_quantize_between_conv_and_its_relu(residual_files):
    out, _ = _compile(*residual_files)
    model = onnx.load(out)
    producers = {o: n for n in model.graph.node for o in n.output}
    for relu in (n for n in model.graph.node if n.op_type == "Relu"):
        assert producers[relu.input[0]].op_type in ("Conv", "Add"), relu.name


def test_weights_per_channel_int8_and_bias_int32(residual_files):
    out, _ = _compile(*residual_files)
    model = onnx.load(out)
    inits = _initializers(model)
    w_dq = _dq_feeding(model, "conv2", 1)
    w_q, w_scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
    assert w_q.dtype == np.int8 and w_scale.shape == (8,)
    assert onnx.helper.get_attribute_value(w_dq.attribute[0]) == 0  # axis 0: output channels
    b_dq = _dq_feeding(model, "conv2", 2)
    b_q, b_scale = inits[b_dq.input[0]], inits[b_dq.input[1]]
    x_dq = _dq_feeding(model, "conv2", 0)
    x_scale = inits[x_dq.input[1]]
    assert b_q.dtype == np.int32
    np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)


def test_shape_ops_share_their_input_scale(residual_files):
    out, _ = _compile(*residual_files)
    model = onnx.load(out)
    inits = _initializers(model)
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    before = next(n for n in model.graph.node if n.output[0] == pool.input[0])
    after = next(n for n in model.graph.node if pool.output[0] in n.input)
    assert (before.op_type, after.op_type) == ("DequantizeLinear", "QuantizeLinear")
    assert inits[before.input[1]] == inits[after.input[1]]
    assert inits[before.input[2]] == inits[after.input[2]]


@pytest.mark.parametrize(("target", "dense", "depthwise"), [("avx2", 63, 127), ("vnni", 127, 127)])
def test_weight_range_follows_the_target(residual_files, target, dense, depthwise):
    out, report = _compile(*residual_files, target=target)
    model = onnx.load(out)
    inits = _initializers(model)
    dense_q = inits[_dq_feeding(model, "conv2", 1).input[0]]
    depthwise_q = inits[_dq_feeding(model, "dw", 1).input[0]]
    assert np.abs(dense_q).max() == dense
    assert np.abs(depthwise_q).max() == depthwise
    assert report["numerics"]["target"] == target


def test_int8_outputs_stay_close_to_fp32(residual_files):
    src, calib = residual_files
    out, report = _compile(src, calib)
    x = seeded(10)(1, 3, 16, 16)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert sqnr_db(ref, got) > 30  # 8-bit quantization noise of a small net: ~35-45 dB
    assert report["fidelity"]["min_sqnr_db"] > 30


def test_compile_is_deterministic(residual_files):
    first, _ = _compile(*residual_files, out_name="a.onnx")
    second, _ = _compile(*residual_files, out_name="b.onnx")
    assert first.read_bytes() == second.read_bytes()


def test_exclude_keeps_a_node_fp32_and_says_why(residual_files):
    out, report = _compile(*residual_files, exclude=("conv[2]",))
    assert "excluded" in report["not_quantized"]["conv2"]
    model = onnx.load(out)
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"  # the (BN-folded) fp32 weight, no DequantizeLinear


def test_op_types_restricts_quantization(residual_files):
    _, report = _compile(*residual_files, op_types=("Gemm",))
    assert "op type not in --op-types" in report["not_quantized"]["conv1"]
    assert "fc" in report["quantized_nodes"]


UNSUPPORTED_NET = """
net (float[1,4,8,8] x) => (float[1,4,8,8] y) {
    [hs] h = HardSwish (x)
    [sm] y = Softmax <axis = 1> (h)
}
"""


def test_does_not_fire_without_int8_ops(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(build_model(UNSUPPORTED_NET), src)
    np.savez(tmp_path / "c.npz", x=seeded(1)(8, 4, 8, 8))
    out, report = _compile(src, tmp_path / "c.npz")
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops == ["HardSwish", "Softmax"]
    assert "no int8 kernel" in report["not_quantized"]["hs"]
    assert "opt-in" in report["not_quantized"]["sm"]
    qdq = next(p for p in report["passes"] if p["name"] == "InsertQDQPass")
    assert qdq["modified"] is False


def test_isolated_conv_between_fp32_ops_stays_fp32(tmp_path):
    normal = seeded(3)
    model = build_model(
        """
        net (float[1,4,8,8] x) => (float[1,4,8,8] y) {
            [hs1] h = HardSwish (x)
            [conv] c = Conv <pads = [1, 1, 1, 1]> (h, w, b)
            [hs2] y = HardSwish (c)
        }
        """,
        {"w": normal(4, 4, 3, 3, scale=0.3), "b": normal(4, scale=0.1)},
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=normal(8, 4, 8, 8))
    out, report = _compile(src, tmp_path / "c.npz")
    assert "isolated" in report["not_quantized"]["conv"]
    assert "QuantizeLinear" not in [n.op_type for n in onnx.load(out).graph.node]


def test_existing_qdq_keeps_its_scales(tmp_path):
    """A QAT-style model: the Conv input already has Q/DQ with a chosen scale."""
    normal = seeded(4)
    model = build_model(
        """
        net (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            q = QuantizeLinear (x, s, z)
            dq = DequantizeLinear (q, s, z)
            [conv] c = Conv <pads = [1, 1, 1, 1]> (dq, w, b)
            [relu] r = Relu (c)
            [conv_b] y = Conv <pads = [1, 1, 1, 1]> (r, w2, b)
        }
        """,
        {
            "s": np.array(0.05, np.float32),
            "z": np.array(128, np.uint8),
            "w": normal(4, 3, 3, 3, scale=0.3),
            "w2": normal(4, 4, 3, 3, scale=0.3),
            "b": normal(4, scale=0.1),
        },
    )
    src = tmp_path / "qat.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=normal(8, 3, 8, 8))
    out, report = _compile(src, tmp_path / "c.npz")
    result = onnx.load(out)
    inits = _initializers(result)
    first_q = next(n for n in result.graph.node if n.input[0] == "x")
    assert first_q.op_type == "QuantizeLinear" and inits[first_q.input[1]] == np.float32(0.05)
    assert [n.op_type for n in result.graph.node].count("QuantizeLinear") == 2  # + relu output
    assert "conv" in report["quantized_nodes"]


def test_bad_exclude_pattern_is_a_clear_error(residual_files):
    with pytest.raises(InputError, match="not a valid regular expression"):
        _compile(*residual_files, exclude=("conv[",))


def _ranged_residual_ir():
    """The residual net in IR with every float activation given a range, as calibration would."""
    import onnx_ir as ir

    from onnxq.passes.calibrate import RANGE_KEY
    from onnxq.passes.fuse import MarkFusedUnitsPass

    proto = onnx.shape_inference.infer_shapes(build_model(RESIDUAL_NET, _residual_weights()))
    model = ir.serde.deserialize_model(proto)
    for node in model.graph:
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.const_value is None:
                value.meta[RANGE_KEY] = (-4.0, 4.0)
    MarkFusedUnitsPass()(model)
    return model


def _weight_is_dequantized(model, node_name: str) -> bool:
    node = next(n for n in model.graph if n.name == node_name)
    producer = node.inputs[1].producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def test_keep_fp32_keeps_the_named_node_fp32_with_its_reason():
    from onnxq.numerics import numerics_for
    from onnxq.passes.qdq import InsertQDQPass

    model = _ranged_residual_ir()
    qdq = InsertQDQPass(numerics_for("avx2"), keep_fp32={"conv2": "kept fp32: costs 9 dB"})
    qdq = qdq(model)
    assert not _weight_is_dequantized(model, "conv2")
    assert _weight_is_dequantized(model, "dw")
    assert qdq.details["not_quantized"]["conv2"].endswith("kept fp32: costs 9 dB")


def test_keep_fp32_of_an_unknown_name_changes_nothing():
    from onnxq.numerics import numerics_for
    from onnxq.passes.qdq import InsertQDQPass

    model = _ranged_residual_ir()
    InsertQDQPass(numerics_for("avx2"), keep_fp32={"no_such_node": "x"})(model)
    assert _weight_is_dequantized(model, "conv1") and _weight_is_dequantized(model, "conv2")


def test_scale_groups_list_every_int8_node_that_uses_a_range():
    from onnxq.numerics import numerics_for
    from onnxq.passes.qdq import InsertQDQPass

    qdq = InsertQDQPass(numerics_for("avx2"))(_ranged_residual_ir())
    # r1 leaves conv1's unit (through relu1) and enters conv2: both quantize with its scale.
    assert qdq.scale_groups["r1"] == ["conv1", "conv2"]
    assert qdq.scale_groups["x"] == ["conv1"]  # the graph input, quantized for conv1
    nodes = {n for group in qdq.scale_groups.values() for n in group}
    assert nodes == {"conv1", "conv2", "dw", "gap", "fc"}


def test_scale_groups_are_empty_when_nothing_is_int8():
    from onnxq.numerics import numerics_for
    from onnxq.passes.qdq import InsertQDQPass

    qdq = InsertQDQPass(numerics_for("avx2"), op_types=["Sigmoid"])(_ranged_residual_ir())
    assert qdq.scale_groups == {}


def test_bad_exclude_pattern_names_the_pattern_not_a_flag(residual_files):
    with pytest.raises(InputError, match=r"exclude pattern 'conv\[' is not a valid") as error:
        _compile(*residual_files, exclude=("conv[",))
    assert "--" not in str(error.value)


def test_graph_input_that_is_an_output_passes_through(tmp_path):
    # Found by tests/test_fuzz_compile.py: the output became 'x_dequantized'.
    normal = seeded(4)
    model = build_model(
        """
        net (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,3,8,8] x) {
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, w1)
            [relu] r = Relu (c)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, w2)
        }
        """,
        {"w1": normal(4, 3, 3, 3, scale=0.3), "w2": normal(4, 4, 3, 3, scale=0.3)},
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=normal(8, 3, 8, 8))
    out, _ = _compile(src, tmp_path / "c.npz")
    written = onnx.load(out)
    assert [o.name for o in written.graph.output] == ["y", "x"]
    assert "QuantizeLinear" in [n.op_type for n in written.graph.node]
    x = normal(1, 3, 8, 8)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["x"], {"x": x})[0], x)


def test_weight_quantization_holds_one_float_temporary():
    # A 2.3 GB MatMul weight peaked at 4x its size (a copy, abs, round, clip): keep it < 2x.
    import tracemalloc

    import onnx_ir as ir

    from onnxq.numerics import numerics_for
    from onnxq.passes.calibrate import RANGE_KEY
    from onnxq.passes.qdq import InsertQDQPass

    w = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)  # 16 MB
    text = "net (float[N, 2048] x) => (float[N, 2048] y) { y = MatMul (x, w) }"
    model = ir.serde.deserialize_model(build_model(text, {"w": w}))
    model.graph.inputs[0].meta[RANGE_KEY] = (-4.0, 4.0)
    model.graph.outputs[0].meta[RANGE_KEY] = (-200.0, 200.0)
    # Backed by the array itself, as a memory-mapped external weight is: reading it is free.
    model.graph.initializers["w"].const_value = ir.Tensor(w, name="w")

    tracemalloc.start()
    try:
        InsertQDQPass(numerics_for("vnni"))(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert "DequantizeLinear" in {n.op_type for n in model.graph}
    assert peak < 2 * w.nbytes, f"peak {peak / 1e6:.0f} MB for a {w.nbytes / 1e6:.0f} MB weight"


# A QAT export: every activation already has Q/DQ, weights are QuantizeLinear of weights
# on their 7-bit grid (the Conv's) or int8 constants (the Gemm's), biases float.
QAT_NET = """
net (float[N,2,8,8] x) => (float[N,3] y) {
    qx = QuantizeLinear (x, sx, zx)
    dx = DequantizeLinear (qx, sx, zx)
    qw = QuantizeLinear <axis = 0> (w, sw, zw)
    dw = DequantizeLinear <axis = 0> (qw, sw, zw)
    [conv] c = Conv <pads = [1, 1, 1, 1]> (dx, dw, b)
    [relu] r = Relu (c)
    qr = QuantizeLinear (r, sr, zr)
    dr = DequantizeLinear (qr, sr, zr)
    [pool] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (dr)
    [flat] f = Flatten (p)
    df = DequantizeLinear <axis = 0> (wf, sf, zf)
    [fc] y = Gemm <transB = 1> (f, df, bf)
}
"""


def _qat_weights() -> dict[str, np.ndarray]:
    normal = seeded(21)
    sw = np.abs(normal(4, scale=0.01)) + 0.01
    grid = np.clip(np.round(normal(4, 2, 3, 3, scale=30)), -63, 63)
    return {
        "sx": np.array(0.01, np.float32),
        "zx": np.array(100, np.uint8),
        "w": (grid * sw[:, None, None, None]).astype(np.float32),
        "sw": sw,
        "zw": np.zeros(4, np.int8),
        "b": normal(4, scale=0.1),
        "sr": np.array(0.03, np.float32),
        "zr": np.array(0, np.uint8),
        "wf": np.clip(np.round(normal(3, 64, scale=40)), -127, 127).astype(np.int8),
        "sf": np.abs(normal(3, scale=0.001)) + 0.001,
        "zf": np.zeros(3, np.int8),
        "bf": normal(3, scale=0.1),
    }


def _activation_scales(model: onnx.ModelProto) -> set[float]:
    inits = _initializers(model)
    return {
        float(inits[n.input[1]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1
    }


def test_qat_model_keeps_its_scales_and_runs_int8(tmp_path):
    weights = _qat_weights()
    src = tmp_path / "qat.onnx"
    onnx.save(build_model(QAT_NET, weights), src)
    x = seeded(22)(16, 2, 8, 8, scale=0.3, offset=0.3)
    np.savez(tmp_path / "c.npz", x=x)
    out, report = _compile(src, tmp_path / "c.npz", target="avx2")
    result = onnx.load(out)
    inits = _initializers(result)
    assert {"conv", "fc"} <= set(report["quantized_nodes"])
    # No tensor quantized a second time with a calibrated range: MaxPool and Flatten
    # carry the ReLU's scale on to the Gemm, as ONNX Runtime would.
    assert _activation_scales(result) == {np.float32(0.01), np.float32(0.03)}
    # The weights stay the given integers and scales (not re-quantized to 7 bits).
    conv_dq = _dq_feeding(result, "conv", 1)
    np.testing.assert_array_equal(
        inits[conv_dq.input[0]], np.round(weights["w"] / weights["sw"][:, None, None, None])
    )
    np.testing.assert_array_equal(inits[conv_dq.input[1]], weights["sw"])
    fc_dq = _dq_feeding(result, "fc", 1)
    np.testing.assert_array_equal(inits[fc_dq.input[0]], weights["wf"])
    # Biases become int32 at input scale x weight scale: ONNX Runtime fuses every unit.
    conv_bias = _dq_feeding(result, "conv", 2)
    np.testing.assert_array_equal(inits[conv_bias.input[1]], np.float32(0.01) * weights["sw"])
    ops = _deployed_ops(out, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1 and "Conv" not in ops, ops
    # The int8 model computes what the QDQ model describes: within one step of the Gemm
    # input (0.03) times the largest weight row's L1 norm, a bound no rounding can exceed.
    qdq = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    expected, got = qdq.run(None, {"x": x})[0], int8.run(None, {"x": x})[0]
    row_l1 = np.abs(weights["wf"].astype(np.float32) * weights["sf"][:, None]).sum(axis=1)
    assert np.all(np.abs(got - expected) <= 0.03 * row_l1 + 1e-5)


def test_existing_qdq_before_a_graph_output_gets_no_second_pair(tmp_path):
    """DQ -> Flatten -> output: no int8 op reads the Flatten, so nothing is added there."""
    normal = seeded(23)
    model = build_model(
        """
        net (float[N,2,4,4] x) => (float[N,32] y) {
            q = QuantizeLinear (x, s, z)
            dq = DequantizeLinear (q, s, z)
            [flat] y = Flatten (dq)
        }
        """,
        {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8)},
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=normal(8, 2, 4, 4))
    out, _ = _compile(src, tmp_path / "c.npz")
    assert [n.op_type for n in onnx.load(out).graph.node].count("QuantizeLinear") == 1


def test_conv_weight_from_a_runtime_dequantize_stays_fp32(tmp_path):
    """A DequantizeLinear of a graph input is no quantized weight: the Conv stays fp32."""
    normal = seeded(24)
    model = build_model(
        """
        net (float[N,2,4,4] x, int8[3,2,3,3] wq) => (float[N,3,4,4] y) {
            w = DequantizeLinear (wq, s, z)
            [conv] y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        }
        """,
        {"s": np.array(0.01, np.float32), "z": np.array(0, np.int8), "b": normal(3)},
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=normal(8, 2, 4, 4), wq=np.ones((8, 3, 2, 3, 3), np.int8))
    _, report = _compile(src, tmp_path / "c.npz")
    assert report["not_quantized"]["conv"] == "Conv: Conv weight is not a constant"
