"""Calibration within a memory budget: sizes, the batch/pass plan, and unchanged ranges."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.calibration.collect import collect_stats
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.memory import (
    activation_sizes,
    default_budget,
    parse_size,
    plan_memory,
)
from onnxq.calibration.stats import compute_range
from onnxq.errors import InputError
from onnxq.passes.calibrate import CalibrateRangesPass

# Six float tensors of 256 floats (1 KiB) per sample, computed by a chain of nodes.
_CHAIN = """
g (float[N, 256] x) => (float[N, 256] y) {
  a = Mul(x, s)
  r = Relu(a)
  t = Tanh(a)
  m = Add(r, t)
  y = Sigmoid(m)
}
"""


@pytest.fixture
def chain(text_model) -> ir.Model:
    return text_model(_CHAIN, s=np.full(256, 1.5, np.float32))


def _samples() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((10, 256)).astype(np.float32) * 3


def _data(model: ir.Model, batch_size: int):
    x = _samples()
    return open_calibration_data(lambda: [{"x": x}], model, batch_size=batch_size)


# ---------------------------------------------------------------------------------------
# Sizes and budgets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 << 30),
        ("4G", 4 << 30),
        ("1.5GiB", 3 << 29),
        ("512 mb", 512 << 20),
        ("64KB", 64 << 10),
        ("1000000", 1_000_000),
        (2048, 2048),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4XB", "-1GB", "0", "0GB"])
def test_parse_size_rejects_non_sizes(text):
    with pytest.raises(InputError, match="memory size"):
        parse_size(text)


def test_default_budget_is_half_the_available_memory_capped(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  25165824 kB\nMemAvailable:  10485760 kB\n")
    assert default_budget(meminfo) == 5 << 30
    meminfo.write_text("MemAvailable:  104857600 kB\n")  # 100 GB available
    assert default_budget(meminfo) == 16 << 30
    assert default_budget(tmp_path / "missing") == 4 << 30


def test_activation_sizes_use_the_first_feeds_concrete_shapes(text_model):
    # H and W are symbolic in the model: only the feeds say how large the tensors are.
    model = text_model(
        """
        g (float[N, 2, H, W] x) => (float[N, 4, H, W] y) {
          c = Concat <axis = 1> (x, x)
          h = Cast <to = 10> (c)
          y = Relu(c)
        }
        """
    )
    feeds = {"x": np.zeros((3, 2, 8, 5), np.float32)}
    sizes = activation_sizes(model, ["x", "c", "h", "y"], feeds, samples=3)
    assert sizes == {"x": 2 * 40 * 4, "c": 4 * 40 * 4, "h": 4 * 40 * 2, "y": 4 * 40 * 4}


def test_activation_sizes_count_unknown_shapes_as_the_largest(text_model):
    model = text_model("g (float[N, 8] x) => (float[N, 16] y) { y = Concat <axis = 1> (x, x) }")
    # An op no shape inference knows: its output's size is unknown.
    node = ir.Node("custom", "Mystery", [model.graph.inputs[0]])
    node.outputs[0].name = "u"
    model.graph.append(node)
    model.opset_imports["custom"] = 1
    feeds = {"x": np.zeros((2, 8), np.float32)}
    sizes = activation_sizes(model, ["x", "u", "y"], feeds, samples=2)
    assert sizes == {"x": 32, "u": 64, "y": 64}


# ---------------------------------------------------------------------------------------
# The planner (pure function)


def test_plan_keeps_one_pass_at_the_data_batch_when_it_fits():
    plan = plan_memory({"a": 100, "b": 100, "c": 100}, 10_000, max_batch=16, workspace=1)
    assert (plan.batch_size, plan.groups) == (16, (("a", "b", "c"),))
    assert plan.estimated_peak == 16 * 400 <= 10_000


def test_plan_lowers_the_batch_before_splitting_tensors():
    plan = plan_memory({"a": 100, "b": 100, "c": 100}, 1000, max_batch=16, workspace=1)
    # 400 bytes per sample (300 observed + one largest-tensor of workspace): 2 fit.
    assert (plan.batch_size, plan.passes) == (2, 1)
    plan = plan_memory({"a": 100, "b": 100, "c": 100}, 1000, max_batch=16, fixed=300, workspace=1)
    assert (plan.batch_size, plan.passes) == (1, 1)


def test_plan_splits_tensors_into_passes_at_batch_one():
    sizes = {"a": 100, "b": 100, "c": 100, "d": 50}
    plan = plan_memory(sizes, 350, max_batch=8, workspace=1)
    # 250 bytes left beside the workspace: groups are packed in graph order.
    assert plan.batch_size == 1
    assert plan.groups == (("a", "b"), ("c", "d"))
    assert plan.estimated_peak == 300 <= 350
    plan = plan_memory(sizes, 220, max_batch=8, workspace=1)
    assert plan.groups == (("a",), ("b",), ("c",), ("d",))


def test_plan_respects_a_static_batch():
    sizes = {"a": 100, "b": 100}
    plan = plan_memory(sizes, 600, max_batch=4, min_batch=4, workspace=0)
    assert (plan.batch_size, plan.groups) == (4, (("a",), ("b",)))


def test_plan_rejects_a_budget_too_small_for_one_tensor_of_one_sample():
    with pytest.raises(InputError, match=r"tensor 'b' .*at least 350 B \(--max-memory\)"):
        plan_memory({"a": 100, "b": 200}, 300, max_batch=8, fixed=50, workspace=0.5)


# ---------------------------------------------------------------------------------------
# Several passes give the ranges of one pass


@pytest.mark.parametrize(("method", "budget"), [("minmax", 11_000), ("entropy", 112_000)])
def test_several_passes_give_the_ranges_of_one(chain, method, budget):
    num_bins = 0 if method == "minmax" else 2048
    plans = []
    # Batches of 4 are split to the plan's batch size of 1.
    split = collect_stats(
        chain,
        _data(chain, 4),
        num_bins=num_bins,
        max_memory=budget,
        on_plan=plans.append,
    )
    assert plans[0].batch_size == 1 and plans[0].passes > 1
    assert sorted(n for g in plans[0].groups for n in g) == sorted(split)
    whole = collect_stats(chain, _data(chain, 1), num_bins=num_bins)
    assert set(split) == set(whole) == {"x", "a", "r", "t", "m", "y"}
    for name in whole:
        assert split[name].count == whole[name].count == 10 * 256
        assert compute_range(split[name], method) == compute_range(whole[name], method), name


def test_budget_too_small_for_one_tensor_is_an_input_error(chain):
    with pytest.raises(InputError, match=r"at least .* \(--max-memory\)"):
        collect_stats(chain, _data(chain, 4), num_bins=0, max_memory=2_000)


def test_several_passes_need_data_readable_more_than_once(chain):
    feeds = iter([{"x": _samples()[i : i + 1]} for i in range(3)])
    with pytest.raises(InputError, match="passes over the calibration data"):
        collect_stats(chain, feeds, num_bins=0, max_memory=8_000)


def test_pass_reports_the_plan_of_several_passes(chain):
    result = CalibrateRangesPass(_data(chain, 4), max_memory=11_000)(chain)
    assert result.plan is not None and result.plan.passes > 1
    whole = CalibrateRangesPass(_data(chain, 4))(chain)
    assert result.ranges == whole.ranges
