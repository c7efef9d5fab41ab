"""Tests for onnxq/placement.py: fusion analysis of ONNX Runtime's graph and the emit decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import (
    build_model,
    chain_model,
    encoder_model,
    fusing_model,
    fusing_weights,
    seeded,
)
from ort_helpers import sum_faster_timer

from onnxq import placement
from onnxq.calibration.data import open_calibration_data
from onnxq.config import CompileConfig
from onnxq.numerics import numerics_for
from onnxq.passes import layernorm
from onnxq.pipeline import build_pipeline
from onnxq.recording import run_pipeline

# The last conv's output is a graph output, so it gets no output Q: ONNX Runtime has no
# int8 kernel for DQ -> Conv without a Q and runs it in fp32 behind standalone DQs.
CONV_OUT = """
net (float[1,4,8,8] x) => (float[1,8,8,8] y) {
    [c1] a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    [r1] b = Relu (a)
    [c2] y = Conv <pads = [1, 1, 1, 1]> (b, w2, b2)
}
"""

# A hand-made QDQ model whose only int8 op is an Add: a region without multiply-accumulates.
QDQ_ADD = """
net (float[1,8] x, float[1,8] z) => (float[1,8] y) {
    xq = QuantizeLinear (x, s, zp)
    xd = DequantizeLinear (xq, s, zp)
    zq = QuantizeLinear (z, s, zp)
    zd = DequantizeLinear (zq, s, zp)
    [add] a = Add (xd, zd)
    aq = QuantizeLinear (a, s, zp)
    y = DequantizeLinear (aq, s, zp)
}
"""


def _conv_out() -> onnx.ModelProto:
    convs = {k: v for k, v in fusing_weights().items() if k[1] in "12"}
    return build_model(CONV_OUT, convs)


def _calibrated(proto: onnx.ModelProto, tmp_path: Path) -> ir.Model:
    """The fp32 model as the pipeline leaves it right before QDQ insertion (ranges set)."""
    model = ir.serde.deserialize_model(proto)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=seeded(2)(16, 4, 8, 8))
    data = open_calibration_data(str(calib), model, batch_size=16)
    steps = build_pipeline(CompileConfig(calibration=str(calib)), calibration=data)
    stop = next(i for i, s in enumerate(steps) if s.name == "InsertQDQPass")
    return run_pipeline(model, steps[:stop])[0]


def _requantizer(proto: onnx.ModelProto, tmp_path: Path) -> placement.Requantizer:
    return placement.Requantizer(_calibrated(proto, tmp_path), numerics_for("vnni"))


def _op_types(model: ir.Model) -> set[str]:
    return {n.op_type for n in model.graph}


def test_unfused_unit_is_found_in_ort_graph_and_reverted(tmp_path):
    quantize = _requantizer(_conv_out(), tmp_path)
    int8 = quantize({})
    analysis = placement.analyze_fusion(int8)
    assert analysis.unfused == {"c2": "Conv"}
    assert analysis.fused == {"c1": "QLinearConv"}
    assert analysis.standalone["DequantizeLinear"] >= 1

    model, reverted, final = placement.place_structurally(quantize, int8)
    assert set(reverted) == {"c2"}
    assert "no fused int8 kernel" in reverted["c2"]
    assert quantize.summary["not_quantized"]["c2"].endswith(reverted["c2"])
    # With c2 fp32, c1 alone would pay a standalone Q and DQ: QDQ insertion drops it too.
    assert "DequantizeLinear" not in _op_types(model)
    assert not final.unfused and not final.fused


def test_conv_relu_net_whose_units_all_fuse_is_left_alone(tmp_path):
    quantize = _requantizer(fusing_model(), tmp_path)
    int8 = quantize({})
    model, reverted, analysis = placement.place_structurally(quantize, int8)
    assert reverted == {}
    assert model is int8
    assert analysis.fused == {
        "c1": "QLinearConv",
        "c2": "QLinearConv",
        "gap": "QLinearGlobalAveragePool",
        "fc": "QGemm",
    }
    assert not analysis.unfused and not analysis.unknown
    assert len(analysis.regions) == 1 and analysis.regions[0].has_mac
    assert placement.reversions(analysis) == {}


def test_region_without_multiply_accumulate_is_reverted():
    arrays = {"s": np.array(0.05, np.float32), "zp": np.array(128, np.uint8)}
    model = ir.serde.deserialize_model(build_model(QDQ_ADD, arrays))
    analysis = placement.analyze_fusion(model)
    assert analysis.fused == {"add": "QLinearAdd"}
    assert [r.has_mac for r in analysis.regions] == [False]
    reasons = placement.reversions(analysis)
    assert set(reasons) == {"add"}
    assert "without a multiply-accumulate" in reasons["add"]


def test_requantizer_leaves_the_calibrated_model_untouched(tmp_path):
    quantize = _requantizer(fusing_model(), tmp_path)
    before = onnx.printer.to_text(ir.serde.serialize_model(quantize.calibrated))
    first = quantize({})
    second = quantize({"c2": "kept fp32 for a test"})
    after = onnx.printer.to_text(ir.serde.serialize_model(quantize.calibrated))
    assert before == after
    assert "QuantizeLinear" not in _op_types(quantize.calibrated)
    assert "QuantizeLinear" in _op_types(first)
    assert quantize.summary["not_quantized"]["c2"].endswith("kept fp32 for a test")
    assert second is not first


def _rounds(median_ms: float, n: int = 40, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return median_ms * (1.0 + noise * rng.standard_normal(n))


def test_decide_picks_int8_when_it_is_faster():
    decision = placement.decide(_rounds(10.0), {"int8": _rounds(5.0, seed=1)})
    assert decision.choice == "int8"
    assert decision.speedups["int8"] == pytest.approx(2.0, rel=0.05)
    lo, hi = decision.intervals["int8"]
    assert lo <= decision.speedups["int8"] <= hi


def test_decide_picks_fp32_when_int8_is_slower():
    decision = placement.decide(_rounds(10.0), {"int8": _rounds(12.0, seed=1)})
    assert decision.choice == "fp32"
    assert decision.intervals["int8"][1] < 1.0 + placement.MIN_GAIN
    assert "not faster" in decision.reason


def test_decide_picks_fp32_when_int8_is_no_faster():
    # Same speed, tight interval: the gain cannot reach MIN_GAIN.
    decision = placement.decide(
        _rounds(10.0, noise=0.002), {"int8": _rounds(10.0, noise=0.002, seed=1)}
    )
    assert decision.choice == "fp32"


def test_decide_keeps_fp32_when_noise_hides_the_difference():
    # Very noisy rounds: int8 is not shown to be at least as fast, so fp32 ships (the
    # promise is never slower than fp32; the rule errs toward fp32).
    decision = placement.decide(
        _rounds(10.0, n=10, noise=0.3), {"int8": _rounds(10.5, n=10, noise=0.3, seed=1)}
    )
    assert decision.intervals["int8"][0] < 1.0
    assert decision.choice == "fp32"


def test_decide_keeps_fp32_when_a_faster_median_is_within_the_noise():
    decision = placement.decide(
        _rounds(10.0, n=10, noise=0.3), {"int8": _rounds(9.0, n=10, noise=0.3, seed=1)}
    )
    assert decision.intervals["int8"][0] < 1.0 < decision.speedups["int8"]
    assert decision.choice == "fp32"


def test_decide_picks_the_fastest_eligible_candidate():
    fp32 = _rounds(10.0)
    decision = placement.decide(
        fp32, {"int8": _rounds(8.0, seed=1), "int8-reverted": _rounds(6.0, seed=2)}
    )
    assert decision.choice == "int8-reverted"
    assert decision.to_dict()["speedup_ci95"].keys() == {"int8", "int8-reverted"}


def test_measure_latency_times_every_model_in_paired_rounds(tmp_path):
    quantize = _requantizer(fusing_model(), tmp_path)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    ir.save(quantize.calibrated, fp32)
    ir.save(quantize({}), int8)
    feeds = {"x": seeded(3)(1, 4, 8, 8)}
    times = placement.measure_latency(
        {"fp32": fp32, "int8": int8}, feeds, seconds=0.05, threads=1, min_runs=3
    )
    assert set(times) == {"fp32", "int8"}
    assert times["fp32"].size == times["int8"].size >= 3
    assert np.all(times["fp32"] > 0)


def _files(quantize: placement.Requantizer, tmp_path: Path) -> dict[str, Path]:
    fp32 = tmp_path / "fp32.onnx"
    ir.save(quantize.calibrated, fp32)
    return {"fp32": fp32, "original": fp32}


def test_placement_without_timing_keeps_int8_that_fuses(tmp_path):
    quantize = _requantizer(fusing_model(), tmp_path)
    int8 = quantize({})
    result = placement.place_for_latency(
        int8, quantize, **_files(quantize, tmp_path), measure=False
    )
    assert (result.emit, result.model, result.reverted) == ("int8", int8, {})
    assert result.latency is None and result.quantize_summary is None


def test_placement_ships_fp32_when_nothing_fuses_and_reports_what_int8_cost(tmp_path):
    quantize = _requantizer(_conv_out(), tmp_path)
    result = placement.place_for_latency(
        quantize({}), quantize, **_files(quantize, tmp_path), seconds=0.05
    )
    assert result.emit == "fp32" and result.model is None
    assert "no int8 unit fuses" in result.reason
    assert set(result.reverted) == {"c2"}
    assert result.latency["emitted"] == "fp32"
    assert result.latency["decision"]["choice"] == "fp32"
    assert result.latency["int8_p50_ms"] > 0


@pytest.mark.parametrize(("int8_ms", "emit"), [(5.0, "int8"), (12.0, "fp32")])
def test_placement_follows_the_measured_decision(tmp_path, monkeypatch, caplog, int8_ms, emit):
    quantize = _requantizer(fusing_model(), tmp_path)
    int8 = quantize({})
    timed: list[set[str]] = []

    def fake_timing(models, feeds, **kwargs):
        timed.append(set(models))
        return {"input": _rounds(20.0), "fp32": _rounds(10.0), "int8": _rounds(int8_ms, seed=1)}

    monkeypatch.setattr(placement, "measure_latency", fake_timing)
    result = placement.place_for_latency(int8, quantize, **_files(quantize, tmp_path))
    assert timed == [{"input", "fp32", "int8"}]
    assert result.emit == emit
    assert (result.model is int8) == (emit == "int8")
    assert ("emitting the optimised fp32 model" in caplog.text) == (emit == "fp32")
    latency = result.latency
    # Both ratios, each with its interval: int8 vs the input as given and vs optimised fp32.
    assert latency["speedup"] == pytest.approx(20.0 / int8_ms, rel=0.05)
    assert latency["speedup_vs_fp32"] == pytest.approx(10.0 / int8_ms, rel=0.05)
    for key in ("speedup_ci95", "speedup_vs_fp32_ci95"):
        lo, hi = latency[key]
        assert lo < hi
    report = result.to_dict()
    assert report["emitted"] == emit
    assert report["cpu"]["model"] and isinstance(report["cpu"]["isa"], list)


def test_compile_reverts_unfused_units_and_checks_the_model_it_writes(tmp_path, monkeypatch):
    from onnxq.compiler import compile_model

    src, calib, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    # conv0-conv4 fuse; conv5 writes the graph output, so ONNX Runtime runs it in fp32.
    onnx.save(chain_model(outlier=False), src)
    np.savez(calib, x=seeded(2)(16, 4, 8, 8))

    def int8_faster(models, feeds, **kwargs):
        assert feeds["x"].shape == (1, 4, 8, 8)  # the first calibration sample
        return {"input": _rounds(20.0), "fp32": _rounds(10.0), "int8": _rounds(5.0, seed=1)}

    monkeypatch.setattr(placement, "measure_latency", int8_faster)
    report = compile_model(src, out, CompileConfig(calibration=str(calib))).to_dict()
    assert report["placement"]["emitted"] == "int8"
    reverted = report["placement"]["reverted"]
    assert set(reverted) == {"conv5"}
    assert report["not_quantized"]["conv5"].endswith(reverted["conv5"])
    assert {"conv0", "conv4"} <= set(report["quantized_nodes"])
    assert "conv5" not in report["quantized_nodes"]
    # The fidelity section describes the model written: measured again after the reversion.
    assert report["fidelity"]["min_sqnr_db"] > report["precision"]["fidelity"]["min_sqnr_db"]
    written = onnx.load(out)
    conv5 = next(n for n in written.graph.node if n.name == "conv5")
    assert conv5.input[1] == "w5"  # fp32 weight, no DequantizeLinear
    assert "QuantizeLinear" in {n.op_type for n in written.graph.node}


def _compile_timed(tmp_path, monkeypatch, proto, int8_ms, **settings):
    """Static compile of ``proto`` timed by a stand-in; returns the report, the op types of
    each model timed (by label), the model written and the model ``--no-quantize`` writes."""
    from onnxq.compiler import compile_model

    src, calib, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(proto, src)
    name = proto.graph.input[0].name
    shape = [d.dim_value or 16 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    np.savez(calib, **{name: seeded(2)(*shape)})
    timed: dict[str, list[str]] = {}

    def timing(models, feeds, **kwargs):
        timed.update(
            {k: [n.op_type for n in onnx.load(str(p)).graph.node] for k, p in models.items()}
        )
        medians = {"input": 20.0, "fp32": 10.0, "int8": int8_ms}
        return {k: _rounds(medians[k], seed=i) for i, k in enumerate(models)}

    monkeypatch.setattr(placement, "measure_latency", timing)
    monkeypatch.setattr(layernorm, "time_residual_forms", sum_faster_timer)
    config = CompileConfig(calibration=str(calib), **settings)
    report = compile_model(src, out, config).to_dict()
    compile_model(src, tmp_path / "fp32.onnx", CompileConfig(quantize=False))
    return report, timed, onnx.load(out), onnx.load(tmp_path / "fp32.onnx")


@pytest.mark.parametrize(("int8_ms", "emit"), [(5.0, "int8"), (12.0, "fp32")])
def test_static_compile_times_and_writes_fp32_as_no_quantize_does(
    tmp_path, monkeypatch, int8_ms, emit
):
    # On the CPU provider --no-quantize writes the residual Add before a LayerNorm as Sum
    # (ONNX Runtime's SkipLayerNormalization is slow there): static int8 is timed against
    # that model, writes it when int8 does not pay, and has its own fp32 Adds as Sum.
    from onnxq import runtime
    from onnxq.mixed_precision import run_model

    report, timed, written, fp32 = _compile_timed(tmp_path, monkeypatch, encoder_model(), int8_ms)
    assert report["placement"]["emitted"] == emit
    no_quantize = [n.op_type for n in fp32.graph.node]
    assert no_quantize.count("Sum") == 2 and "Add" not in no_quantize
    assert timed["fp32"] == no_quantize
    ops = {n.name: n.op_type for n in written.graph.node}
    ort_graph = tmp_path / "ort.onnx"
    runtime.create_session(
        tmp_path / "out.onnx", optimization="all", threads=1, optimized_model_path=ort_graph
    )
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(ort_graph).graph.node}
    if emit == "fp32":
        assert [n.op_type for n in written.graph.node] == no_quantize
        # Sum adds as Add does: only LayerNormalization's vs SkipLayerNorm's float rounding
        # differs from the input as ONNX Runtime deploys it.
        batch = [{"x": seeded(5)(2, 8, 16)}]
        got = run_model(ir.from_proto(written), batch)[0]["y"]
        expected = run_model(ir.load(tmp_path / "net.onnx"), batch)[0]["y"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert timed["int8"] == [n.op_type for n in written.graph.node]
        # The fp32 residual Add is Sum; the int8 one stays an Add for QLinearAdd.
        assert (ops["residual"], ops["residual2"]) == ("Sum", "Add")
        assert "residual2" in report["quantized_nodes"]


@pytest.mark.parametrize(
    ("proto", "settings"),
    [(fusing_model, {}), (encoder_model, {"target": "cuda"})],
    ids=["no-layernorm", "cuda"],
)
def test_static_compile_baseline_unchanged_without_the_pattern_or_off_cpu(
    tmp_path, monkeypatch, proto, settings
):
    report, timed, written, _ = _compile_timed(tmp_path, monkeypatch, proto(), 12.0, **settings)
    assert report["placement"]["emitted"] == "fp32"
    for ops in (timed["fp32"], timed["int8"], [n.op_type for n in written.graph.node]):
        assert "Sum" not in ops
    if settings:  # CUDA: SkipLayerNormalization is the fast kernel there; the Adds stay
        assert [n.op_type for n in written.graph.node].count("Add") == 2


def test_unreadable_ort_graph_reverts_nothing_and_leaves_the_decision_to_timing(
    tmp_path, monkeypatch
):
    quantize = _requantizer(_conv_out(), tmp_path)
    int8 = quantize({})

    def fail(model, tmp):
        raise RuntimeError("cannot write the optimised model\nsecond line")

    monkeypatch.setattr(placement, "_optimized_graph", fail)
    analysis = placement.analyze_fusion(int8)
    assert analysis.error == "cannot write the optimised model"
    assert analysis.unknown == ["c1", "c2"] and placement.reversions(analysis) == {}
    files = _files(quantize, tmp_path)
    result = placement.place_for_latency(int8, quantize, **files, measure=False)
    assert (result.emit, result.model, result.reverted) == ("int8", int8, {})
    assert result.to_dict()["fusion"]["error"] == analysis.error


@pytest.mark.parametrize("accepted", [True, False])
def test_reversions_that_miss_the_fidelity_criteria_are_dropped(tmp_path, accepted):
    # Keeping a unit fp32 removes its error, but errors that cancelled may stop cancelling:
    # the compile's accept check decides, and a rejected reversion keeps the checked int8.
    quantize = _requantizer(_conv_out(), tmp_path)
    int8 = quantize({})
    seen: list[ir.Model] = []

    def accept(model):
        seen.append(model)
        return accepted

    files = _files(quantize, tmp_path)
    result = placement.place_for_latency(int8, quantize, **files, measure=False, accept=accept)
    assert len(seen) == 1 and seen[0] is not int8  # asked about the reverted placement
    if accepted:
        # With c2 fp32 nothing fuses any more (as without the check): fp32 ships.
        assert set(result.reverted) == {"c2"} and result.emit == "fp32"
    else:
        assert result.reverted == {} and result.model is int8
        assert result.analysis.unfused == {"c2": "Conv"}


def test_accept_is_not_asked_when_nothing_is_reverted(tmp_path):
    quantize = _requantizer(fusing_model(), tmp_path)
    int8 = quantize({})
    asked = []
    placement.place_for_latency(
        int8, quantize, **_files(quantize, tmp_path), measure=False, accept=asked.append
    )
    assert asked == []


def _fake_timing(calls: list[set[str]], int8_ms: float = 5.0):
    """measure_latency stand-in: input 20 ms, fp32 10 ms, int8 ``int8_ms``; records calls."""
    medians = {"input": 20.0, "fp32": 10.0, "int8": int8_ms}

    def timing(models, feeds, **kwargs):
        calls.append(set(models))
        return {k: _rounds(medians[k], seed=len(calls) * 3 + i) for i, k in enumerate(models)}

    return timing


def test_timing_plan_splits_only_past_its_share_of_available_memory(tmp_path):
    quantize = _requantizer(fusing_model(), tmp_path)
    files = _files(quantize, tmp_path)
    int8 = tmp_path / "int8.onnx"
    ir.save(quantize({}), int8)
    models = {"input": files["original"], "fp32": files["fp32"], "int8": int8}
    sizes = [p.stat().st_size for p in models.values()]
    estimate = sum(sizes) + max(sizes)
    fits = int(np.ceil(estimate / placement.TOGETHER_MEMORY_SHARE))
    plan = placement.timing_plan(models, available=fits)
    assert (plan.mode, plan.estimated_bytes) == ("together", estimate)
    assert plan.limit_bytes >= estimate
    assert placement.timing_plan(models, available=fits - 8).mode == "pairs"
    # On this machine a model of a few KB is nowhere near the limit.
    assert placement.timing_plan(models).mode == "together"


def test_large_models_are_timed_in_two_pairs_with_both_ratios(tmp_path, monkeypatch):
    quantize = _requantizer(fusing_model(), tmp_path)
    int8 = quantize({})
    calls: list[set[str]] = []
    monkeypatch.setattr(placement, "measure_latency", _fake_timing(calls))
    # "Large" relative to the available memory, lowered so that this small model is.
    monkeypatch.setattr(placement, "TOGETHER_MEMORY_SHARE", 1e-15)
    result = placement.place_for_latency(int8, quantize, **_files(quantize, tmp_path))
    # The decision pair first; the input's session is never alive beside fp32's.
    assert calls == [{"fp32", "int8"}, {"input", "int8"}]
    latency = result.latency
    assert latency["timing"]["mode"] == "pairs"
    assert latency["timing"]["fp32_speedup_vs_input"].startswith("derived")
    # The decision rule is unchanged: int8 2x faster than fp32 in its pair ships.
    assert result.emit == "int8" and latency["decision"]["choice"] == "int8"
    assert latency["speedup_vs_fp32"] == pytest.approx(2.0, rel=0.05)
    assert latency["speedup"] == pytest.approx(4.0, rel=0.05)
    assert latency["fp32_speedup_vs_input"] == pytest.approx(2.0, rel=0.05)
    for key in ("speedup", "speedup_vs_fp32", "fp32_speedup_vs_input"):
        lo, hi = latency[f"{key}_ci95"]
        assert lo < latency[key] < hi
    assert latency["input_p50_ms"] == pytest.approx(20.0, rel=0.05)


def test_small_models_are_timed_together_in_one_set_of_rounds(tmp_path, monkeypatch):
    quantize = _requantizer(fusing_model(), tmp_path)
    calls: list[set[str]] = []
    monkeypatch.setattr(placement, "measure_latency", _fake_timing(calls, int8_ms=12.0))
    result = placement.place_for_latency(quantize({}), quantize, **_files(quantize, tmp_path))
    assert calls == [{"input", "fp32", "int8"}]
    latency = result.latency
    assert latency["timing"]["mode"] == "together"
    assert latency["timing"]["fp32_speedup_vs_input"] == "interleaved"
    assert result.emit == "fp32"
    assert latency["fp32_speedup_vs_input"] == pytest.approx(2.0, rel=0.05)


def test_compile_times_in_pairs_on_onnx_runtime_when_the_model_is_large(tmp_path, monkeypatch):
    from onnxq.compiler import compile_model

    src, calib, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(fusing_model(), src)
    np.savez(calib, x=seeded(2)(16, 4, 8, 8))
    monkeypatch.setattr(placement, "TOGETHER_MEMORY_SHARE", 1e-15)
    report = compile_model(src, out, CompileConfig(calibration=str(calib))).to_dict()
    latency = report["latency"]
    assert latency["timing"]["mode"] == "pairs"
    assert latency["runs"] >= 5 and latency["timing"]["runs_input_pair"] >= 5
    for key in ("speedup", "speedup_vs_fp32", "fp32_speedup_vs_input"):
        lo, hi = latency[f"{key}_ci95"]
        assert 0 < lo <= hi and np.isfinite(latency[key])
    assert latency["fp32_speedup_vs_input"] == pytest.approx(
        latency["speedup"] / latency["speedup_vs_fp32"]
    )
    assert report["placement"]["emitted"] == latency["emitted"]


def test_weight_maps_of_models_held_are_closed_before_timing(tmp_path, monkeypatch):
    from onnxq import io

    quantize = _requantizer(fusing_model(), tmp_path)
    held = io.save_model(quantize.calibrated, tmp_path / "held.onnx", external_data=True)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    reference = io.load_model(held)
    tensors = [
        v.const_value
        for v in reference.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]
    assert tensors
    for tensor in tensors:
        tensor.numpy()  # read earlier in the compile (the fidelity check): mapped
    mapped_while_timing = []

    def timing(models, feeds, **kwargs):
        mapped_while_timing.append([t.raw is not None for t in tensors])
        return _fake_timing([])(models, feeds)

    monkeypatch.setattr(placement, "measure_latency", timing)
    placement.place_for_latency(
        quantize({}), quantize, **_files(quantize, tmp_path), holding=(reference,)
    )
    assert mapped_while_timing == [[False] * len(tensors)]


@pytest.mark.parametrize(("chain", "reference_runs"), [(False, 0), (True, 1)])
def test_latency_step_runs_the_reference_only_to_check_a_reversion(
    tmp_path, monkeypatch, chain, reference_runs
):
    # On a model of GBs the reference's session holds twice its weights while created: after
    # the accuracy decision it runs only when a unit is reverted, once (the check of the
    # reverted placement, whose result is the fidelity section of the model written).
    from onnxq import compiler

    src, calib, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(chain_model(outlier=False) if chain else fusing_model(), src)
    np.savez(calib, x=seeded(2)(16, 4, 8, 8))
    monkeypatch.setattr(placement, "measure_latency", _fake_timing([]))
    runs, run_model = [], compiler.run_model

    def counting_run(model, batches, provider="cpu"):
        if "QuantizeLinear" not in _op_types(model):
            runs.append(model)
        return run_model(model, batches, provider)

    monkeypatch.setattr(compiler, "run_model", counting_run)
    report = compiler.compile_model(src, out, CompileConfig(calibration=str(calib))).to_dict()
    assert bool(report["placement"]["reverted"]) == chain
    assert len(runs) == reference_runs


def test_fidelity_section_after_a_reversion_is_the_written_models_own(tmp_path, monkeypatch):
    # The latency step's accept check measured the reverted placement: the report takes
    # that result, which must be exactly what the written model measures, not what the
    # accuracy decision's placement (before the reversion) measured.
    from onnxq import compiler, io
    from onnxq.fidelity import measure, plan_views
    from onnxq.mixed_precision import criteria_from, run_model

    src, calib, out = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(chain_model(outlier=False), src)
    np.savez(calib, x=seeded(2)(16, 4, 8, 8))
    monkeypatch.setattr(placement, "measure_latency", _fake_timing([]))
    config = CompileConfig(calibration=str(calib))
    report = compiler.compile_model(src, out, config).to_dict()
    assert set(report["placement"]["reverted"]) == {"conv5"}
    given = io.load_model(src)
    batches = compiler._open_calibration(config, given).head(config.verify_samples)
    written = measure(
        run_model(given, batches),
        run_model(io.load_model(out), batches),
        plan_views(given),
        criteria_from(config),
    ).to_dict()
    fidelity = report["fidelity"]
    assert {k: fidelity[k] for k in written} == written
    assert fidelity["samples"] == len(batches) and fidelity["reference"] == "fp32"
    before = report["precision"]["fidelity"]  # the accuracy decision's placement
    assert before["min_sqnr_db"] != written["min_sqnr_db"]
