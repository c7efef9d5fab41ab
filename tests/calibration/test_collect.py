"""Collecting per-tensor statistics by running calibration data through a model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq.calibration.collect import collect_stats
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.ranges_file import load_ranges, save_ranges
from onnxq.errors import CompileError, InputError

_CONV_NET = """
g (float[N, 3, 10, 10] x) => (float[N, 4] y) {
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r1 = Relu(c1)
  c2 = Conv <strides = [2, 2]> (r1, w2)
  s = Sigmoid(c2)
  m = Mul(c2, s)
  p = GlobalAveragePool(m)
  y = Flatten(p)
}
"""


@pytest.fixture
def conv_net(text_model) -> ir.Model:
    rng = np.random.default_rng(7)
    return text_model(
        _CONV_NET,
        w1=rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        b1=rng.standard_normal(8).astype(np.float32),
        w2=rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3,
    )


def _reference_outputs(model: ir.Model, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Runs all samples at once through a plain ORT session exposing ``names``."""
    proto = ir.serde.serialize_model(model)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    proto.graph.output.extend([])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts)
    outputs = session.run(names, {"x": x})
    return dict(zip(names, outputs, strict=True))


def test_ranges_match_numpy_minmax_of_intermediates(tmp_path, conv_net):
    x = np.random.default_rng(0).standard_normal((13, 3, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", conv_net, batch_size=4)
    before = ir.serde.serialize_model(conv_net).SerializeToString()
    stats = collect_stats(conv_net, data, progress=False)
    # The caller's model is untouched.
    assert ir.serde.serialize_model(conv_net).SerializeToString() == before
    assert set(stats) == {"x", "c1", "r1", "c2", "s", "m", "p", "y"}
    reference = _reference_outputs(conv_net, x, sorted(stats))
    for name, s in stats.items():
        ref = reference[name]
        assert s.count == ref.size, name
        np.testing.assert_allclose([s.min, s.max], [ref.min(), ref.max()], rtol=1e-5, err_msg=name)


def test_selected_tensors_only(mlp):
    data = open_calibration_data(lambda: [{"x": np.ones((2, 4), np.float32)}], mlp)
    assert set(collect_stats(mlp, data, ["r"], progress=False)) == {"r"}
    with pytest.raises(InputError, match=r"not found in the model.*nope"):
        collect_stats(mlp, data, ["r", "nope"])


def test_nan_activation_names_tensor_and_node(text_model):
    model = text_model(
        """
        g (float[N, 2] x) => (float[N, 2] y) {
          shifted = Sub(x, ten)
          logged = Log(shifted)
          y = Relu(logged)
        }
        """,
        ten=np.array(10, np.float32),
    )
    data = open_calibration_data(lambda: [{"x": np.ones((3, 2), np.float32)}], model)
    with pytest.raises(CompileError, match="tensor 'logged' \\(output of Log node"):
        collect_stats(model, data, progress=False)


def test_untyped_intermediates_get_types_from_inference(text_model):
    # The parsed graph has no value_info at all: every intermediate type is inferred.
    model = text_model("g (float[N, 2] x) => (float[N, 2] y) { t = Abs(x)\n y = Neg(t) }")
    assert model.graph.node(0).outputs[0].dtype is None
    data = open_calibration_data(lambda: [{"x": -np.ones((1, 2), np.float32)}], model)
    stats = collect_stats(model, data, progress=False)
    assert (stats["t"].max, stats["y"].min) == (1.0, -1.0)


def test_progress_to_stderr(tmp_path, mlp, capsys):
    data = open_calibration_data(lambda: [{"x": np.ones((2, 4), np.float32)}] * 3, mlp)
    collect_stats(mlp, data, progress=True)
    assert "calibrating: 6 samples" in capsys.readouterr().err
    np.savez(tmp_path / "c.npz", x=np.ones((5, 4), np.float32))
    collect_stats(mlp, open_calibration_data(tmp_path / "c.npz", mlp), progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_ranges_roundtrip(tmp_path):
    ranges = {"a": (-1.5, 2.0), "b/c:0": (0.0, 1e-7)}
    path = save_ranges(tmp_path / "r.json", ranges, {"method": "entropy", "num_samples": 8})
    loaded, meta = load_ranges(path)
    assert loaded == ranges and meta == {"method": "entropy", "num_samples": 8}
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not a valid ranges JSON"),
        ('{"format": "other"}', "not an onnxq ranges file"),
        ('{"format": "onnxq.ranges", "version": 9, "ranges": {}}', "version 9"),
        ('{"format": "onnxq.ranges", "version": 1, "ranges": []}', "must be JSON objects"),
        ('{"format": "onnxq.ranges", "version": 1, "ranges": {"a": [1]}}', "range of 'a'"),
        ('{"format": "onnxq.ranges", "version": 1, "ranges": {"a": [2, 1]}}', "lo <= hi"),
        ('{"format": "onnxq.ranges", "version": 1, "ranges": {"a": [NaN, 1]}}', "NaN"),
    ],
)
def test_bad_ranges_files(tmp_path, text, words):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(InputError, match=words):
        load_ranges(tmp_path / "r.json")


def test_missing_ranges_file(tmp_path):
    with pytest.raises(InputError, match="no such ranges file"):
        load_ranges(tmp_path / "none.json")


def test_saved_file_is_plain_json(tmp_path):
    save_ranges(tmp_path / "r.json", {"a": (np.float32(-1), np.float64(1))}, {})
    assert json.loads((tmp_path / "r.json").read_text())["ranges"] == {"a": [-1.0, 1.0]}


def test_progress_callback_gets_samples_and_total(tmp_path, mlp):
    np.savez(tmp_path / "c.npz", x=np.ones((5, 4), np.float32))
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=2)
    calls = []
    collect_stats(mlp, data, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]

    unknown = open_calibration_data(lambda: [{"x": np.ones((3, 4), np.float32)}] * 2, mlp)
    calls.clear()
    collect_stats(mlp, unknown, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (6, None) and all(total is None for _, total in calls)
