"""Prunable weights: constant Conv/Gemm/MatMul weights, their input-channel axis, exclusions."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError

STANDARD_DOMAINS = ("", "ai.onnx")


def parse_sparsity(text: str) -> float:
    """A sparsity in [0, 1) from text (the ``S`` of a ``--prune`` request).

    Raises:
        InputError: Not a number, or outside [0, 1).
    """
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"sparsity must be in [0, 1), got '{text}'") from None
    if not 0 <= value < 1:
        raise InputError(f"sparsity must be in [0, 1), got {value:g}")
    return value


class Exclusions:
    """Node names, regular expressions (full match) and op types kept out of pruning."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        try:
            self._regexes = [re.compile(p) for p in self.patterns]
        except re.error as e:
            raise InputError(f"bad prune exclusion pattern: {e}") from None

    def __call__(self, node: ir.Node) -> bool:
        if node.op_type in self.patterns:
            return True
        return any(r.fullmatch(node.name or "") for r in self._regexes)


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array, or None when it is not a constant."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def is_standard(node: ir.Node, *op_types: str) -> bool:
    """Whether ``node`` is one of the standard-domain ``op_types``."""
    return node.domain in STANDARD_DOMAINS and node.op_type in op_types


def input_axis(node: ir.Node) -> int | None:
    """The input-channel axis of a node's constant weight, or None when it has none."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = const(weight)
    if array is None or array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
        return None
    if is_standard(node, "Conv"):
        return 1
    if is_standard(node, "Gemm"):
        return 1 if node.attributes.get_int("transB", 0) else 0
    if is_standard(node, "MatMul") and array.ndim == 2:
        return 0
    return None


@dataclasses.dataclass
class Weight:
    """A prunable constant weight: the value, the layer it is reported under, its Cin axis."""

    value: ir.Value
    layer: str
    axis: int

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


def find_weights(model: ir.Model, excluded: Callable[[ir.Node], bool]) -> list[Weight]:
    """Conv/Gemm/MatMul constant weights of the main graph, each once (weights may be shared)."""
    found: dict[ir.Value, Weight] = {}
    for node in model.graph:
        axis = input_axis(node)
        if axis is None or excluded(node) or node.inputs[1] in found:
            continue
        found[node.inputs[1]] = Weight(node.inputs[1], node.name or node.inputs[1].name, axis)
    return list(found.values())
