"""``onnxq compile`` on models whose inputs or outputs do not follow ``[batch, ...]``.

A calibration sample is a set of model inputs, each as the model takes it; samples share
a run only where the model allows it. Outputs are compared run by run, as produced.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_builders import build_model, fusing_weights, seeded

# Conv -> Relu -> Conv: any height and width; the output's shape follows the input's.
DYNAMIC_HW = """
net (float[N,4,H,W] x) => (float[N,8,H,W] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (c)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


def _conv_weights(*names: str) -> dict[str, np.ndarray]:
    """FUSING_NET's convs: ``w1 b1`` (4 -> 8 channels) and ``w2 b2`` (8 -> 8)."""
    weights = fusing_weights()
    return {name: weights[name] for name in names or ("w1", "b1", "w2", "b2")}


def _save(tmp_path, text: str, weights: dict[str, np.ndarray], scalars: tuple[str, ...] = ()):
    """Saves the graph; ``scalars`` name inputs declared ``T[]`` that are rank 0."""
    model = build_model(text, weights, check=False)
    for value in model.graph.input:
        if value.name in scalars:
            # The text parser leaves ``T[]`` without a shape (unknown rank): make it rank 0.
            value.type.tensor_type.shape.SetInParent()
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _compile(cli, model, calib, tmp_path, *extra):
    report = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    result = cli(
        "compile", model, "-o", out, "--calibration-data", calib, "--report", report, *extra
    )
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def test_dynamic_height_and_width_take_their_shapes_from_the_data(cli, tmp_path):
    model = _save(tmp_path, DYNAMIC_HW, _conv_weights())
    np.savez(tmp_path / "c.npz", x=seeded(1)(6, 4, 10, 12))
    # Default flags: the latency check times the models at the first sample's shape.
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path)
    assert report["latency"]["int8_p50_ms"] > 0
    assert report["calibration"]["num_samples"] == 6


def test_folder_of_samples_with_different_sizes(cli, tmp_path):
    model = _save(tmp_path, DYNAMIC_HW, _conv_weights())
    folder = tmp_path / "calib"
    folder.mkdir()
    normal = seeded(2)
    for i, (h, w) in enumerate([(8, 8), (12, 10), (8, 8), (6, 14), (12, 10)]):
        np.savez(folder / f"{i}.npz", x=normal(1, 4, h, w))
    report = _compile(cli, model, folder, tmp_path, "--no-latency-check")
    assert report["calibration"]["num_samples"] == 5
    assert report["fidelity"]["samples"] == 5
    assert float(report["fidelity"]["min_sqnr_db"]) >= 20


def test_scalar_input_one_sample_per_file(cli, tmp_path):
    text = """
    net (float[N,T] x, int64[] sr) => (float[N,6] y) {
        f = Cast <to = 1> (sr)
        s = Div (x, f)
        p = ReduceMean <axes = [1], keepdims = 1> (s)
        y = MatMul (p, w)
    }
    """
    model = _save(tmp_path, text, {"w": seeded(0)(1, 6)}, scalars=("sr",))
    folder = tmp_path / "calib"
    folder.mkdir()
    normal = seeded(3)
    for i, length in enumerate([16, 16, 24]):
        np.savez(folder / f"{i}.npz", x=normal(1, length), sr=np.array(8000 * (i + 1)))
    # Default flags: the latency check runs on the first sample (a scalar sr included).
    report = _compile(cli, model, folder, tmp_path)
    assert report["calibration"]["num_samples"] == 3
    assert report["latency"]["int8_p50_ms"] > 0


def test_scalar_input_beside_a_batch_in_one_npz(cli, tmp_path):
    text = """
    net (float[N,T] x, float[] scale) => (float[N,6] y) {
        s = Mul (x, scale)
        y = MatMul (s, w)
    }
    """
    model = _save(tmp_path, text, {"w": seeded(0)(8, 6)}, scalars=("scale",))
    # The scalar makes the file one sample: the batch of 5 rows runs as the model's input.
    np.savez(tmp_path / "c.npz", x=seeded(4)(5, 8), scale=np.float32(0.5))
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path, "--no-latency-check")
    assert report["calibration"]["num_samples"] == 1


