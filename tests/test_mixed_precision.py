"""Tests for onnxq/mixed_precision.py: the search on stubs, then on small graphs with ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import (
    WIDE_RANGE,
    build_model,
    chain_model,
    encoder_model,
    seeded,
    wide_range_samples,
)

from onnxq.calibration.data import open_calibration_data
from onnxq.executor import make_executor
from onnxq.fidelity import Check, FidelityResult
from onnxq.mixed_precision import PrecisionSearch, Unit, quantize_clone, tune_precision
from onnxq.numerics import numerics_for
from onnxq.passes.calibrate import CalibrateRangesPass

# ---------------------------------------------------------------------------- on stubs


def _stub(needed: set[str], clock: list[float] | None = None, step: float = 0.0):
    """build/evaluate where a placement passes iff it keeps every node in ``needed`` fp32."""
    built: list[dict[str, str]] = []

    def build(keep):
        built.append(dict(keep))
        if clock is not None:
            clock[0] += step
        return keep

    def evaluate(keep):
        missing = len(needed - set(keep))
        sqnr = 30.0 - 15.0 * missing
        return FidelityResult([Check("y", "sqnr_db", sqnr, 20.0, sqnr >= 20.0)], 1)

    return build, evaluate, built


UNITS = [
    Unit("a", ("n1", "n2"), 5.0),
    Unit("b", ("n3",), 40.0),
    Unit("c", ("n4",), 8.0),
    Unit("d", ("n5",), 2.0),
]


def test_search_keeps_the_fewest_units_that_meet_the_criteria():
    build, evaluate, _ = _stub({"n1", "n2", "n4"})
    placement = PrecisionSearch(build, evaluate, UNITS).run()
    assert placement.status == "mixed"
    assert {i.unit for i in placement.islands} == {"a", "c"}
    assert set(placement.keep_fp32) == {"n1", "n2", "n4"}
    assert placement.model == placement.keep_fp32  # the model built for exactly those
    assert placement.fidelity is not None and placement.fidelity.passed
    # Each island's gain was measured: returning it to int8 costs 15 dB per missing node.
    assert {i.unit: i.gain_sqnr_db for i in placement.islands} == {"a": 30.0, "c": 15.0}
    assert "costs 5.0 dB" in placement.keep_fp32["n1"]


def test_search_does_not_run_when_all_int8_passes():
    build, evaluate, built = _stub(set())
    ranked = []
    placement = PrecisionSearch(build, evaluate, lambda: ranked.append(1) or UNITS).run()
    assert placement.status == "int8" and placement.islands == [] and placement.keep_fp32 == {}
    assert built == [{}] and ranked == []  # one trial, no ranking


def test_search_falls_back_to_fp32_when_the_budget_runs_out():
    clock = [0.0]
    build, evaluate, built = _stub({"n1", "n2", "n3", "n4"}, clock, step=10.0)
    search = PrecisionSearch(build, evaluate, UNITS, budget_s=25.0, clock=lambda: clock[0])
    placement = search.run()
    assert placement.status == "fp32" and placement.model is None
    assert "25 s tuning budget" in placement.reason
    assert len(built) <= 3  # no trial starts once the next one would overrun


def test_search_falls_back_to_fp32_when_only_every_unit_fp32_would_pass():
    build, evaluate, _ = _stub({"n1", "n2", "n3", "n4", "n5"})
    placement = PrecisionSearch(build, evaluate, UNITS).run()
    assert placement.status == "fp32"
    assert "only with every quantized layer fp32" in placement.reason


def test_search_falls_back_to_fp32_when_the_passing_placement_has_no_int8_left():
    build, evaluate, _ = _stub({"n1", "n2", "n4"})
    placement = PrecisionSearch(build, evaluate, UNITS, is_int8=lambda keep: "n3" in keep).run()
    assert placement.status == "fp32" and placement.keep_fp32 == {}


# ---------------------------------------------------------------------------- on graphs


def _calibrated(proto: onnx.ModelProto, tmp_path: Path, samples) -> tuple[ir.Model, list]:
    model = ir.serde.deserialize_model(proto)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{model.graph.inputs[0].name: samples})
    CalibrateRangesPass(open_calibration_data(calib, model, batch_size=16))(model)
    data = open_calibration_data(calib, model, batch_size=16, max_samples=32)
    return model, list(data.batches())


def _int8_convs(model: ir.Model) -> set[str]:
    """Convs whose weight comes from a DequantizeLinear (int8), not an fp32 initializer."""
    return {
        n.name for n in model.graph if n.op_type == "Conv" and n.inputs[1].producer() is not None
    }


def test_one_bad_range_is_kept_fp32_and_the_rest_stays_int8(tmp_path):
    model, batches = _calibrated(chain_model(outlier=True), tmp_path, seeded(4)(64, 4, 8, 8))
    placement = tune_precision(model, numerics_for("avx2"), batches)
    assert placement.trials[0].min_sqnr_db < 20  # all int8 fails
    assert placement.status == "mixed"
    assert [i.unit for i in placement.islands] == ["r2"]
    assert set(placement.keep_fp32) == {"conv2", "conv3"}
    assert placement.fidelity.passed and placement.fidelity.min_sqnr_db >= 20
    assert placement.islands[0].gain_sqnr_db > 0
    # The shipped model: conv2/conv3 fp32, the other four int8 (fewer fp32 units than all).
    assert _int8_convs(placement.model) == {"conv0", "conv1", "conv4", "conv5"}
    # The calibrated fp32 model the search started from is unchanged.
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)


def test_a_well_behaved_net_gets_no_island_and_no_search(tmp_path):
    model, batches = _calibrated(chain_model(outlier=False), tmp_path, seeded(4)(64, 4, 8, 8))
    placement = tune_precision(model, numerics_for("avx2"), batches)
    assert placement.status == "int8"
    assert placement.islands == [] and len(placement.trials) == 1


def test_a_model_int8_cannot_serve_falls_back_to_fp32(tmp_path):
    proto = build_model(WIDE_RANGE, {"w": seeded(5)(64, 16)})
    model, batches = _calibrated(proto, tmp_path, wide_range_samples(64))
    placement = tune_precision(model, numerics_for("avx2"), batches)
    assert placement.status == "fp32" and placement.model is None
    assert placement.reason and placement.fidelity is not None
    assert not placement.fidelity.passed


def test_quantize_clone_leaves_the_calibrated_model_alone(tmp_path):
    model, _ = _calibrated(chain_model(outlier=False), tmp_path, seeded(4)(32, 4, 8, 8))
    before = [n.op_type for n in model.graph]
    int8, qdq = quantize_clone(model, numerics_for("avx2"), {"conv3": "test"})
    assert [n.op_type for n in model.graph] == before
    assert qdq.details["not_quantized"]["conv3"].endswith("test")
    assert qdq.scale_groups["r2"] == ["conv2"]  # conv3 is fp32, so only conv2 uses r2
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph)


def _ort_op_types(model: ir.Model, tmp_path: Path) -> list[str]:
    """Op types of ONNX Runtime's optimised graph (what the CPU provider runs)."""
    from onnxq import runtime

    path = tmp_path / "ort-optimized.onnx"
    runtime.create_session(model, optimization="all", threads=1, optimized_model_path=path)
    return [n.op_type for n in onnx.load(path).graph.node]


