from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compare_fixtures import MACS, NOISE, PARAMETERS, ROWS, reference_scores, tiny_net, write_models
from graph_builders import build_model, seeded

from onnxq import report
from onnxq.bootstrap import bootstrap_proportion, ci95
from onnxq.compare import compare, count_macs, count_parameters, pareto_front
from onnxq.errors import InputError
from onnxq.evaluate import sqnr_db
from onnxq.inputs import infer_concrete_shapes
from onnxq.passes.prune import zipped_size

FAST = {"max_time": 0.0, "min_runs": 3}
ONE = {"x": np.zeros((1, 1, 6, 6), np.float32)}


def test_macs_and_parameters_of_conv_gemm_net_match_hand_count():
    model = ir.from_proto(tiny_net())
    assert count_macs(model, ONE) == MACS
    # A batch of 5 does five times the work.
    assert count_macs(model, {"x": np.zeros((5, 1, 6, 6), np.float32)}) == 5 * MACS
    assert count_parameters(model) == PARAMETERS


def test_qdq_model_counts_the_same_macs_and_parameters():
    normal = seeded(0)
    weights = {
        "wq": np.ones((4, 1, 3, 3), np.int8),
        "ws": np.full(4, 0.01, np.float32),  # per-channel scale: metadata, not parameters
        "wz": np.zeros(4, np.int8),
        "b": normal(4),
        "xs": np.array(0.02, np.float32),
        "xz": np.array(0, np.uint8),
        "gw": normal(64, 3),
        "gb": normal(3),
    }
    model = build_model(
        """
        net (float[N,1,6,6] x) => (float[N,3] scores) {
            q = QuantizeLinear (x, xs, xz)
            dq = DequantizeLinear (q, xs, xz)
            w = DequantizeLinear <axis = 0> (wq, ws, wz)
            c = Conv (dq, w, b)
            f = Flatten (c)
            scores = Gemm (f, gw, gb)
        }
        """,
        weights,
    )
    model = ir.from_proto(model)
    assert count_macs(model, ONE) == MACS
    assert count_parameters(model) == PARAMETERS


def test_conv_transpose_and_matmul_macs():
    model = ir.from_proto(
        build_model(
            """
            net (float[N,2,3,3] x) => (float[N,4,4,5] y) {
                t = ConvTranspose (x, w)
                y = MatMul (t, m)
            }
            """,
            {"w": np.zeros((2, 4, 2, 2), np.float32), "m": np.zeros((4, 5), np.float32)},
        )
    )
    # Each of the 2x3x3 inputs meets 4 output channels x 2x2 kernel taps; the MatMul's
    # output [1, 4, 4, 5] is 80 dot products of length 4.
    assert count_macs(model, {"x": np.zeros((1, 2, 3, 3), np.float32)}) == 18 * 16 + 80 * 4


def test_macs_through_shape_arithmetic_that_inference_cannot_follow():
    # The dynamo exporter's flatten: Shape -> Squeeze -> Reshape -> Concat -> Reshape, whose
    # result shape inference leaves symbolic; one run of the model gives it.
    normal = seeded(0)
    weights = {"w": normal(4, 1, 3, 3), "b": normal(4), "gw": normal(64, 3), "gb": normal(3)}
    weights.update(one=np.array([1], np.int64), rest=np.array([64], np.int64))
    model = ir.from_proto(
        build_model(
            """
            net (float[N,1,6,6] x) => (float[N,3] scores) {
                c = Conv (x, w, b)
                r = Relu (c)
                s = Shape <end = 1> (x)
                n = Squeeze (s)
                n1 = Reshape (n, one)
                dims = Concat <axis = 0> (n1, rest)
                f = Reshape (r, dims)
                scores = Gemm (f, gw, gb)
            }
            """,
            weights,
        )
    )
    shaped = infer_concrete_shapes(model, ONE)
    assert not shaped.graph.node(-1).inputs[0].shape.is_static()
    assert count_macs(model, ONE) == MACS


def test_macs_unknown_without_shapes():
    model = ir.from_proto(tiny_net())
    # No feed for x: its batch stays symbolic, so no count is better than a wrong one.
    assert count_macs(model, {}) is None


