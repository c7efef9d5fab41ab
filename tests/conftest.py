"""Shared fixtures: small seeded ONNX models, ONNX Runtime comparisons and a CLI runner."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from click.testing import CliRunner, Result
from graph_builders import bn_stats, build_model, seeded
from ort_helpers import ModelLike, max_rel_diff, op_types, sample_inputs, sum_faster_timer, to_ir


@pytest.fixture
def build_onnx() -> Callable[..., onnx.ModelProto]:
    """``build_onnx(graph_text, weights, opset=17, check=True)``: see ``build_model``."""
    return build_model


@pytest.fixture
def op_types_of() -> Callable[[onnx.ModelProto | ir.Model], list[str]]:
    """``op_types_of(model)``: the main graph's op types in node order."""
    return op_types


@pytest.fixture
def to_ir_model() -> Callable[[onnx.ModelProto], ir.Model]:
    """``to_ir_model(proto)``: an independent ``ir.Model`` copy of a proto."""
    return to_ir


@pytest.fixture
def conv_bn_relu_model() -> onnx.ModelProto:
    """Conv(bias) -> BN -> Relu, then Conv(no bias) -> BN -> Clip(0, 6)."""
    normal = seeded(0)
    weights = {
        "w1": normal(4, 3, 3, 3, scale=0.3),
        "b1": normal(4, scale=0.1),
        "w2": normal(4, 4, 1, 1, scale=0.3),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    for i in (1, 2):
        weights.update({f"{k}{i}": v for k, v in bn_stats(4, seed=i).items()})
    return build_model(
        """
        net (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            [bn1] n1 = BatchNormalization <epsilon = 0.001> (c1, gamma1, beta1, mean1, var1)
            [relu1] r1 = Relu (n1)
            [conv2] c2 = Conv (r1, w2)
            [bn2] n2 = BatchNormalization (c2, gamma2, beta2, mean2, var2)
            [relu6] y = Clip (n2, lo, hi)
        }
        """,
        weights,
    )


@pytest.fixture
def bn_after_relu_model() -> onnx.ModelProto:
    """Conv -> Relu -> BN: the BN follows a Relu, so it cannot be folded."""
    weights = {"w": seeded(1)(4, 3, 3, 3, scale=0.3), **bn_stats(4, seed=3)}
    return build_model(
        """
        net (float[1,3,8,8] x) => (float[1,4,6,6] y) {
            [conv] c = Conv (x, w)
            [relu] r = Relu (c)
            [bn] y = BatchNormalization (r, gamma, beta, mean, var)
        }
        """,
        weights,
    )


@pytest.fixture
def noop_model() -> onnx.ModelProto:
    """Dropout, Identity, x+0 and x*1 around a Relu, and an initializer nothing uses."""
    return build_model(
        """
        net (float[2,5] x) => (float[2,5] y) {
            d = Dropout (x)
            i = Identity (d)
            a = Add (i, zero)
            m = Mul (one, a)
            y = Relu (m)
        }
        """,
        {
            "zero": np.zeros((), np.float32),
            "one": np.ones((), np.float32),
            "unused": seeded(2)(7),
        },
    )


@pytest.fixture
def constant_weights_model() -> onnx.ModelProto:
    """A Conv whose weight and bias come from Constant nodes, as some exporters write."""
    normal = seeded(4)
    model = build_model(
        """
        net (float[1,2,5,5] x) => (float[1,3,5,5] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = Relu (c)
        }
        """,
        check=False,
    )
    constants = [
        onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array))
        for name, array in {"w": normal(3, 2, 3, 3), "b": normal(3)}.items()
    ]
    for i, node in enumerate(constants):
        model.graph.node.insert(i, node)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def unsorted_model() -> onnx.ModelProto:
    """A valid chain of nodes stored in reverse order (not topologically sorted)."""
    model = build_model(
        """
        net (float[2,4] x) => (float[2,4] y) {
            a = Neg (x)
            b = Abs (a)
            y = Sqrt (b)
        }
        """,
    )
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    return model


@pytest.fixture
def matmul_add_relu_model() -> onnx.ModelProto:
    """MatMul -> Add(constant bias) -> Relu, a linear layer as exporters write it."""
    normal = seeded(5)
    return build_model(
        """
        net (float[2,8] x) => (float[2,16] y) {
            [matmul] m = MatMul (x, w)
            [bias] a = Add (m, b)
            [relu] y = Relu (a)
        }
        """,
        {"w": normal(8, 16, scale=0.3), "b": normal(16)},
    )


# ---------------------------------------------------------------------------- running


@pytest.fixture
def assert_same_outputs() -> Callable[..., float]:
    """``check(reference, candidate, feeds=None, tol=1e-6)``: outputs agree on ORT."""

    def check(
        reference: ModelLike,
        candidate: ModelLike,
        feeds: Mapping[str, np.ndarray] | None = None,
        tol: float = 1e-6,
    ) -> float:
        if feeds is None:
            ref = reference
            if not isinstance(ref, (onnx.ModelProto, ir.Model)):
                ref = onnx.load(str(ref))
            feeds = sample_inputs(ref)
        diff = max_rel_diff(reference, candidate, feeds)
        assert diff <= tol, f"outputs differ by {diff:.3g} (relative) > {tol:g}"
        return diff

    return check


@pytest.fixture
def save_onnx(tmp_path: Path) -> Callable[..., Path]:
    """``save(model, name="model.onnx")``: writes a proto or ir.Model under tmp_path."""

    def save(model: onnx.ModelProto | ir.Model, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        if isinstance(model, ir.Model):
            ir.save(model, path)
        else:
            onnx.save(model, path)
        return path

    return save


# ---------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> Callable[..., Result]:
    """``cli("compile", "m.onnx", ...)``: invokes ``onnxq.cli.main`` in-process.

    stderr is kept apart from stdout (``result.stderr``); exceptions other than SystemExit
    end up in ``result.exception`` as they would reach the user.
    """
    from onnxq.cli import main

    def invoke(*args: str | os.PathLike) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)

    return invoke


# ---------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance of 2 CPUs for the module's tests; skips them without Ray.

    Executors attach to it (`onnxq.executor.RayExecutor` uses an initialised Ray) and
    leave it running; it is shut down after the module, as starting one is slow.
    """
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (onnxq[ray])")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def sum_beats_skip_layernorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual-LayerNorm timing says Sum is faster (deterministic: no real timing)."""
    from onnxq.passes import layernorm

    monkeypatch.setattr(layernorm, "time_residual_forms", sum_faster_timer)
