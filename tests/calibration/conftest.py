"""Small seeded models for the calibration tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def make_model(text: str, **weights: np.ndarray) -> ir.Model:
    """Parses ONNX text, adds float32 ``weights`` as initializers, returns the IR model."""
    proto = onnx.parser.parse_model(_HEADER + text)
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


@pytest.fixture
def mlp() -> ir.Model:
    """x[N, 4] -> MatMul -> Relu -> Add -> y[N, 3]."""
    rng = np.random.default_rng(0)
    return make_model(
        """
        g (float[N, 4] x) => (float[N, 3] y) {
          h = MatMul(x, w)
          r = Relu(h)
          y = Add(r, b)
        }
        """,
        w=rng.standard_normal((4, 3)).astype(np.float32),
        b=rng.standard_normal(3).astype(np.float32),
    )


@pytest.fixture
def two_inputs() -> ir.Model:
    """A float input and an int64 input."""
    return make_model(
        """
        g (float[N, 3] a, int64[N, 2] ids) => (float[N, 3] y, int64[N, 2] z) {
          y = Relu(a)
          z = Identity(ids)
        }
        """
    )


@pytest.fixture
def image_model() -> ir.Model:
    """x[N, 3, 8, 8] -> ReduceMean over H and W."""
    return make_model(
        """
        g (float[N, 3, 8, 8] x) => (float[N, 3] y) {
          y = ReduceMean <axes = [2, 3], keepdims = 0> (x)
        }
        """
    )


@pytest.fixture
def text_model():
    """The `make_model` helper, for tests that need their own graph."""
    return make_model
