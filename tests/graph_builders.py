"""Seeded ONNX graph builders shared by tests (import them; fixtures wrap them too)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx.parser

_HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'


def build_model(
    graph_text: str,
    weights: Mapping[str, np.ndarray] = (),
    *,
    opset: int = 17,
    check: bool = True,
) -> onnx.ModelProto:
    """Parses a graph in ONNX text syntax and adds ``weights`` as its initializers."""
    model = onnx.parser.parse_model(_HEADER.format(opset=opset) + graph_text)
    for name, array in dict(weights).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def seeded(seed: int) -> Callable[..., np.ndarray]:
    """Returns ``normal(*shape, scale=1.0)`` drawing float32 from a seeded generator."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    return normal


def bn_stats(channels: int, seed: int) -> dict[str, np.ndarray]:
    """Non-trivial BatchNormalization parameters: gamma, beta, mean and a positive var."""
    normal = seeded(seed)
    return {
        "gamma": normal(channels, scale=0.5, offset=1.0),
        "beta": normal(channels, scale=0.5),
        "mean": normal(channels, scale=0.5),
        "var": np.abs(normal(channels, scale=0.5)) + 0.5,
    }
