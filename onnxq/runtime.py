"""ONNX Runtime sessions for IR models and files, per execution provider."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import InputError

__all__ = ["PROVIDERS", "available_providers", "create_session", "run"]

# Short names users type -> ONNX Runtime provider names.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    """Returns the short names of the providers this onnxruntime build can use."""
    names = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in names]


def _provider_list(provider: str) -> list[str]:
    if provider not in PROVIDERS:
        raise InputError(
            f"unknown execution provider '{provider}'; choose from {sorted(PROVIDERS)}"
        )
    if provider not in available_providers():
        raise InputError(
            f"execution provider '{provider}' is not available in this onnxruntime build "
            f"(available: {', '.join(available_providers())}); for CUDA install onnxruntime-gpu"
        )
    # CPU stays as a fallback for nodes the chosen provider has no kernel for.
    return [PROVIDERS[provider]] if provider == "cpu" else [PROVIDERS[provider], PROVIDERS["cpu"]]


def create_session(
    model: ir.Model | str | os.PathLike,
    *,
    provider: str = "cpu",
    optimization: str = "all",
    threads: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    profile: bool = False,
) -> ort.InferenceSession:
    """Creates an inference session for an IR model or a model file.

    Args:
        model: An ``ir.Model`` (serialized in memory, or through a temporary file when it
            is too large for one protobuf) or a path to an ``.onnx`` file.
        provider: ``cpu`` or ``cuda``.
        optimization: ``disable``, ``basic``, ``extended`` or ``all`` (what deployment uses).
        threads: Intra-op thread count; ``None`` lets ONNX Runtime choose.
        optimized_model_path: Where ONNX Runtime writes the graph it actually runs.
        profile: Enable ONNX Runtime's profiler (used for per-node provider placement).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    if profile:
        opts.enable_profiling = True
    providers = _provider_list(provider)
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(str(model), opts, providers=providers)
    from onnxq.io import EXTERNAL_DATA_THRESHOLD, model_nbytes, save_model

    if model_nbytes(model) < EXTERNAL_DATA_THRESHOLD:
        data = ir.serde.serialize_model(model).SerializeToString()
        return ort.InferenceSession(data, opts, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), opts, providers=providers)


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a session and returns its outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))