@pytest.mark.usefixtures("sum_beats_skip_layernorm")
def test_quantize_clone_for_cpu_writes_fp32_residual_adds_as_sum_not_int8_ones(tmp_path):
    from onnxq.mixed_precision import run_model

    proto = onnx.shape_inference.infer_shapes(encoder_model())  # as cleanup leaves it
    model, batches = _calibrated(proto, tmp_path, seeded(4)(32, 8, 16))
    plain, _ = quantize_clone(model, numerics_for("vnni"))
    cpu, qdq = quantize_clone(model, numerics_for("vnni"), prevent_skip_layernorm=True)
    ops = {n.name: n.op_type for n in cpu.graph}
    # The fp32 residual Add (its input x has no int8 producer) feeds the LayerNorm: Sum.
    assert ops["residual"] == "Sum" and "residual" in qdq.details["not_quantized"]
    # The int8 one feeds a QuantizeLinear: left for ONNX Runtime's QLinearAdd.
    assert ops["residual2"] == "Add" and "residual2" in qdq.details["quantized_nodes"]
    before, after = _ort_op_types(plain, tmp_path), _ort_op_types(cpu, tmp_path)
    assert before.count("SkipLayerNormalization") == 1  # what the rewrite prevents
    assert "SkipLayerNormalization" not in after
    assert after.count("LayerNormalization") == 2

    def int8_kernels(ops: list[str]) -> list[str]:
        return [op for op in ops if op.startswith("QLinear") or "Integer" in op]

    # Every QDQ unit ONNX Runtime fused still fuses (QLinearAdd, QLinearMatMul, ...).
    assert int8_kernels(after) == int8_kernels(before)
    assert "QLinearAdd" in int8_kernels(after)
    # Sum adds as Add does: only LayerNormalization's vs SkipLayerNorm's float rounding differs.
    for got, expected in zip(run_model(cpu, batches), run_model(plain, batches), strict=True):
        np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-5, atol=1e-5)


