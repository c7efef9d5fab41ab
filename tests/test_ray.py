"""Tests on a real local Ray instance (few: starting Ray takes seconds on 2 cores)."""

import math
import operator

import numpy as np
import onnx_ir as ir
import pytest
from graph_builders import chain_model, fusing_model, seeded

from onnxq.calibration.collect import collect_stats
from onnxq.calibration.data import open_calibration_data
from onnxq.calibration.sharded import collect_stats_sharded
from onnxq.calibration.stats import METHODS, compute_range
from onnxq.executor import RayExecutor, make_executor
from onnxq.mixed_precision import tune_precision
from onnxq.numerics import numerics_for
from onnxq.passes.calibrate import CalibrateRangesPass


def test_ray_map_resolves_handles_and_returns_failures_in_their_slots(ray_instance):
    with make_executor("ray", 2) as executor:
        assert isinstance(executor, RayExecutor) and executor.workers == 2
        offset = executor.put(10)
        assert executor.map(operator.add, range(5), shared=(offset,)) == [10, 11, 12, 13, 14]
        results = executor.map(math.sqrt, [4.0, -1.0, 9.0], return_exceptions=True)
        assert results[0] == 2.0 and results[2] == 3.0
        assert isinstance(results[1], ValueError)
        with pytest.raises(ZeroDivisionError):
            executor.map(operator.truediv, [1, 0], shared=(0,))
    assert ray_instance.is_initialized()  # attached to the fixture's instance: left running


def test_ray_shards_merge_to_the_one_process_ranges_for_every_method(ray_instance, tmp_path):
    model = ir.serde.deserialize_model(fusing_model())
    x = seeded(1)(30, 4, 8, 8) * (1.7 ** (np.arange(30) % 9))[:, None, None, None]
    np.savez(tmp_path / "calib.npz", x=x.astype(np.float32))
    data = open_calibration_data(tmp_path / "calib.npz", model, batch_size=4)
    one = collect_stats(model, data)
    with make_executor("ray", 2) as executor:
        sharded = collect_stats_sharded(model, data, executor)
    assert sharded.shards == 2 and sharded.samples == 30
    for method in METHODS:
        for name, stats in one.items():
            assert compute_range(sharded.stats[name], method) == compute_range(stats, method)
    # One Ray worker still gets the work (the driver may only be attached to a cluster).
    with make_executor("ray", 1) as executor:
        assert collect_stats_sharded(model, data, executor).shards == 1


def test_ray_trials_give_the_sequential_placement(ray_instance, tmp_path):
    model = ir.serde.deserialize_model(chain_model(outlier=True))
    np.savez(tmp_path / "calib.npz", x=seeded(4)(64, 4, 8, 8))
    CalibrateRangesPass(open_calibration_data(tmp_path / "calib.npz", model, batch_size=16))(model)
    data = open_calibration_data(tmp_path / "calib.npz", model, batch_size=16, max_samples=32)
    batches = list(data.batches())
    sequential = tune_precision(model, numerics_for("avx2"), batches)
    with make_executor("ray", 2) as executor:
        parallel = tune_precision(model, numerics_for("avx2"), batches, executor=executor)
    assert parallel.status == sequential.status == "mixed"
    assert parallel.keep_fp32 == sequential.keep_fp32
    trials = [[(t.phase, t.fp32_units, t.passed) for t in p.trials] for p in (parallel, sequential)]
    assert trials[0] == trials[1]
