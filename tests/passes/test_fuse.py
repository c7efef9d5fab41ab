"""BatchNormalization folding and fused-unit marking."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.passes.fuse import (
    ACTIVATION_KEY,
    UNIT_KEY,
    FoldBatchNormPass,
    MarkFusedUnitsPass,
    PoolingToGlobalPass,
    fused_activation,
)

FOLD_TOLERANCE = 1e-4  # max abs difference relative to the output range


def fold(model: ir.Model) -> tuple[ir.passes.PassResult, dict]:
    result = FoldBatchNormPass()(model)
    return result, result.details


def mark(model: ir.Model) -> ir.Model:
    MarkFusedUnitsPass()(model)
    return model


def node(model: ir.Model, name: str) -> ir.Node:
    (found,) = [n for n in model.graph if n.name == name]
    return found


def test_conv_bn_folds_into_conv(conv_bn_relu_model, to_ir_model, op_types_of, assert_same_outputs):
    model = to_ir_model(conv_bn_relu_model)

    result, summary = fold(model)

    assert result.modified
    assert op_types_of(model) == ["Conv", "Relu", "Conv", "Clip"]
    assert summary["batchnorm_before"] == 2
    assert summary["batchnorm_after"] == 0
    assert summary["note"] == "folded 2 of 2 BatchNormalization nodes"
    assert_same_outputs(conv_bn_relu_model, model, tol=FOLD_TOLERANCE)


def _bn_weights(producer_weights: dict[str, np.ndarray], channels: int, rng_seed: int) -> dict:
    rng = np.random.default_rng(rng_seed)
    weights = {k: v.astype(np.float32) for k, v in producer_weights.items()}
    weights.update(
        gamma=(1 + 0.5 * rng.standard_normal(channels)).astype(np.float32),
        beta=(0.5 * rng.standard_normal(channels)).astype(np.float32),
        mean=(0.5 * rng.standard_normal(channels)).astype(np.float32),
        var=(0.5 + np.abs(rng.standard_normal(channels))).astype(np.float32),
    )
    return weights


FOLDABLE = {
    "ConvTranspose": (
        """
        net (float[1,3,5,5] x) => (float[1,4,7,7] y) {
            t = ConvTranspose (x, w, b)
            y = BatchNormalization (t, gamma, beta, mean, var)
        }
        """,
        {"w": np.random.default_rng(7).standard_normal((3, 4, 3, 3)), "b": np.arange(4.0)},
    ),
    "Gemm": (
        """
        net (float[2,8] x) => (float[2,4] y) {
            g = Gemm <transB = 1> (x, w, b)
            y = BatchNormalization (g, gamma, beta, mean, var)
        }
        """,
        {"w": np.random.default_rng(8).standard_normal((4, 8)), "b": np.arange(4.0)},
    ),
}


@pytest.mark.parametrize("producer", list(FOLDABLE))
def test_bn_folds_into_conv_transpose_and_gemm(
    producer, build_onnx, to_ir_model, op_types_of, assert_same_outputs
):
    text, weights = FOLDABLE[producer]
    proto = build_onnx(text, _bn_weights(weights, 4, rng_seed=9))
    model = to_ir_model(proto)

    result, summary = fold(model)

    assert result.modified
    assert op_types_of(model) == [producer]
    assert summary["batchnorm_after"] == 0
    assert_same_outputs(proto, model, tol=FOLD_TOLERANCE)


def test_bn_after_relu_is_left_and_reported(bn_after_relu_model, to_ir_model, op_types_of):
    model = to_ir_model(bn_after_relu_model)
    before = onnx.printer.to_text(ir.to_proto(model))

    result, summary = fold(model)

    assert not result.modified
    assert onnx.printer.to_text(ir.to_proto(model)) == before
    assert op_types_of(model) == ["Conv", "Relu", "BatchNormalization"]
    assert summary["batchnorm_before"] == summary["batchnorm_after"] == 1
    assert "folded 0 of 1" in summary["note"]
    assert "1 left" in summary["note"]


def test_bn_on_a_conv_with_runtime_weights_is_left(build_onnx, to_ir_model):
    weights = _bn_weights({}, 4, rng_seed=10)
    proto = build_onnx(
        """
        net (float[1,3,6,6] x, float[4,3,3,3] w) => (float[1,4,4,4] y) {
            c = Conv (x, w)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }
        """,
        weights,
    )

    result, summary = fold(to_ir_model(proto))

    assert not result.modified
    assert summary["batchnorm_after"] == 1


def test_graph_without_bn_is_already_fused(matmul_add_relu_model, to_ir_model):
    result, summary = fold(to_ir_model(matmul_add_relu_model))

    assert not result.modified
    assert summary["batchnorm_before"] == 0
    assert "already fused" in summary["note"]


# ---------------------------------------------------------------------------- marking


def test_conv_relu_and_conv_relu6_are_marked(conv_bn_relu_model, to_ir_model):
    model = to_ir_model(conv_bn_relu_model)
    fold(model)
    pass_ = MarkFusedUnitsPass()

    result = pass_(model)

    assert not result.modified  # marks are metadata only
    for act_name in ("relu1", "relu6"):  # folding replaced the Convs: find them by edge
        act = node(model, act_name)
        conv = act.inputs[0].producer()
        assert conv.op_type == "Conv"
        assert fused_activation(conv) is act
        assert act.meta[UNIT_KEY] == conv.meta[UNIT_KEY] == conv.name
    assert result.details == {"conv_act": 2, "linear_bias": 0, "units": 2}


def test_marks_are_not_serialized(conv_bn_relu_model, to_ir_model):
    model = mark(to_ir_model(conv_bn_relu_model))
    text = onnx.printer.to_text(ir.to_proto(model))
    assert "onnxq" not in text


def test_matmul_add_relu_is_one_unit(matmul_add_relu_model, to_ir_model):
    model = mark(to_ir_model(matmul_add_relu_model))

    assert [n.meta.get(UNIT_KEY) for n in model.graph] == ["matmul"] * 3
    assert fused_activation(node(model, "matmul")) is node(model, "relu")


def test_matmul_add_of_a_runtime_value_is_not_a_unit(build_onnx, to_ir_model):
    proto = build_onnx(
        """
        net (float[2,8] x, float[16] b) => (float[2,16] y) {
            [matmul] m = MatMul (x, w)
            [bias] a = Add (m, b)
            [relu] y = Relu (a)
        }
        """,
        {"w": np.ones((8, 16), np.float32)},
    )
    model = mark(to_ir_model(proto))

    assert node(model, "matmul").meta[UNIT_KEY] == "matmul"
    assert node(model, "bias").meta.get(UNIT_KEY) != "matmul"
    assert node(model, "relu").meta.get(UNIT_KEY) != "matmul"
    assert fused_activation(node(model, "matmul")) is None


_CONV = "[conv] c = Conv (x, w)"
UNMARKED = {
    "clip_min_not_0": f"""
        net (float[1,2,4,4] x) => (float[1,2,4,4] y) {{
            {_CONV}
            [act] y = Clip (c, lo_neg, hi)
        }}
        """,
    "clip_without_min": f"""
        net (float[1,2,4,4] x) => (float[1,2,4,4] y) {{
            {_CONV}
            [act] y = Clip (c)
        }}
        """,
    "conv_with_two_consumers": f"""
        net (float[1,2,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] z) {{
            {_CONV}
            [act] y = Relu (c)
            [other] z = Neg (c)
        }}
        """,
    "conv_output_is_graph_output": f"""
        net (float[1,2,4,4] x) => (float[1,2,4,4] c, float[1,2,4,4] y) {{
            {_CONV}
            [act] y = Relu (c)
        }}
        """,
}


@pytest.mark.parametrize("text", list(UNMARKED.values()), ids=list(UNMARKED))
def test_activation_is_not_marked(text, build_onnx, to_ir_model):
    weights = {
        "w": np.ones((2, 2, 1, 1), np.float32),
        "lo_neg": np.array(-1.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    model = mark(to_ir_model(build_onnx(text, weights)))

    assert node(model, "conv").meta[UNIT_KEY] == "conv"  # the conv alone is still a unit
    assert ACTIVATION_KEY not in node(model, "conv").meta
    assert UNIT_KEY not in node(model, "act").meta


def _reduce_mean(build_onnx, axes: str, keepdims: int, out_shape: str, opset: int = 18):
    """ReduceMean with ``axes`` as an input (opset 18+) or an attribute (before)."""
    if opset >= 18:
        call, weights = (
            f"ReduceMean <keepdims = {keepdims}> (x, axes)",
            {"axes": np.array(eval(axes), np.int64)},
        )
    else:
        call, weights = f"ReduceMean <keepdims = {keepdims}, axes = {axes}> (x)", {}
    graph = f"net (float[2,4,5,5] x) => (float{out_shape} y) {{ y = {call} }}"
    return build_onnx(graph, weights, opset=opset)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(
    ("axes", "keepdims", "out_shape", "ops"),
    [
        ("[2, 3]", 1, "[2,4,1,1]", ["GlobalAveragePool"]),
        ("[-1, -2]", 1, "[2,4,1,1]", ["GlobalAveragePool"]),
        ("[2, 3]", 0, "[2,4]", ["GlobalAveragePool", "Flatten"]),
    ],
)
def test_spatial_reduce_mean_becomes_global_average_pool(
    build_onnx, to_ir_model, op_types_of, assert_same_outputs, axes, keepdims, out_shape, ops, opset
):
    proto = _reduce_mean(build_onnx, axes, keepdims, out_shape, opset)
    model = to_ir_model(proto)
    assert PoolingToGlobalPass()(model).modified
    assert op_types_of(model) == ops
    assert_same_outputs(proto, model, tol=1e-6)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(("axes", "out_shape"), [("[1]", "[2,1,5,5]"), ("[3]", "[2,4,5,1]")])
def test_non_spatial_reduce_mean_is_left(
    build_onnx, to_ir_model, op_types_of, axes, out_shape, opset
):
    model = to_ir_model(_reduce_mean(build_onnx, axes, 1, out_shape, opset))
    assert not PoolingToGlobalPass()(model).modified
    assert op_types_of(model) == ["ReduceMean"]


def test_conv_model_without_bn_may_have_been_fused_by_the_exporter(build_onnx, to_ir_model):
    proto = build_onnx(
        """
        net (float[1,2,4,4] x, float[3,2,1,1] w) => (float[1,3,4,4] y) { y = Conv (x, w) }
        """
    )
    result, summary = fold(to_ir_model(proto))

    assert not result.modified
    assert "already fused by the exporter" in summary["note"]


def test_model_that_never_could_have_bn_is_not_said_to_be_fused(matmul_add_relu_model, to_ir_model):
    _, summary = fold(to_ir_model(matmul_add_relu_model))

    assert "by the exporter" not in summary["note"]
    assert "nothing to fold" in summary["note"]