def test_recurrent_state_with_a_fixed_leading_axis(cli, tmp_path):
    text = """
    net (float[N,8] x, float[2,N,8] h) => (float[N,8] y) {
        m = MatMul (x, w)
        s = ReduceSum <keepdims = 0> (h, axes)
        y = Add (m, s)
    }
    """
    weights = {"w": seeded(0)(8, 8), "axes": np.array([0], np.int64)}
    model = _save(tmp_path, text, weights)
    normal = seeded(5)
    # x lists 7 samples on axis 0; h is a stack of 7 whole states (one more axis).
    np.savez(tmp_path / "c.npz", x=normal(7, 8), h=normal(7, 2, 1, 8))
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path, "--no-latency-check")
    assert report["calibration"]["num_samples"] == 7


def test_inputs_with_different_static_leading_dims(cli, tmp_path):
    text = """
    net (float[1,257,1,2] a, float[2,1,4,4,3] b) => (float[1,257,1,2] y, float[2,1,4,4,3] z) {
        y = Relu (a)
        z = Sigmoid (b)
    }
    """
    model = _save(tmp_path, text, {})
    normal = seeded(6)
    np.savez(tmp_path / "c.npz", a=normal(4, 257, 1, 2), b=normal(4, 2, 1, 4, 4, 3))
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path, "--no-latency-check")
    assert report["calibration"]["num_samples"] == 4


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        # The output's axis 0 is the input's axis 2: 5 rows for one sample.
        (
            "net (float[1,8,5,16] x) => (float[5,8,16,1] y) {"
            " y = Transpose <perm = [2, 1, 3, 0]> (x) }",
            (8, 5, 16),
        ),
        (
            "net (float[1,5,15,4] x) => (float[2,5,15,4] y) { y = Concat <axis = 0> (x, x) }",
            (5, 15, 4),
        ),
        (
            "net (float[1,4,8,8] x) => (float[8,1,6,6] y) {"
            " c = Conv (x, w1, b1) r = Relu (c) y = Transpose <perm = [1, 0, 2, 3]> (r) }",
            (4, 8, 8),
        ),
    ],
    ids=["transpose", "concat-axis0", "conv-relu-transpose"],
)
def test_outputs_whose_axis0_is_not_the_sample_axis(cli, tmp_path, text, shape):
    weights = (
        {k: v for k, v in _conv_weights().items() if k.endswith("1")} if "Conv" in text else {}
    )
    model = _save(tmp_path, text, weights)
    np.savez(tmp_path / "c.npz", x=seeded(7)(16, 1, *shape)[:, 0])
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path, "--no-latency-check")
    assert report["fidelity"]["samples"] == 16
    assert float(report["fidelity"]["min_sqnr_db"]) >= 20


def test_batched_time_major_output(cli, tmp_path):
    # A CRNN-style head: [time, batch, classes]; 40 samples run as batches of 16, 16, 8.
    text = """
    net (float[N,5,4] x) => (float[5,N,6] y) {
        m = MatMul (x, w)
        y = Transpose <perm = [1, 0, 2]> (m)
    }
    """
    model = _save(tmp_path, text, {"w": seeded(0)(4, 6)})
    np.savez(tmp_path / "c.npz", x=seeded(8)(40, 5, 4))
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path, "--no-latency-check")
    # The check compares the runs calibration kept for its 32 samples, whole.
    assert report["fidelity"]["samples"] == 32
    assert float(report["fidelity"]["min_sqnr_db"]) >= 20


def test_verify_runs_on_the_calibration_data(cli, tmp_path):
    # Calibrated on small positive inputs: standard-normal ones would fall far outside the
    # input's range, and --verify's SQNR floor would reject a sound int8 model.
    text = "net (float[N,16] x) => (float[N,8] y) { y = MatMul (x, w) }"
    model = _save(tmp_path, text, {"w": seeded(0)(16, 8)})
    x = np.random.default_rng(9).uniform(0.0, 0.05, (32, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    report = _compile(cli, model, tmp_path / "c.npz", tmp_path, "--verify", "--no-latency-check")
    assert float(report["fidelity"]["min_sqnr_db"]) >= 20
