"""Tiny seeded classifiers and data sets for the bench, eval, report and gate tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES, CLASSES, ROWS = 8, 6, 40


def weights(seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Reference weights for ``seed``; ``noise`` perturbs them (the 'candidate')."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    b = rng.standard_normal(CLASSES).astype(np.float32)
    if noise:
        prng = np.random.default_rng(seed + 1000)
        w = w + noise * prng.standard_normal(w.shape).astype(np.float32)
        b = b + noise * prng.standard_normal(b.shape).astype(np.float32)
    return w, b


def classifier(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """MatMul + Add + Softmax: x[N, F] -> logits (intermediate) -> probs[N, C]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels: the reference's predictions with every 4th label shifted."""
    x = np.random.default_rng(seed + 7).standard_normal((ROWS, FEATURES)).astype(np.float32)
    w, b = weights(seed)
    labels = np.argmax(x @ w + b, axis=1).astype(np.int64)
    labels[::4] = (labels[::4] + 1) % CLASSES
    return x, labels


def write_pair(tmp: Path, noise: float = 0.05) -> tuple[Path, Path, Path]:
    """Writes ref.onnx, cand.onnx (perturbed weights) and data.npz (keys x, y) under tmp."""
    ref, cand, data = tmp / "ref.onnx", tmp / "cand.onnx", tmp / "data.npz"
    onnx.save(classifier(*weights()), ref)
    onnx.save(classifier(*weights(noise=noise)), cand)
    x, y = dataset()
    np.savez(data, x=x, y=y)
    return ref, cand, data
