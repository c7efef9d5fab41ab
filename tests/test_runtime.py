"""runtime: sessions per provider, and the probe that looks at intermediate tensors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded

from onnxq import runtime
from onnxq.errors import InputError


def _mlp() -> ir.Model:
    weights = {"w": seeded(0)(4, 3), "b": seeded(1)(3)}
    text = """
    g (float[N, 4] x) => (float[N, 3] y) {
        h = MatMul (x, w)
        r = Relu (h)
        y = Add (r, b)
    }
    """
    return ir.serde.deserialize_model(build_model(text, weights))


def test_probe_returns_intermediate_tensors_and_leaves_the_model_alone():
    model = _mlp()
    x = seeded(2)(5, 4)
    w = model.graph.initializers["w"].const_value.numpy()
    probe = runtime.Probe(model, lambda graph: [n.outputs[0] for n in graph if n.op_type != "Add"])
    assert probe.names == ["h", "r"]
    assert probe.sources["r"] == "Relu node"
    out = probe.run({"x": x})
    np.testing.assert_allclose(out["h"], x @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["r"], np.maximum(x @ w, 0), rtol=1e-5, atol=1e-6)
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_probe_infers_types_the_model_does_not_declare():
    model = _mlp()
    for node in model.graph:
        node.outputs[0].type = None if node.op_type != "Add" else node.outputs[0].type
    probe = runtime.Probe(model, lambda graph: [graph.node(0).outputs[0]])
    assert probe.names == ["h"] and probe.run({"x": seeded(3)(2, 4)})["h"].shape == (2, 3)


@pytest.mark.parametrize("limit", [0, 10**9], ids=["over-the-limit", "small"])
def test_probe_does_not_pre_pack_big_weights(limit, monkeypatch):
    # Pre-packing holds each MatMul/Conv weight twice: for a 2 GB model, 2 GB more.
    monkeypatch.setattr(runtime, "PREPACK_LIMIT_BYTES", limit)
    model = _mlp()
    x = seeded(4)(2, 4)
    probe = runtime.Probe(model, lambda graph: [graph.node(0).outputs[0]])
    options = probe.session.get_session_options()
    try:
        disabled = options.get_session_config_entry("session.disable_prepacking") == "1"
    except RuntimeError:  # (ORT raises for a key never set)
        disabled = False
    assert disabled == (limit == 0)
    w = model.graph.initializers["w"].const_value.numpy()
    np.testing.assert_allclose(probe.run({"x": x})["h"], x @ w, rtol=1e-5, atol=1e-6)


def test_unknown_provider_is_an_input_error():
    with pytest.raises(InputError, match="unknown execution provider 'tpu'"):
        runtime.check_provider("tpu")
    assert runtime.expand_providers("all") == runtime.available_providers()


@pytest.mark.parametrize(("env", "expected"), [("3", 3), ("zero", 0), (None, 0)])
def test_sessions_take_their_threads_from_onnxq_threads(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("ONNXQ_THREADS", raising=False)
    else:
        monkeypatch.setenv("ONNXQ_THREADS", env)
    session = runtime.create_session(_mlp())
    # 0 is ONNX Runtime's own choice; a value that is no count is ignored.
    assert session.get_session_options().intra_op_num_threads == expected
    explicit = runtime.create_session(_mlp(), threads=2)
    assert explicit.get_session_options().intra_op_num_threads == 2
