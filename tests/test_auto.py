"""onnxq.auto.choose_modes: the float-activation candidates match their own pipelines."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded
from ort_helpers import op_types, to_ir

from onnxq.auto import choose_modes
from onnxq.config import CompileConfig
from onnxq.errors import InputError

# A post-LN residual block: ONNX Runtime would fuse the Add into SkipLayerNormalization.
RESIDUAL = """
r (float[N,L,64] x) => (float[N,L,64] y) {
    [proj] h = MatMul (x, w)
    [residual] s = Add (x, h)
    [norm] y = LayerNormalization <axis = -1> (s, g, b)
}
"""


def _model():
    normal = seeded(0)
    weights = {"w": normal(64, 64, scale=0.3), "g": normal(64), "b": normal(64)}
    return to_ir(onnx.shape_inference.infer_shapes(build_model(RESIDUAL, weights)))


def _recording_timer(timed: list[dict]):
    def timer(models):
        timed.append({k: op_types(m) for k, m in models.items()})
        rng = np.random.default_rng(0)
        # Everything as fast as fp32: nothing pays, so fp32 is written.
        return {k: 10.0 + rng.normal(0, 0.01, 30) for k in models}

    return timer


@pytest.mark.usefixtures("sum_beats_skip_layernorm")
def test_auto_quantizes_and_times_the_float_model_with_the_residual_as_sum():
    timed: list[dict] = []
    config = CompileConfig(mode="auto", target="vnni")
    placement = choose_modes(_model(), config, timer=_recording_timer(timed))
    assert len(timed) == 1
    assert "Sum" in timed[0]["fp32"] and "Add" not in timed[0]["fp32"]
    assert "Sum" in timed[0]["dynamic"]
    # Nothing paid: the fp32 written is the same float form, as --no-quantize writes it.
    assert placement.emitted == "fp32" and "Sum" in op_types(placement.model)


def test_auto_without_a_residual_layernorm_times_the_model_as_given():
    normal = seeded(1)
    text = "m (float[N,64] x) => (float[N,64] y) { [proj] y = MatMul (x, w) }"
    model = to_ir(build_model(text, {"w": normal(64, 64)}))
    timed: list[dict] = []
    placement = choose_modes(model, CompileConfig(mode="auto"), timer=_recording_timer(timed))
    assert timed[0]["fp32"] == ["MatMul"]
    assert placement.emitted == "fp32" and placement.model is None  # the model given ships


# An encoder-like block for a mixed model without static units: ``proj`` (64 x 64) is
# large enough for weight-only and dynamic, ``head`` (64 x 16) is below weight-only's
# minimum size, so only dynamic takes it.
MIXED_FLOAT = """
m (float[N,8,64] x) => (float[N,8,16] y) {
    [proj] h = MatMul (x, w)
    [residual] s = Add (x, h)
    [norm] n = LayerNormalization <axis = -1> (s, g, b)
    [head] y = MatMul (n, w2)
}
"""
# Seeded latencies (ms): weight-only ranks first, the mixed model beats it and fp32.
MIXED_MEDIANS = {"fp32": 10.0, "dynamic": 6.0, "weight-only": 4.0, "mixed": 3.0}


def _mixed_float_model():
    normal = seeded(2)
    weights = {"w": normal(64, 64, scale=0.1), "w2": normal(64, 16, scale=0.1)}
    weights |= {"g": normal(64), "b": normal(64)}
    return to_ir(onnx.shape_inference.infer_shapes(build_model(MIXED_FLOAT, weights)))


def _set_timer(timed: list[dict]):
    def timer(models):
        timed.append({k: op_types(m) for k, m in models.items()})
        rng = np.random.default_rng(0)
        return {k: MIXED_MEDIANS[k] * (1 + 0.005 * rng.standard_normal(40)) for k in models}

    return timer


def _ort_optimised_ops(model, tmp_path) -> list[str]:
    """Op types of ONNX Runtime's optimised graph (what the CPU provider runs)."""
    from onnxq import runtime

    path = tmp_path / "ort-optimized.onnx"
    runtime.create_session(model, optimization="all", threads=1, optimized_model_path=path)
    return [n.op_type for n in onnx.load(path).graph.node]


@pytest.mark.usefixtures("sum_beats_skip_layernorm")
def test_auto_mixed_without_static_units_writes_the_residual_as_sum(tmp_path):
    from onnxq.evaluate import sqnr_db
    from onnxq.runtime import create_session, run

    fp32 = _mixed_float_model()
    timed: list[dict] = []
    placement = choose_modes(fp32, CompileConfig(mode="auto"), timer=_set_timer(timed))
    assert placement.emitted == "mixed", placement.reason
    modes = {u: c["mode"] for u, c in placement.units.items()}
    assert modes == {"proj": "weight-only", "head": "dynamic"}
    ops = op_types(placement.model)
    assert "Sum" in ops and "Add" not in ops and "MatMulNBits" in ops
    # What was timed is what is written, against the same float baseline.
    assert timed[1]["mixed"] == ops and "Sum" in timed[1]["fp32"]
    assert "SkipLayerNormalization" not in _ort_optimised_ops(placement.model, tmp_path)
    assert op_types(fp32).count("Add") == 1  # the model given is left as it was
    # int4 weights on proj and int8 on head, measured 28.9 dB against fp32 here; a lost
    # residual or a wrong sum would be far below this floor.
    x = {"x": seeded(5)(4, 8, 64)}
    want = run(create_session(fp32), x)["y"]
    got = run(create_session(placement.model), x)["y"]
    assert sqnr_db(want, got) > 20.0


