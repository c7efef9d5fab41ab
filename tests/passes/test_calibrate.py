"""CalibrateRangesPass: ranges from calibration data or preloaded, stored on IR values."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.calibration.collect import collect_stats
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.stats import compute_range
from onnxq.errors import InputError
from onnxq.executor import LocalExecutor
from onnxq.passes.calibrate import RANGE_KEY, CalibrateRangesPass, value_range

_GRAPH = """
g (float[N, 4] x) => (float[N, 3] y) {
  h = MatMul(x, w)
  r = Relu(h)
  y = Add(r, b)
}
"""


@pytest.fixture
def model(build_onnx) -> ir.Model:
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
    return ir.serde.deserialize_model(build_onnx(_GRAPH, weights))


def _data(model: ir.Model):
    x = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    return open_calibration_data(lambda: [{"x": x}], model, batch_size=16)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    values.update((v.name, v) for node in model.graph for v in node.outputs)
    return values


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_ranges_stored_on_values(model, method):
    data = _data(model)
    expected = {n: compute_range(s, method) for n, s in collect_stats(model, data).items()}
    calibrate = CalibrateRangesPass(data, method=method)
    result = calibrate(model)
    assert result.model is model and result.modified is False
    values = _values(model)
    assert set(expected) == {"x", "h", "r", "y"}
    for name, (lo, hi) in expected.items():
        assert values[name].meta[RANGE_KEY] == (lo, hi)
        assert value_range(values[name]) == (lo, hi)
        assert isinstance(lo, float) and lo <= 0 <= hi
    assert result.details == {
        "method": method,
        "params": {},
        "num_samples": 40,
        "num_tensors": 4,
    }


def test_repr_is_readable(model):
    text = repr(CalibrateRangesPass(_data(model), method="percentile", params={"percentile": 99.9}))
    assert text.startswith("CalibrateRangesPass(method='percentile', params={'percentile': 99.9}")
    assert "callable '<lambda>'" in text and "array" not in text
    assert (
        repr(CalibrateRangesPass(ranges={"r": (0, 1)})) == "CalibrateRangesPass(ranges=<1 tensors>)"
    )


def test_preloaded_ranges_skip_running(model, caplog):
    calibrate = CalibrateRangesPass(ranges={"r": (0, 2), "h": (-1, 1), "gone": (0, 1)})
    with caplog.at_level(logging.WARNING):
        result = calibrate(model)
    assert result.modified is False
    values = _values(model)
    assert values["r"].meta[RANGE_KEY] == (0.0, 2.0)
    assert RANGE_KEY not in values["y"].meta
    assert "gone" in caplog.text
    assert result.details["num_tensors"] == 2 and result.details["num_samples"] is None


def test_preloaded_ranges_matching_nothing(model):
    with pytest.raises(InputError, match="none of the 1 preloaded ranges"):
        CalibrateRangesPass(ranges={"other": (0, 1)})(model)


def test_bad_configuration(model):
    with pytest.raises(InputError, match="either calibration data or preloaded ranges"):
        CalibrateRangesPass()
    with pytest.raises(InputError, match="either"):
        CalibrateRangesPass(_data(model), ranges={"r": (0, 1)})
    with pytest.raises(InputError, match="unknown calibration method"):
        CalibrateRangesPass(_data(model), method="magic")


class _ThreeShards(LocalExecutor):
    """Shards run one after another in this process, as on three workers."""

    workers = 3


def test_sharded_calibration_gives_the_one_pass_ranges(model, tmp_path):
    x = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", model, batch_size=8)
    one = CalibrateRangesPass(data, method="entropy")(model)
    sharded = CalibrateRangesPass(data, method="entropy", executor=_ThreeShards())(model)
    assert one.details.get("shards") is None
    assert sharded.details["shards"] == 3 and sharded.details["num_samples"] == 40
    assert sharded.ranges == one.ranges
