"""Vendor ONNX files as they come: each trait compiles to a valid, faithful int8 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from graph_builders import build_model, seeded

from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.evaluate import sqnr_db

CONV_RELU_CONV = """
net (float[1,3,8,8] x) => (float[1,4,8,8] y) {
    [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    [relu] r = Relu (c)
    [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


def _conv_weights(seed: int = 0) -> dict[str, np.ndarray]:
    normal = seeded(seed)
    return {
        "w1": normal(4, 3, 3, 3, scale=0.3),
        "b1": normal(4, scale=0.1),
        "w2": normal(4, 4, 3, 3, scale=0.3),
        "b2": normal(4, scale=0.1),
    }


def _compile(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path) -> dict:
    """Compiles ``model`` with ``feeds`` (axis 0 = samples) as calibration; checks the result.

    The output must pass the ONNX checker, run on ONNX Runtime with full optimisation and
    keep every output within 8-bit quantization noise of the fp32 model (SQNR > 25 dB).
    """
    src, out, calib = tmp_path / "vendor.onnx", tmp_path / "vendor.int8.onnx", tmp_path / "c.npz"
    onnx.save(model, src)
    np.savez(calib, **feeds)
    report = compile_model(
        src, out, CompileConfig(calibration=str(calib), check_latency=False)
    ).to_dict()
    onnx.checker.check_model(onnx.load(out), full_check=True)
    sample = {k: v[:1] for k, v in feeds.items()}
    ref = ort.InferenceSession(str(src)).run(None, sample)
    got = ort.InferenceSession(str(out)).run(None, sample)
    for expected, actual in zip(ref, got, strict=True):
        assert expected.shape == actual.shape
        assert sqnr_db(expected, actual) > 25
    return report


def _images(seed: int = 1, n: int = 16) -> dict[str, np.ndarray]:
    return {"x": seeded(seed)(n, 3, 8, 8)}


def test_weights_in_constant_nodes(tmp_path):
    weights = _conv_weights()
    model = build_model(
        CONV_RELU_CONV, {k: v for k, v in weights.items() if k != "w1"}, check=False
    )
    constant = oh.make_node(
        "Constant", [], ["w1"], value=onnx.numpy_helper.from_array(weights["w1"], "w1")
    )
    model.graph.node.insert(0, constant)
    report = _compile(model, _images(), tmp_path)
    assert {"conv1", "conv2"} <= set(report["quantized_nodes"])


def test_old_opset_is_upgraded_not_refused(tmp_path):
    model = build_model(CONV_RELU_CONV, _conv_weights(), opset=11)
    report = _compile(model, _images(), tmp_path)
    upgrade = next(p for p in report["passes"] if p["name"] == "UpgradeOpsetPass")
    assert "opset 11 to 13" in upgrade["details"]["note"]
    assert onnx.load(tmp_path / "vendor.int8.onnx").opset_import[0].version >= 13


def test_weights_inside_if_subgraphs_stay_valid(tmp_path):
    normal = seeded(2)
    inner_w = onnx.numpy_helper.from_array(normal(4, 4, 1, 1, scale=0.3), "w_inner")
    then_graph = oh.make_graph(
        [oh.make_node("Conv", ["r", "w_inner"], ["t"])],
        "then",
        [],
        [oh.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[inner_w],
    )
    else_graph = oh.make_graph(
        [oh.make_node("Relu", ["r"], ["e"])],
        "else",
        [],
        [oh.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    model = build_model(
        """
        net (float[1,3,8,8] x, bool[1] flag) => (float[1,4,8,8] y) {
            [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            [relu] r = Relu (c)
            [conv2] d = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
            [add] y = Add (d, r)
        }
        """,
        _conv_weights(),
    )
    # Route the second Conv's input through an If whose then-branch holds its own weight.
    if_node = oh.make_node(
        "If", ["flag"], ["branch"], then_branch=then_graph, else_branch=else_graph
    )
    model.graph.node.insert(2, if_node)
    model.graph.node[3].input[0] = "branch"
    report = _compile(model, {**_images(), "flag": np.ones((16,), dtype=bool)}, tmp_path)
    assert any("subgraph bodies are kept fp32" in r for r in report["not_quantized"].values())
    assert "conv1" in report["quantized_nodes"]


def test_integer_token_inputs(tmp_path):
    normal = seeded(3)
    model = build_model(
        """
        net (int64[1,8] ids) => (float[1,8,6] y) {
            [embed] e = Gather (table, ids)
            [proj] m = MatMul (e, w)
            [bias] y = Add (m, b)
        }
        """,
        {"table": normal(20, 16), "w": normal(16, 6, scale=0.3), "b": normal(6, scale=0.1)},
    )
    ids = np.random.default_rng(4).integers(0, 20, size=(16, 8)).astype(np.int64)
    report = _compile(model, {"ids": ids}, tmp_path)
    assert "proj" in report["quantized_nodes"]


def test_boxes_and_scores_in_one_output_keep_score_precision(tmp_path):
    normal = seeded(5)
    model = build_model(
        """
        net (float[1,3,8,8] x) => (float[1,8,8,8] y) {
            [trunk] t = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            [trunk_relu] r = Relu (t)
            [box] boxes = Conv (r, wb, bb)
            [score] logits = Conv (r, ws, bs)
            [sigmoid] scores = Sigmoid (logits)
            [concat] y = Concat <axis = 1> (boxes, scores)
        }
        """,
        {
            "w": normal(8, 3, 3, 3, scale=0.3),
            "b": normal(8, scale=0.1),
            "wb": normal(4, 8, 1, 1, scale=100.0),  # box coordinates in pixels
            "bb": normal(4, scale=50.0),
            "ws": normal(4, 8, 1, 1, scale=0.3),
            "bs": normal(4, scale=0.1),
        },
    )
    _compile(model, _images(6), tmp_path)
    x = seeded(7)(1, 3, 8, 8)
    ref = ort.InferenceSession(str(tmp_path / "vendor.onnx")).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "vendor.int8.onnx")).run(None, {"x": x})[0]
    # Scores in [0, 1] must not share the boxes' int8 scale (~1 px per step).
    assert np.max(np.abs(ref[:, 4:] - got[:, 4:])) < 0.05


def test_nodes_out_of_topological_order(tmp_path):
    model = build_model(CONV_RELU_CONV, _conv_weights())
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    report = _compile(model, _images(), tmp_path)
    assert {"conv1", "conv2"} <= set(report["quantized_nodes"])


def test_wrong_declared_output_shape(tmp_path):
    model = build_model(CONV_RELU_CONV, _conv_weights(), check=False)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 99, 99  # the real output is 8x8
    report = _compile(model, _images(), tmp_path)
    infer = next(p for p in report["passes"] if p["name"] == "InferShapesPass")
    assert infer["details"]["repaired_output_shapes"] == [
        "y: declared [1, 4, 99, 99], is [1, 4, 8, 8]"
    ]