def test_auto_mixed_without_the_pattern_keeps_the_add():
    # A bias Add (one input a weight): nothing ONNX Runtime fuses, nothing rewritten.
    text = MIXED_FLOAT.replace("Add (x, h)", "Add (h, c)")
    normal = seeded(2)
    weights = {"w": normal(64, 64, scale=0.1), "w2": normal(64, 16, scale=0.1)}
    weights |= {"g": normal(64), "b": normal(64), "c": normal(64)}
    model = to_ir(onnx.shape_inference.infer_shapes(build_model(text, weights)))
    placement = choose_modes(model, CompileConfig(mode="auto"), timer=_set_timer([]))
    assert placement.emitted == "mixed", placement.reason
    ops = op_types(placement.model)
    assert "Add" in ops and "Sum" not in ops
    # CUDA, where SkipLayerNormalization is the fast kernel, never gets here: auto emits
    # CPU kernels only and is refused for it.
    with pytest.raises(InputError, match="--target cuda"):
        CompileConfig(mode="auto", target="cuda")


def _counting_sessions(monkeypatch) -> dict[str, int]:
    """Counts ONNX Runtime sessions created, and the most alive at once (closed when freed)."""
    import gc
    import weakref

    from onnxq import runtime

    count = {"created": 0, "alive": 0, "peak": 0}
    create = runtime.create_session

    def closed() -> None:
        count["alive"] -= 1

    def counting(*args, **kwargs):
        gc.collect()  # a session only unreachable is not alive
        session = create(*args, **kwargs)
        count["created"] += 1
        count["alive"] += 1
        count["peak"] = max(count["peak"], count["alive"])
        weakref.finalize(session, closed)
        return session

    monkeypatch.setattr(runtime, "create_session", counting)
    return count


# (the residual-LayerNorm timing stubbed: its micro models' sessions are not counted here)
@pytest.mark.usefixtures("sum_beats_skip_layernorm")
@pytest.mark.parametrize("large", [False, True], ids=["together", "pairs"])
def test_auto_times_large_models_in_pairs_with_fp32_on_onnx_runtime(monkeypatch, large):
    from onnxq import placement
    from onnxq.auto import model_timer

    if large:  # "large" relative to the available memory, lowered so that this model is
        monkeypatch.setattr(placement, "TOGETHER_MEMORY_SHARE", 1e-15)
    count = _counting_sessions(monkeypatch)
    timer = model_timer(None, seconds=0.05)
    placement = choose_modes(_mixed_float_model(), CompileConfig(mode="auto"), timer=timer)
    assert placement.modes["dynamic"].speedup is not None  # timed
    assert count["alive"] == 0
    if large:
        assert count["peak"] == 2
        # Each candidate with its own fp32 session: dynamic and weight-only, (mixed).
        assert count["created"] in (4, 8)
    else:
        assert count["peak"] == 3 and count["created"] in (3, 6)


def _set_latency(medians: dict[str, float], calls: list[list[str]]):
    """``measure_latency`` stand-in: label -> rounds near its median; records the calls."""

    def measure(models, feeds=None, **_):
        calls.append(list(models))
        rng = np.random.default_rng(len(calls))
        return {k: medians[k] * (1 + 0.005 * rng.standard_normal(40)) for k in models}

    return measure


@pytest.mark.parametrize(
    ("mixed_ms", "emitted"), [(3.0, "mixed"), (4.0, "weight-only")], ids=["mixes", "single"]
)
def test_auto_in_pairs_chooses_as_it_does_with_every_session_alive(monkeypatch, mixed_ms, emitted):
    from onnxq import placement
    from onnxq.auto import model_timer

    medians = {**MIXED_MEDIANS, "mixed": mixed_ms}
    choices = {}
    for large in (False, True):
        if large:
            monkeypatch.setattr(placement, "TOGETHER_MEMORY_SHARE", 1e-15)
        calls: list[list[str]] = []
        monkeypatch.setattr(placement, "measure_latency", _set_latency(medians, calls))
        chosen = choose_modes(
            _mixed_float_model(), CompileConfig(mode="auto"), timer=model_timer(None)
        )
        if large:  # every model in a pair with fp32, the larger file's session first
            assert all(len(c) == 2 and "fp32" in c for c in calls), calls
            assert {c[0] for c in calls} == {"fp32"}
            assert len(calls) == 4
        else:
            assert [len(c) for c in calls] == [3, 3]
        # The report says how the candidates and the mixed model were timed.
        report = chosen.to_dict()
        expected = "pairs" if large else "together"
        assert report["timing"]["mode"] == report["mixed"]["timing"]["mode"] == expected
        assert report["timing"]["estimated_session_bytes"] > 0
        choices[large] = (
            chosen.emitted,
            {u: c["mode"] for u, c in chosen.units.items()},
            {m: c.out is None for m, c in chosen.modes.items()},
        )
    assert choices[True] == choices[False]
    assert choices[True][0] == emitted


def test_auto_times_a_model_whose_weights_stay_in_their_data_file(tmp_path, monkeypatch):
    # Past io.EXTERNAL_DATA_THRESHOLD (lowered here) a loaded model keeps its weights in
    # the .data file beside it: a copy saved elsewhere must carry them, or the session
    # created from it cannot find them.
    from onnxq import io
    from onnxq.auto import model_timer

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    io.save_model(_mixed_float_model(), tmp_path / "m.onnx")
    model = io.load_model(tmp_path / "m.onnx")
    assert any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )
    placement = choose_modes(
        model, CompileConfig(mode="auto"), timer=model_timer(None, seconds=0.05)
    )
    assert placement.modes["dynamic"].speedup is not None
