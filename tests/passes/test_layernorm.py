"""PreventSkipLayerNormFusionPass: residual Add before LayerNormalization as Sum, on ORT."""

from __future__ import annotations

import numpy as np
import onnx
from graph_builders import build_model, seeded
from ort_helpers import op_types, ort_outputs, to_ir

from onnxq import runtime
from onnxq.config import CompileConfig
from onnxq.passes.layernorm import PreventSkipLayerNormFusionPass
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
    result = PreventSkipLayerNormFusionPass()(model)
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
