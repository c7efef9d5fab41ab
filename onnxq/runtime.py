"""ONNX Runtime sessions for IR models and files, per execution provider."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from onnxq.errors import InputError

__all__ = [
    "PREPACK_LIMIT_BYTES",
    "PROVIDERS",
    "Probe",
    "available_providers",
    "check_provider",
    "create_session",
    "expand_providers",
    "feed_error",
    "run",
]

logger = logging.getLogger(__name__)

# Weights past this many bytes are not pre-packed in the sessions that look inside a model
# (calibration, per-layer comparison): ONNX Runtime's CPU MatMul/Conv keep a pre-packed copy
# of each weight besides the initializer, which doubles the session's memory (4.6 GB vs 2.3 GB
# for one 2.3 GB weight), while these sessions run a few batches at most.
PREPACK_LIMIT_BYTES = 1_000_000_000

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


def _threads_from_env() -> int | None:
    """``ONNXQ_THREADS`` as a positive count, else None (a bad value is ignored)."""
    value = os.environ.get("ONNXQ_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def create_session(
    model: ir.Model | str | os.PathLike,
    *,
    provider: str = "cpu",
    optimization: str = "all",
    threads: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    profile: bool = False,
    arena: bool = True,
    prepack: bool = True,
) -> ort.InferenceSession:
    """Creates an inference session for an IR model or a model file.

    Args:
        model: An ``ir.Model`` (serialized in memory, or through a temporary file when it
            is too large for one protobuf) or a path to an ``.onnx`` file.
        provider: ``cpu`` or ``cuda``.
        optimization: ``disable``, ``basic``, ``extended`` or ``all`` (what deployment uses).
        threads: Intra-op thread count; ``None``: ``ONNXQ_THREADS`` when set (executor
            workers set their share of the cores, see `onnxq.executor`), else ONNX
            Runtime's choice (every core).
        optimized_model_path: Where ONNX Runtime writes the graph it actually runs.
        profile: Enable ONNX Runtime's profiler (used for per-node provider placement).
        arena: Use ONNX Runtime's CPU memory arena. It grows in powers of two and never
            returns memory, which matters when single tensors are hundreds of MB.
        prepack: Let kernels keep pre-packed copies of their weights (what deployment
            does: faster runs, but each such weight is held twice).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    # Fatal only: ORT's own error log lines (with colour codes) would repeat, in a second
    # format, the error onnxq reports as one line.
    opts.log_severity_level = 4
    threads = threads or _threads_from_env()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    if profile:
        opts.enable_profiling = True
    if not arena:
        opts.enable_cpu_mem_arena = False
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    providers = _provider_list(provider)
    if not isinstance(model, ir.Model):
        return _Session(str(model), opts, providers=providers)
    from onnxq.io import EXTERNAL_DATA_THRESHOLD, model_nbytes, save_model

    if model_nbytes(model) < EXTERNAL_DATA_THRESHOLD:
        data = ir.serde.serialize_model(model).SerializeToString()
        return _Session(data, opts, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        return _Session(str(path), opts, providers=providers)


# ORT's messages about feeds that do not fit the model -> what the one-line error says.
_GATHER_RANGE = re.compile(
    r"running (\w+) node\. Name:'([^']*)' Status Message: indices element out of data "
    r"bounds, idx=(-?\d+) must be within the inclusive range \[(-?\d+),(-?\d+)\]"
)
_BAD_DIMS = re.compile(
    r"Got invalid dimensions for input: (\S+) for the following indices(.*?)Please", re.DOTALL
)
_AXIS = re.compile(r"index: (\d+) Got: (\d+) Expected: (\d+)")
_BAD_RANK = re.compile(r"Invalid rank for input: (\S+) Got: (\d+) Expected: (\d+)")
_BAD_TYPE = re.compile(r"Unexpected input data type\. Actual: \((.*?)\) , expected: \((.*?)\)")


class _Session(ort.InferenceSession):
    """An inference session whose runs say in one line which input does not fit the model."""

    def run(self, output_names, input_feed, run_options=None):
        try:
            return super().run(output_names, input_feed, run_options)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as e:
            types = {i.name: i.type for i in self.get_inputs()}
            message = feed_error(str(e), input_feed, types)
            if message is None:
                raise
            raise InputError(message) from e


def feed_error(
    text: str, feeds: Mapping[str, np.ndarray], types: Mapping[str, str] | None = None
) -> str | None:
    """Re-says ORT's error about feeds that do not fit the model, naming the input.

    Args:
        text: ORT's error message.
        feeds: The feeds of the failed run.
        types: ORT's type of each model input (``tensor(float)``), to name a mistyped one.

    Returns:
        One line, or None when ``text`` is not such an error.
    """
    if m := _GATHER_RANGE.search(text):
        op, node, idx, lo, hi = m.group(1), m.group(2), *map(int, m.groups()[2:])
        where = f"{op} node '{node}'" if node else f"a {op} node"
        culprits = [
            name
            for name, array in feeds.items()
            if np.issubdtype(np.asarray(array).dtype, np.integer)
            and array.size
            and (array.max() > hi or array.min() < lo)
        ]
        if not culprits:
            return (
                f"{where}: index {idx} is out of its range [{lo}, {hi}] (computed from the inputs)"
            )
        return (
            f"input '{culprits[0]}' holds {idx}, out of the range [{lo}, {hi}] of {where}: "
            f"ids (e.g. token ids) must be below {hi + 1}, the size of the table it indexes"
        )
    if m := _BAD_RANK.search(text):
        return f"input '{m.group(1)}' has rank {m.group(2)}, the model expects rank {m.group(3)}"
    if m := _BAD_DIMS.search(text):
        axes = "; ".join(
            f"axis {axis} is {got}, the model expects {want}"
            for axis, got, want in _AXIS.findall(m.group(2))
        )
        return f"input '{m.group(1)}' does not fit the model: {axes}"
    if m := _BAD_TYPE.search(text):
        names = [
            name
            for name, array in feeds.items()
            if types and types.get(name) not in (None, _ort_type(np.asarray(array).dtype))
        ]
        which = f"input '{names[0]}'" if names else "an input"
        return f"{which} is {m.group(1)}, the model expects {m.group(2)}"
    return None


def _ort_type(dtype: np.dtype) -> str:
    """ORT's name of a numpy element type, as in ``tensor(float)``."""
    return f"tensor({ {'float32': 'float', 'float64': 'double'}.get(dtype.name, dtype.name) })"


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
        # so calibration's peak is what its memory plan estimates; big weights are held
        # once, not also pre-packed.
        from onnxq.io import model_nbytes

        self.session = create_session(
            copy,
            provider=provider,
            optimization="disable",
            arena=False,
            prepack=model_nbytes(copy) <= PREPACK_LIMIT_BYTES,
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch and returns the chosen tensors by name."""
        return dict(zip(self.names, self.session.run(self.names, dict(feeds)), strict=True))
