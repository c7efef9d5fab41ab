"""PreventSkipLayerNormFusionPass: residual Add before LayerNormalization as Sum, on ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded
from ort_helpers import op_types, ort_outputs, to_ir

from onnxq import runtime
from onnxq.config import CompileConfig
from onnxq.errors import InputError
from onnxq.passes.layernorm import (
    PreventSkipLayerNormFusionPass,
    residual_norm_models,
    time_residual_forms,
)
from onnxq.pipeline import build_pipeline

# A post-LN residual block: LayerNormalization(x + MatMul(x, w)).
RESIDUAL = """
r (float[N,L,16] x) => (float[N,L,16] y) {
    [proj] h = MatMul (x, w)
    [residual] s = Add (x, h)
    [norm] y = LayerNormalization <axis = -1> (s, g, b)
}
"""


def _weights() -> dict[str, np.ndarray]:
    normal = seeded(0)
    return {"w": normal(16, 16, scale=0.3), "g": normal(16), "b": normal(16)}


def _prepared(text: str, weights: dict[str, np.ndarray]):
    return to_ir(onnx.shape_inference.infer_shapes(build_model(text, weights)))


def _ort_ops(model, tmp_path) -> list[str]:
    path = tmp_path / "optimized.onnx"
    runtime.create_session(model, optimization="all", threads=1, optimized_model_path=path)
    return [n.op_type for n in onnx.load(path).graph.node]


def test_residual_add_becomes_sum_and_ort_fuses_no_skip_layernorm(tmp_path):
    proto = build_model(RESIDUAL, _weights())
    assert "SkipLayerNormalization" in _ort_ops(to_ir(proto), tmp_path)  # what it prevents
    model = _prepared(RESIDUAL, _weights())
    result = PreventSkipLayerNormFusionPass(measure=False)(model)  # the rewrite itself
    assert result.modified and result.details == {"rewritten": ["residual"], "count": 1}
    assert op_types(model) == ["MatMul", "Sum", "LayerNormalization"]
    assert "SkipLayerNormalization" not in _ort_ops(model, tmp_path)
    x = {"x": seeded(1)(2, 5, 16)}
    ref, got = ort_outputs(proto, x)["y"], runtime.run(runtime.create_session(model), x)["y"]
    # Sum adds as Add does; only LayerNormalization's vs SkipLayerNorm's float rounding differs.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_adds_ort_would_not_fuse_stay_add():
    cases = {
        # a bias Add (broadcast [16]): not a residual of two equal 3-D shapes
        "bias": "r (float[N,L,16] x) => (float[N,L,16] y) "
        "{ [residual] s = Add (x, b) [norm] y = LayerNormalization <axis = -1> (s, g, b) }",
        # the sum also used elsewhere (pre-LN residual stream): ORT does not fuse it either
        "shared": "r (float[N,L,16] x) => (float[N,L,16] y, float[N,L,16] s) "
        "{ [proj] h = MatMul (x, w) [residual] s = Add (x, h) "
        "[norm] y = LayerNormalization <axis = -1> (s, g, b) }",
        # 2-D inputs
        "rank2": "r (float[N,16] x) => (float[N,16] y) { [proj] h = MatMul (x, w) "
        "[residual] s = Add (x, h) [norm] y = LayerNormalization <axis = -1> (s, g, b) }",
    }
    for name, text in cases.items():
        model = _prepared(text, _weights())
        result = PreventSkipLayerNormFusionPass()(model)
        assert not result.modified, name
        assert "Sum" not in op_types(model), name


def test_in_fp32_and_dynamic_pipelines_not_before_static_qdq():
    class Data:  # stands in for calibration data: the pipeline is only built
        pass

    def has_pass(config: CompileConfig) -> bool:
        steps = build_pipeline(config, opset=17, calibration=Data())  # type: ignore[arg-type]
        return any(isinstance(s.pass_, PreventSkipLayerNormFusionPass) for s in steps)

    assert has_pass(CompileConfig(quantize=False))
    assert has_pass(CompileConfig(mode="dynamic"))
    assert not has_pass(CompileConfig())  # static QDQ: the residual Add is an int8 unit
    assert not has_pass(CompileConfig(quantize=False, target="cuda"))


@pytest.mark.usefixtures("sum_beats_skip_layernorm")
def test_without_skip_layernorm_copies_only_when_it_rewrites():
    from onnxq.passes.layernorm import without_skip_layernorm

    model = _prepared(RESIDUAL, _weights())
    rewritten = without_skip_layernorm(model)
    assert rewritten is not model
    assert op_types(rewritten) == ["MatMul", "Sum", "LayerNormalization"]
    assert op_types(model) == ["MatMul", "Add", "LayerNormalization"]  # left as it was
    assert (
        rewritten.graph.initializers["w"].const_value is model.graph.initializers["w"].const_value
    )
    bias = (  # a bias Add: nothing for ONNX Runtime to fuse
        "r (float[N,L,16] x) => (float[N,L,16] y) "
        "{ [residual] s = Add (x, b) [norm] y = LayerNormalization <axis = -1> (s, g, b) }"
    )
    unchanged = _prepared(bias, _weights())
    assert without_skip_layernorm(unchanged) is unchanged


# Two residual blocks of one width, static shape: one timing serves both.
TWO_BLOCKS = """
r (float[2,7,16] x) => (float[2,7,16] y) {
    [proj] h = MatMul (x, w)
    [residual] s = Add (x, h)
    [norm] n = LayerNormalization <axis = -1> (s, g, b)
    [proj2] h2 = MatMul (n, w)
    [residual2] s2 = Add (n, h2)
    [norm2] y = LayerNormalization <axis = -1> (s2, g, b)
}
"""


def _stub_timer(fused_ms: float, sum_ms: float, calls: list):
    """A timer standing in for ONNX Runtime: seeded rounds around the given medians."""

    def timer(models, *, provider, threads):
        calls.append({k: op_types(onnx.load(p)) for k, p in models.items()})
        calls[-1]["shape"] = [
            d.dim_value
            for d in onnx.load(models["fused"]).graph.input[0].type.tensor_type.shape.dim
        ]
        rng = np.random.default_rng(len(calls))
        return {
            "fused": fused_ms * (1 + rng.normal(0, 0.01, 40)),
            "sum": sum_ms * (1 + rng.normal(0, 0.01, 40)),
        }

    return timer


def test_rewrites_when_sum_is_timed_faster_and_records_the_timing():
    calls: list = []
    model = _prepared(RESIDUAL, _weights())
    result = PreventSkipLayerNormFusionPass(timer=_stub_timer(1.0, 0.2, calls))(model)
    assert result.modified and result.details["rewritten"] == ["residual"]
    assert op_types(model) == ["MatMul", "Sum", "LayerNormalization"]
    # Timed: the two forms at the model's width, batch 1, sequence 128 (dynamic here).
    assert calls == [
        {"fused": ["Add", "LayerNormalization"], "sum": ["Sum", "LayerNormalization"],
         "shape": [1, 128, 16]}
    ]  # fmt: skip
    (timing,) = result.details["timings"]
    assert timing["decision"] == "sum" and result.details["kept"] == {}
    assert timing["shape"] == [1, 128, 16] and timing["dtype"] == "FLOAT"
    assert timing["fused_ms"] == pytest.approx(1.0, rel=0.05)
    assert timing["sum_ms"] == pytest.approx(0.2, rel=0.05)
    assert timing["ratio"] == pytest.approx(timing["fused_ms"] / timing["sum_ms"])
    lo, hi = timing["ratio_ci95"]
    assert 1.0 < lo <= timing["ratio"] <= hi


@pytest.mark.parametrize(("fused_ms", "sum_ms"), [(0.2, 1.0), (1.0, 1.0)], ids=["slower", "same"])
def test_keeps_the_add_unless_sum_is_timed_faster(fused_ms, sum_ms):
    # The fused kernel faster, or the two within the noise: ONNX Runtime's fusion stays.
    model = _prepared(RESIDUAL, _weights())
    result = PreventSkipLayerNormFusionPass(timer=_stub_timer(fused_ms, sum_ms, []))(model)
    assert not result.modified and result.details["rewritten"] == []
    assert op_types(model) == ["MatMul", "Add", "LayerNormalization"]
    (timing,) = result.details["timings"]
    assert timing["decision"] == "add"
    assert result.details["kept"] == {"residual": timing["reason"]}
    assert "not measured faster" in timing["reason"]


def test_times_once_per_width_for_the_process():
    calls: list = []
    timer = _stub_timer(1.0, 0.2, calls)
    weights = _weights()
    model = _prepared(TWO_BLOCKS, weights)
    result = PreventSkipLayerNormFusionPass(timer=timer)(model)
    assert result.details["rewritten"] == ["residual", "residual2"]
    assert len(calls) == 1 and calls[0]["shape"] == [1, 7, 16]  # the static sequence
    assert len(result.details["timings"]) == 1
    # A second compile in the process (a new pass, same machine settings): cached.
    again = PreventSkipLayerNormFusionPass(timer=timer)(_prepared(TWO_BLOCKS, weights))
    assert again.details["count"] == 2 and len(calls) == 1
    # Other threads: timed again.
    PreventSkipLayerNormFusionPass(timer=timer, threads=1)(_prepared(TWO_BLOCKS, weights))
    assert len(calls) == 2


def test_keeps_the_add_when_the_timing_fails():
    def broken(models, *, provider, threads):
        raise InputError("no such provider")

    model = _prepared(RESIDUAL, _weights())
    result = PreventSkipLayerNormFusionPass(timer=broken)(model)
    assert not result.modified
    assert result.details["kept"]["residual"] == "not measured: no such provider"


def test_the_timed_add_form_is_what_ort_fuses_into_skip_layernorm(tmp_path):
    models = residual_norm_models((1, 8, 16), 2, ir.DataType.FLOAT)
    assert _ort_ops(to_ir(models["fused"]), tmp_path) == ["SkipLayerNormalization"]
    assert _ort_ops(to_ir(models["sum"]), tmp_path) == ["Sum", "LayerNormalization"]
    feeds = {"a": seeded(1)(1, 8, 16), "b": seeded(2)(1, 8, 16)}
    fused, total = (ort_outputs(m, feeds)["y"] for m in (models["fused"], models["sum"]))
    np.testing.assert_allclose(total, fused, rtol=1e-5, atol=1e-5)
    # The default timer: paired rounds of both forms (a quarter second of rounds).
    for label, proto in models.items():
        onnx.save(proto, tmp_path / f"{label}.onnx")
    times = time_residual_forms(
        {k: tmp_path / f"{k}.onnx" for k in models}, provider="cpu", threads=1
    )
    assert times["fused"].shape == times["sum"].shape and times["sum"].size >= 20
    assert np.all(times["fused"] > 0) and np.all(times["sum"] > 0)
