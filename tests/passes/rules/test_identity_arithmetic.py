"""Tests for passes/rules/identity_arithmetic.py: exact identity elements only."""

from __future__ import annotations

import numpy as np
import pytest
from graph_builders import build_model
from ort_helpers import to_ir

from onnxq.passes.cleanup import RemoveNoOpsPass


def _ops_after(body: str, constant: np.ndarray, out: str = "float[2,3] y") -> list[str]:
    proto = build_model(f"net (float[2,3] x) => ({out}) {{\n{body}\n}}", {"c": constant})
    model = to_ir(proto)
    RemoveNoOpsPass()(model)
    return [n.op_type for n in model.graph if n.op_type != "Identity"]


@pytest.mark.parametrize(
    ("body", "element"),
    [
        ("a = Add (x, c)", 0.0),
        ("a = Add (c, x)", 0.0),
        ("a = Sub (x, c)", 0.0),
        ("a = Mul (x, c)", 1.0),
        ("a = Mul (c, x)", 1.0),
        ("a = Div (x, c)", 1.0),
    ],
)
def test_exact_identity_element_is_removed(body, element):
    ops = _ops_after(f"{body}\n y = Relu (a)", np.full((), element, np.float32))
    assert ops == ["Relu"]


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ("a = Add (x, c)", 1e-10),  # the epsilon of log(x + eps): not a no-op
        ("a = Add (c, x)", 1e-12),
        ("a = Mul (x, c)", 1.000001),
        ("a = Div (x, c)", 0.9999999),
    ],
)
def test_near_identity_constants_are_kept(body, value):
    ops = _ops_after(f"{body}\n y = Relu (a)", np.full((), value, np.float32))
    assert ops[0] in ("Add", "Mul", "Div")


def test_zeros_that_broadcast_x_are_kept():
    # x [2,3] + zeros [4,2,3] is a [4,2,3] tensor: removing the Add would change the shape.
    ops = _ops_after(
        "a = Add (x, c)\n y = Relu (a)", np.zeros((4, 2, 3), np.float32), out="float[4,2,3] y"
    )
    assert ops == ["Add", "Relu"]