def test_pareto_front():
    points = [(1.0, 0.9), (2.0, 0.95), (3.0, 0.94), (1.0, 0.9), (math.nan, 1.0)]
    # (3.0, 0.94) is beaten by (2.0, 0.95); equal points do not beat each other.
    assert pareto_front(points) == [True, True, False, True, False]


def test_bootstrap_proportion_is_seeded_and_centred():
    reps = bootstrap_proportion(30, 40, seed=2)
    np.testing.assert_array_equal(reps, bootstrap_proportion(30, 40, seed=2))
    lo, hi = ci95(reps)
    assert lo < 0.75 < hi and 0.0 <= lo and hi <= 1.0
    assert ci95(bootstrap_proportion(40, 40)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="hits"):
        bootstrap_proportion(1, 0)


def test_compare_numbers_match_hand_computed(tmp_path):
    ref, noisy, data = write_models(tmp_path)
    result = compare(ref, [noisy], data, labels_key="y", batch_sizes=(1, 2), **FAST)
    assert result["kind"] == "compare" and result["samples"] == ROWS
    reference, candidate = result["comparison"]
    with np.load(data) as d:
        x, y = d["x"], d["y"]
    scores = reference_scores(ref, x)
    for row, path in ((reference, ref), (candidate, noisy)):
        assert row["size_bytes"] == path.stat().st_size
        assert row["zipped_bytes"] == zipped_size(ir.load(path))
        assert row["macs"] == MACS and row["latency"].keys() == {"1", "2"}
    assert reference["parameters"] == PARAMETERS
    assert candidate["parameters"] == PARAMETERS + NOISE.size
    # Every 4th label was shifted away from the reference's prediction.
    assert reference["accuracy"]["top1"] == pytest.approx(0.75)
    expected = np.mean((scores + NOISE).argmax(axis=1) == y)
    assert candidate["accuracy"]["top1"] == pytest.approx(expected)
    for row in (reference, candidate):
        lo, hi = row["accuracy"]["top1_ci95"]
        assert 0.0 <= lo <= row["accuracy"]["top1"] <= hi <= 1.0
    assert candidate["fidelity"]["sqnr_db"] == pytest.approx(
        sqnr_db(scores, scores + NOISE), abs=1e-3
    )
    assert candidate["fidelity"]["top1_agreement"] == pytest.approx(
        np.mean((scores + NOISE).argmax(axis=1) == scores.argmax(axis=1))
    )
    assert reference["fidelity"] is None and reference["latency"]["1"]["speedup"] == 1.0
    # The reference, at least as accurate and no larger than the noisy copy, is on the
    # size front.
    assert "size" in reference["pareto"]


def test_candidate_equal_to_reference_has_infinite_sqnr(tmp_path):
    ref, _, data = write_models(tmp_path)
    same = shutil.copy(ref, tmp_path / "same.onnx")
    result = compare(ref, [same], data, batch_sizes=(1,), **FAST)
    candidate = result["comparison"][1]
    assert candidate["fidelity"] == {"sqnr_db": math.inf, "top1_agreement": 1.0}
    # Without labels the fronts rank by agreement with the reference.
    assert result["quality"] == "top1_agreement" and candidate["accuracy"] is None
    assert candidate["quality"] == 1.0


def test_html_has_both_tradeoff_plots(tmp_path):
    pytest.importorskip("matplotlib")
    ref, noisy, data = write_models(tmp_path)
    result = compare(ref, [noisy], data, labels_key="y", batch_sizes=(1,), **FAST)
    page = report.render_html(result)
    assert "<h2>Accuracy vs latency (batch 1)</h2><img" in page
    assert "<h2>Accuracy vs size</h2><img" in page
    assert "Compression evaluation" in page


def test_mismatched_inputs_are_refused(tmp_path):
    ref, _, data = write_models(tmp_path)
    other = build_model(
        """
        net (float[N,1,6,6] z) => (float[N,3] scores) {
            f = Flatten (z)
            scores = Gemm (f, gw)
        }
        """,
        {"gw": np.zeros((36, 3), np.float32)},
    )
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(InputError, match="different inputs"):
        compare(ref, [tmp_path / "other.onnx"], data, batch_sizes=(1,), **FAST)
