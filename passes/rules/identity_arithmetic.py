"""Arithmetic by an exact identity element (``x + 0``, ``x * 1``, ...) -> ``x``.

The rules cover ``x + 0``, ``0 + x``, ``x - 0``, ``x * 1``, ``1 * x`` and ``x / 1``. For
a constant ``c`` that is *exactly* the identity element (every element), and that does
not broadcast ``x`` to a larger shape, each is exact in any precision::

    x + 0 == x,   x - 0 == x,   x * 1 == x,   x / 1 == x

onnxscript's own no-op rules match their constants with a tolerance (``abs_tol=1e-8``,
``rel_tol=1e-5``), so they also remove ``log(x² + 1e-10)``'s epsilon: Basic Pitch's
log-magnitude front end then takes ``log(0) = -inf`` and its onsets change (measured on its
real inputs: SQNR 18.7 dB against the model as shipped). These rules compare exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

__all__ = ["identity_arithmetic_rules"]


def _exact_identity(x: ir.Value, c: ir.Value, element: float) -> MatchResult:
    result = MatchResult()
    tensor = c.const_value
    if tensor is None:
        return result.fail("not a constant")
    array = tensor.numpy()
    if array.size == 0 or not np.all(array == element):
        return result.fail(f"not exactly {element:g} everywhere")
    if array.size != 1:
        # A full tensor of identity elements still broadcasts: only keep same-shape cases.
        if x.shape is None or not x.shape.is_static() or tuple(x.shape) != array.shape:
            return result.fail("may broadcast x to another shape")
    elif array.ndim and (x.shape is None or array.ndim > len(x.shape)):
        return result.fail("may add axes to x")  # (a 0-d constant never does)
    if x.dtype is not None and c.dtype is not None and x.dtype != c.dtype:
        return result.fail("operand types differ")
    return result


class _IdentityOperand(pattern.RewriteRuleClassBase):
    """``op(x, c)`` (or ``op(c, x)``) with ``c`` the op's identity element -> ``x``."""

    op_type = ""
    element = 0.0
    constant_first = False

    def pattern(self, op, x, c):
        make = getattr(op, self.op_type)
        return make(c, x) if self.constant_first else make(x, c)

    def check(self, context, x: ir.Value, c: ir.Value) -> MatchResult:
        del context
        return _exact_identity(x, c, self.element)

    def rewrite(self, op, x: ir.Value, c: ir.Value):
        return op.Identity(x)


def _rule(op_type: str, element: float, constant_first: bool = False) -> pattern.RewriteRule:
    name = f"{'C' if constant_first else 'X'}{op_type}{element:g}Identity"
    attributes = {"op_type": op_type, "element": element, "constant_first": constant_first}
    cls = type(name, (_IdentityOperand,), attributes)
    return cls.rule()


identity_arithmetic_rules = [
    _rule("Add", 0.0),
    _rule("Add", 0.0, constant_first=True),
    _rule("Sub", 0.0),
    _rule("Mul", 1.0),
    _rule("Mul", 1.0, constant_first=True),
    _rule("Div", 1.0),
]
