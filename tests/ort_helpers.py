"""Running test models on ONNX Runtime and comparing outputs (shared by tests)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import runtime
from onnxq.inputs import input_specs, random_inputs

ModelLike = onnx.ModelProto | ir.Model | str | os.PathLike


def op_types(model: onnx.ModelProto | ir.Model) -> list[str]:
    """Returns the op types of the main graph in node order."""
    if isinstance(model, ir.Model):
        return [n.op_type for n in model.graph]
    return [n.op_type for n in model.graph.node]


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """Converts a proto to the IR without sharing anything with it (passes work in place)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return ir.from_proto(copy)


def _as_ort_model(model: ModelLike) -> ir.Model | str:
    if isinstance(model, onnx.ModelProto):
        return to_ir(model)
    if isinstance(model, ir.Model):
        return model
    return str(model)


def sample_inputs(model: onnx.ModelProto | ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input of the model."""
    ir_model = to_ir(model) if isinstance(model, onnx.ModelProto) else model
    return random_inputs(input_specs(ir_model), batch=1, seed=seed)


def ort_outputs(model: ModelLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a model (proto, ir.Model or file) on ONNX Runtime's CPU provider, unoptimised."""
    session = runtime.create_session(_as_ort_model(model), optimization="disable")
    return runtime.run(session, feeds)


def max_rel_diff(
    reference: ModelLike, candidate: ModelLike, feeds: Mapping[str, np.ndarray]
) -> float:
    """Largest |candidate - reference| over all outputs, divided by max(|reference|, 1)."""
    expected, got = ort_outputs(reference, feeds), ort_outputs(candidate, feeds)
    assert expected.keys() == got.keys()
    worst = 0.0
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        scale = max(1.0, float(np.max(np.abs(ref))))
        worst = max(worst, float(np.max(np.abs(got[name] - ref))) / scale)
    return worst


def sum_faster_timer(
    models: Mapping[str, os.PathLike], *, provider: str, threads: int | None
) -> dict[str, np.ndarray]:
    """Stands in for `time_residual_forms`: Sum + LayerNorm 5x faster than SkipLayerNorm.

    Deterministic (seeded rounds), so a test that expects the residual Adds written as Sum
    does not depend on this machine's timing.
    """
    rng = np.random.default_rng(0)
    medians = {"fused": 1.0, "sum": 0.2}
    return {k: medians[k] * (1 + rng.normal(0, 0.01, 30)) for k in models}