def test_choose_precision_follows_the_compile_configuration(tmp_path):
    from onnxq.config import CompileConfig
    from onnxq.mixed_precision import QDQ_DETAILS_KEY, choose_precision

    model, batches = _calibrated(chain_model(outlier=True), tmp_path, seeded(4)(64, 4, 8, 8))
    # No budget: all-int8 misses the floor and nothing else is tried.
    placement = choose_precision(model, CompileConfig(tune_budget=0, target="avx2"), batches)
    assert placement.status == "fp32" and len(placement.trials) == 1
    assert "0 s tuning budget" in placement.reason
    # The user's --exclude is honoured by every trial.
    config = CompileConfig(target="avx2", exclude=("conv2",))
    placement = choose_precision(model, config, batches)
    assert placement.model.meta[QDQ_DETAILS_KEY]["not_quantized"]["conv2"].endswith("--exclude")


def test_criteria_from_imports_the_metric(tmp_path):
    from onnxq.config import CompileConfig
    from onnxq.mixed_precision import criteria_from

    criteria = criteria_from(CompileConfig(metric="math:isclose", min_agreement=0.5))
    assert criteria.metric is not None and criteria.metric_name == "math:isclose"
    assert criteria.min_agreement == 0.5


# A YOLO-style head: one conv computes box coordinates (hundreds) and class logits (a few
# units); Split, boxes scaled by the stride, Sigmoid on the logits, Concat into one output.
# The conv's one int8 range is set by the boxes, so the logits round to a few steps.
PACKED_HEAD = """
head (float[N,8,16] f) => (float[N,7,16] y) {
    [conv_a] a = Conv <kernel_shape = [1]> (f, wa, ba)
    [relu_a] ra = Relu (a)
    [conv_b] b = Conv <kernel_shape = [1]> (ra, wb, bb)
    [relu_b] rb = Relu (b)
    [head] o = Conv <kernel_shape = [1]> (rb, wh, bh)
    [split] box, cls = Split <axis = 1> (o, sizes)
    [scale] s = Mul (box, stride)
    [sig] p = Sigmoid (cls)
    [cat] y = Concat <axis = 1> (s, p)
}
"""


def _packed_head() -> onnx.ModelProto:
    normal = seeded(11)
    head = normal(7, 8, 1, scale=0.5)
    head[:4] *= 100.0  # the box rows
    weights = {
        "wa": normal(8, 8, 1, scale=0.5),
        "ba": normal(8, scale=0.1),
        "wb": normal(8, 8, 1, scale=0.5),
        "bb": normal(8, scale=0.1),
        "wh": head,
        "bh": normal(7, scale=0.1),
        "sizes": np.array([4, 3], np.int64),
        "stride": np.array(8.0, np.float32),
    }
    return onnx.shape_inference.infer_shapes(build_model(PACKED_HEAD, weights))


def test_a_packed_output_whose_small_part_int8_breaks_is_caught_and_fixed(tmp_path):
    model, batches = _calibrated(_packed_head(), tmp_path, seeded(12)(64, 8, 16))
    placement = tune_precision(model, numerics_for("avx2"), batches)
    failures = placement.trials[0].summary.split("; ")
    # All-int8 fails on the probabilities only: the whole output's SQNR (boxes) passes.
    assert failures and all(f.startswith("y[:, 4:7]") for f in failures), failures
    assert placement.status == "mixed" and [i.unit for i in placement.islands] == ["o"]
    assert placement.fidelity.passed
    assert _int8_convs(placement.model) == {"conv_a", "conv_b"}  # the head alone is fp32


def test_doubling_starts_high_when_the_budget_affords_few_trials():
    units = [Unit(f"u{i}", (f"n{i}",), float(i)) for i in range(64)]
    clock = [0.0]
    build, evaluate, _ = _stub({f"n{i}" for i in range(20)}, clock, step=10.0)
    search = PrecisionSearch(build, evaluate, units, budget_s=75.0, clock=lambda: clock[0])
    placement = search.run()
    # Six trials fit after all-int8; doubling from 1 (1, 2, 4, 8, 16, 32) would use them
    # all; it starts at 4 instead and has trials left to bisect.
    assert [len(t.fp32_units) for t in placement.trials[1:4]] == [4, 8, 16]
    assert placement.status == "mixed" and 20 <= len(placement.islands) < 32


