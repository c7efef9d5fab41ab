"""onnxq.auto.choose_modes: the float-activation candidates match their own pipelines."""

from __future__ import annotations

import numpy as np
import onnx
from graph_builders import build_model, seeded
from ort_helpers import op_types, to_ir

from onnxq.auto import choose_modes
from onnxq.config import CompileConfig

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
