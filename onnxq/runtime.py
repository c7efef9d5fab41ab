"""ONNX Runtime sessions for IR models and files, per execution provider."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from onnxq.errors import InputError

__all__ = [
    "PROVIDERS",
    "Probe",
    "available_providers",
    "check_provider",
    "create_session",
    "expand_providers",
    "run",
]

logger = logging.getLogger(__name__)

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


def check_provider(provider: str) -> None:
    """Checks that a provider short name is known and usable in this onnxruntime build.

    Raises:
        InputError: The name is unknown, or the provider is not available.
    """
    if provider not in PROVIDERS:
        raise InputError(
            f"unknown execution provider '{provider}'; choose from {sorted(PROVIDERS)}"
        )
    if provider not in available_providers():
        what = "CUDA is unavailable" if provider == "cuda" else f"'{provider}' is unavailable"
        raise InputError(
            f"{what} in this onnxruntime build (available: "
            f"{', '.join(available_providers())}); for CUDA install onnxruntime-gpu"
        )


def expand_providers(provider: str) -> list[str]:
    """Resolves ``all`` to every available provider; checks any other name.

    Raises:
        InputError: See `check_provider`.
    """
    if provider == "all":
        return available_providers()
    check_provider(provider)
    return [provider]


def _provider_list(provider: str) -> list[str]:
    check_provider(provider)
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
    arena: bool = True,
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
        arena: Use ONNX Runtime's CPU memory arena. It grows in powers of two and never
            returns memory, which matters when single tensors are hundreds of MB.
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
    if not arena:
        opts.enable_cpu_mem_arena = False
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


def _producer_label(value: ir.Value) -> str:
    node = value.producer()
    if node is None:
        return "graph input"
    return f"{node.op_type} node '{node.name}'" if node.name else f"{node.op_type} node"


class Probe:
    """Runs a model and returns chosen intermediate tensors besides its outputs.

    The model is cloned (the caller's model is never touched), its types are inferred with
    onnx_ir's shape inference, and the chosen values become extra graph outputs of the clone.
    The session runs with graph optimizations off, since fusion would remove the very tensors
    being looked at.

    Attributes:
        names: The tensors each run returns, in the order chosen (graph outputs among them
            are returned like any other value).
        sources: Per chosen tensor, what computes it (for messages), e.g. ``Conv node 'c1'``.
    """

    def __init__(
        self,
        model: ir.Model,
        choose: Callable[[ir.Graph], Iterable[ir.Value]],
        *,
        provider: str = "cpu",
    ) -> None:
        """Builds the instrumented copy and its session.

        Args:
            model: The model to look inside.
            choose: Given the typed copy's main graph, returns the values to expose. Values
                whose type stays unknown are skipped with a warning: ONNX Runtime needs a
                type to return a value.
            provider: Execution provider short name.
        """
        copy = model.clone()
        common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(copy)
        chosen = list(dict.fromkeys(choose(copy.graph)))
        untyped = [v.name for v in chosen if v.type is None]
        if untyped:
            logger.warning(
                "skipping %d tensor(s) whose type is unknown even after shape inference: %s",
                len(untyped),
                ", ".join(untyped[:10]) + (" ..." if len(untyped) > 10 else ""),
            )
        chosen = [v for v in chosen if v.type is not None]
        present = {v.name for v in copy.graph.outputs}
        copy.graph.outputs.extend(v for v in chosen if v.name not in present)
        self.sources = {v.name: _producer_label(v) for v in chosen}
        self.names = [v.name for v in chosen]
        # Without the arena, each exposed tensor's memory goes back to the OS once dropped,
        # so calibration's peak is what its memory plan estimates.
        self.session = create_session(copy, provider=provider, optimization="disable", arena=False)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch and returns the chosen tensors by name."""
        return dict(zip(self.names, self.session.run(self.names, dict(feeds)), strict=True))