def test_minimising_returns_a_unit_to_int8_only_with_room_to_spare():
    # a and c are needed; b is not, but without it the criteria pass by only 0.5 dB.
    units = [
        Unit("b", ("n3",), 1.0),
        Unit("a", ("n1", "n2"), 5.0),
        Unit("c", ("n4",), 8.0),
        Unit("d", ("n5",), 40.0),
    ]
    clock = [0.0]

    def build(keep):
        clock[0] += 10.0  # slow trials: ranked by local SQNR, not end to end
        return keep

    def evaluate(keep):
        missing = len({"n1", "n2", "n4"} - set(keep))
        sqnr = 30.0 - 15.0 * missing - (9.5 if "n3" not in keep else 0.0)
        return FidelityResult([Check("y", "sqnr_db", sqnr, 20.0, sqnr >= 20.0)], 1)

    search = PrecisionSearch(build, evaluate, units, budget_s=75.0, clock=lambda: clock[0])
    placement = search.run()
    tried = [set(t.fp32_units) for t in placement.trials]
    assert {"a", "c"} in tried  # b's return to int8 was tried (and passed, at 20.5 dB)
    assert {i.unit for i in placement.islands} == {"a", "b", "c"}


def test_the_placement_does_not_depend_on_how_long_trials_take():
    # The same search on an idle machine (instant trials) and a busy one (slow, uneven
    # trials well inside the time bound) makes the same trials and the same placement.
    units = [Unit(f"u{i}", (f"n{i}",), float(i)) for i in range(40)]
    needed = {f"n{i}" for i in range(0, 40, 7)}
    build, evaluate, _ = _stub(needed)
    idle = PrecisionSearch(build, evaluate, units, max_trials=20).run()
    clock, steps = [0.0], iter(np.random.default_rng(0).uniform(1.0, 30.0, 1000))

    def slow_build(keep):
        clock[0] += next(steps)
        return build(keep)

    busy = PrecisionSearch(
        slow_build, evaluate, units, max_trials=20, budget_s=1e6, clock=lambda: clock[0]
    ).run()
    assert [t.fp32_units for t in busy.trials] == [t.fp32_units for t in idle.trials]
    assert busy.keep_fp32 == idle.keep_fp32 and busy.stopped_by == idle.stopped_by


def test_the_trial_bound_stops_the_search_and_the_reason_names_it():
    build, evaluate, built = _stub({"n1", "n2", "n3", "n4", "n5"})
    placement = PrecisionSearch(build, evaluate, UNITS, max_trials=2).run()
    assert len(built) == 2 and placement.stopped_by == "trials"
    assert placement.status == "fp32" and "2-trial bound (--tune-trials)" in placement.reason
    assert placement.to_dict()["max_trials"] == 2


def test_the_clock_stopping_the_search_is_reported_as_such():
    clock = [0.0]
    build, evaluate, _ = _stub({"n1", "n2", "n3", "n4"}, clock, step=10.0)
    search = PrecisionSearch(build, evaluate, UNITS, budget_s=25.0, clock=lambda: clock[0])
    assert search.run().stopped_by == "time"


def test_a_search_that_finishes_says_nothing_stopped_it():
    build, evaluate, _ = _stub({"n1", "n2", "n4"})
    assert PrecisionSearch(build, evaluate, UNITS).run().stopped_by is None


# ---------------------------------------------------------------------------- in parallel


def _trial_list(placement):
    return [(t.phase, t.fp32_units, t.passed, t.min_sqnr_db) for t in placement.trials]


def test_trials_run_ahead_give_the_sequential_placement_and_trials():
    build, evaluate, _ = _stub({"n1", "n2", "n4"})
    batches_run = []

    def evaluate_many(keeps):
        batches_run.append(len(keeps))
        return [(evaluate(build(k)), 0.0) for k in keeps]

    units = [*UNITS, Unit("e", ("n6",), 30.0), Unit("f", ("n7",), 35.0)]
    sequential = PrecisionSearch(build, evaluate, units).run()
    parallel = PrecisionSearch(build, evaluate, units, evaluate_many=evaluate_many, width=3).run()
    assert batches_run and max(batches_run) == 3  # the ranking ran three trials at once
    assert parallel.keep_fp32 == sequential.keep_fp32
    assert [i.unit for i in parallel.islands] == [i.unit for i in sequential.islands]
    assert _trial_list(parallel) == _trial_list(sequential)


def test_a_pool_of_two_workers_finds_the_sequential_placement(tmp_path):
    model, batches = _calibrated(chain_model(outlier=True), tmp_path, seeded(4)(64, 4, 8, 8))
    sequential = tune_precision(model, numerics_for("avx2"), batches)
    with make_executor("local", 2) as executor:
        parallel = tune_precision(model, numerics_for("avx2"), batches, executor=executor)
    assert parallel.status == sequential.status == "mixed"
    assert parallel.keep_fp32 == sequential.keep_fp32
    assert _trial_list(parallel) == _trial_list(sequential)
    assert _int8_convs(parallel.model) == _int8_convs(sequential.model)
