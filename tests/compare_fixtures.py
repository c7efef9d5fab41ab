"""A tiny Conv + Gemm classifier, a noisy copy and labelled data for the compare tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from graph_builders import build_model, seeded

from onnxq import runtime

ROWS = 16
# Conv: 4 output channels x 4x4 positions x (1 channel x 3x3 kernel) = 576 MACs per sample;
# Gemm: 3 outputs x 64 inputs = 192.
MACS = 4 * 4 * 4 * (1 * 3 * 3) + 3 * 64
# Conv weight and bias, Gemm weight and bias.
PARAMETERS = 4 * 1 * 3 * 3 + 4 + 64 * 3 + 3
# The candidate adds this to every row of the scores.
NOISE = np.array([0.05, -0.1, 0.02], np.float32)

_NET = """
net (float[N,1,6,6] x) => (float[N,3] scores) {
    c = Conv (x, w, b)
    r = Relu (c)
    f = Flatten (r)
    scores = Gemm (f, gw, gb)
}
"""
_NOISY = _NET.replace(
    "scores = Gemm (f, gw, gb)", "g = Gemm (f, gw, gb)\n    scores = Add (g, noise)"
)


def tiny_net(noise: bool = False) -> onnx.ModelProto:
    normal = seeded(0)
    weights = {
        "w": normal(4, 1, 3, 3, scale=0.5),
        "b": normal(4, scale=0.1),
        "gw": normal(64, 3, scale=0.3),
        "gb": normal(3, scale=0.1),
    }
    if noise:
        weights["noise"] = NOISE
    return build_model(_NOISY if noise else _NET, weights)


def write_models(tmp: Path) -> tuple[Path, Path, Path]:
    """ref.onnx, noisy.onnx (ref + NOISE on the scores) and data.npz (x, y) under tmp.

    The labels are the reference's predictions with every 4th shifted to another class.
    """
    ref, noisy, data = tmp / "ref.onnx", tmp / "noisy.onnx", tmp / "data.npz"
    onnx.save(tiny_net(), ref)
    onnx.save(tiny_net(noise=True), noisy)
    x = seeded(1)(ROWS, 1, 6, 6)
    y = reference_scores(ref, x).argmax(axis=1)
    y[::4] = (y[::4] + 1) % 3
    np.savez(data, x=x, y=y.astype(np.int64))
    return ref, noisy, data


def reference_scores(ref: Path, x: np.ndarray) -> np.ndarray:
    return runtime.create_session(ref).run(None, {"x": x})[0]
