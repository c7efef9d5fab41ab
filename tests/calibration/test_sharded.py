from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import pytest
from graph_builders import fusing_model

from onnxq.calibration.collect import collect_stats
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.sharded import collect_stats_sharded, shard_bounds
from onnxq.calibration.stats import METHODS, TensorStats, compute_range, merge_stats
from onnxq.errors import CompileError
from onnxq.executor import LocalExecutor, make_executor


class _InProcess(LocalExecutor):
    """Shards run one after another in this process, as on three workers."""

    workers = 3


@pytest.fixture
def net() -> ir.Model:
    return ir.serde.deserialize_model(fusing_model())


@pytest.fixture
def data_file(tmp_path):
    """Samples whose scale grows and jumps, so the histograms widen and shift mid-way."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 4, 8, 8)).astype(np.float32)
    x *= (1.6 ** (np.arange(37) % 11))[:, None, None, None].astype(np.float32)
    x[20:24] += 40.0
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path / "calib.npz"


def _ranges(stats: dict[str, TensorStats]) -> dict[tuple[str, str], tuple[float, float]]:
    return {(m, n): compute_range(s, m) for m in METHODS for n, s in stats.items()}


def _same_state(a: TensorStats, b: TensorStats) -> bool:
    fields = ("count", "zero_count", "min", "max", "exponent", "offset")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and np.array_equal(a.hist, b.hist)


def test_shard_bounds_cover_every_batch_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, None)]
    assert shard_bounds(2, 5) == [(0, 1), (1, None)]


@pytest.mark.parametrize("seed", range(5))
def test_merged_parts_are_one_pass_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 3, size=30)
    batches = [(rng.standard_normal(64) * s + rng.normal() * s).astype(np.float32) for s in scales]
    batches[5] = np.maximum(batches[5], 0)  # a spike of zeros, as after Relu
    one = TensorStats(256)
    for b in batches:
        one.update(b)
    cuts = [0, *sorted(rng.choice(np.arange(1, 30), size=3, replace=False)), 30]
    parts = []
    for lo, hi in itertools.pairwise(cuts):
        part = TensorStats(256, mergeable=True)
        for b in batches[lo:hi]:
            part.update(b)
        parts.append(part)
    merged = merge_stats(parts)
    assert _same_state(merged, one)
    assert _ranges({"t": merged}) == _ranges({"t": one})
    # Merging is associative: merged merges again.
    assert _same_state(merge_stats([merge_stats(parts[:2]), merge_stats(parts[2:])]), one)


def test_merge_keeps_the_width_a_constant_first_batch_chose(caplog):
    # A constant first batch gets a finer width than the overall range needs; one pass
    # keeps it (the range still fits), and so must the merge.
    rng = np.random.default_rng(0)
    batches = [np.full(8, 1.0, np.float32)]
    batches += [(1 + 5e-6 * rng.random(64)).astype(np.float32) for _ in range(6)]
    one = TensorStats(256)
    for b in batches:
        one.update(b)
    parts = [TensorStats(256, mergeable=True) for _ in range(3)]
    for i, b in enumerate(batches):
        parts[min(i // 3, 2)].update(b)
    merged = merge_stats(parts)
    assert "not exactly" not in caplog.text  # exact, not widened to the coarsest part
    assert merged.exponent == one.exponent == -24
    assert _same_state(merged, one)
    assert _ranges({"t": merged}) == _ranges({"t": one})


def test_merge_refuses_parts_not_made_mergeable():
    part = TensorStats(16)
    part.update(np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError, match="mergeable"):
        merge_stats([part])


def test_shards_computed_in_any_order_merge_to_one_pass(net, data_file):
    data = open_calibration_data(data_file, net, batch_size=4)
    one = collect_stats(net, data)
    bounds = shard_bounds(data.num_batches, 4)
    shards = {}
    for index in (2, 0, 3, 1):  # finishing in any order; merged in the data's order
        shards[index] = collect_stats(net, data, shard=bounds[index], mergeable=True)
    merged = {n: merge_stats([shards[i][n] for i in range(4)]) for n in one}
    assert all(_same_state(merged[n], one[n]) for n in one)
    assert _ranges(merged) == _ranges(one)


@pytest.mark.parametrize("max_memory", [None, 160_000])
def test_sharded_collect_gives_the_one_pass_ranges(net, data_file, max_memory):
    data = open_calibration_data(data_file, net, batch_size=4)
    plans = []
    one = collect_stats(net, data, max_memory=max_memory, on_plan=plans.append)
    sharded = collect_stats_sharded(net, data, _InProcess(), max_memory=max_memory)
    assert sharded.shards == 3 and sharded.samples == 37
    assert _ranges(sharded.stats) == _ranges(one)
    if max_memory is not None:  # the budget split the data's batches into smaller runs
        assert plans[0].batch_size < 4


def test_pool_of_two_workers_gives_the_one_pass_ranges(net, data_file):
    data = open_calibration_data(data_file, net, batch_size=4)
    one = collect_stats(net, data)
    seen = []
    with make_executor("local", 2) as executor:
        sharded = collect_stats_sharded(
            net, data, executor, progress=lambda done, total: seen.append((done, total))
        )
    assert sharded.shards == 2
    assert _ranges(sharded.stats) == _ranges(one)
    assert seen[-1] == (37, 37)


def test_a_shard_names_the_bad_sample_counting_from_the_data_start(text_model, tmp_path):
    model = text_model(
        """
        g (float[N, 2] x) => (float[N, 2] y) {
          y = Log(x)
        }
        """
    )
    x = np.ones((12, 2), np.float32)
    x[9, 1] = -1.0  # log(-1) is NaN: in the second shard
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", model, batch_size=3)
    with pytest.raises(CompileError, match="batch starting at sample 9"):
        collect_stats_sharded(model, data, _InProcess())
