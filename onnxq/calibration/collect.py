"""Runs calibration data through a model and streams every tensor's values into statistics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import onnx_ir as ir

from onnxq import runtime
from onnxq.calibration.data import CalibrationData
from onnxq.calibration.stats import DEFAULT_NUM_BINS, TensorStats
from onnxq.errors import CompileError, InputError
from onnxq.io import atomic_write

__all__ = ["FLOAT_TYPES", "RANGES_FORMAT", "collect_stats", "load_ranges", "save_ranges"]

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
RANGES_FORMAT = "onnxq.ranges"
_RANGES_VERSION = 1


def _instrumented_copy(model: ir.Model) -> ir.Model:
    """A copy of the model with types inferred; the caller's model is never touched."""
    proto = ir.serde.serialize_model(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except (onnx.shape_inference.InferenceError, ValueError) as e:
        # Missing types only mean fewer tensors can be calibrated; they are reported below.
        logger.warning("shape inference failed (%s); using the types in the model", e)
    return ir.serde.deserialize_model(proto)


def _producer_label(value: ir.Value) -> str:
    node = value.producer()
    if node is None:
        return "graph input"
    return f"{node.op_type} node '{node.name}'" if node.name else f"{node.op_type} node"


def _select_values(graph: ir.Graph, tensor_names: list[str] | None) -> list[ir.Value]:
    """Picks the float values to calibrate: requested ones, or all node outputs and inputs."""
    candidates: dict[str, ir.Value] = {}
    initializers = set(graph.initializers)
    for value in graph.inputs:
        if value.name not in initializers:
            candidates[value.name] = value
    for node in graph:
        for value in node.outputs:
            if value.name:
                candidates[value.name] = value
    if tensor_names is not None:
        unknown = [n for n in tensor_names if n not in candidates]
        if unknown:
            raise InputError(
                f"tensors not found in the model (or not computed by it): {', '.join(unknown)}"
            )
        candidates = {n: candidates[n] for n in tensor_names}
    selected, untyped, non_float = [], [], []
    for name, value in candidates.items():
        if value.dtype is None:
            untyped.append(name)
        elif value.dtype in FLOAT_TYPES:
            selected.append(value)
        else:
            non_float.append(name)
    if untyped:
        # Without a type a value cannot be declared as an output; ONNX Runtime needs one.
        logger.warning(
            "skipping %d tensor(s) whose type is unknown even after shape inference: %s",
            len(untyped),
            ", ".join(untyped[:10]) + (" ..." if len(untyped) > 10 else ""),
        )
    if non_float and tensor_names is not None:
        logger.warning("skipping tensor(s) that are not float: %s", ", ".join(non_float))
    return selected


@contextlib.contextmanager
def _progress(total: int | None, enabled: bool | None) -> Iterator[Callable[[int], None]]:
    """Shows progress on a terminal's stderr, else as debug log lines.

    On a terminal it is a bar, or a sample counter when the total is unknown.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if enabled and total is not None:
        with click.progressbar(length=total, label="calibrating", file=sys.stderr) as bar:
            yield bar.update
        return
    done = 0

    def update(n: int) -> None:
        nonlocal done
        done += n
        if enabled:
            click.echo(f"\rcalibrating: {done} samples", nl=False, err=True)
        logger.debug("calibration: %d/%s samples", done, total or "?")

    yield update
    if enabled:
        click.echo(err=True)


def collect_stats(
    model: ir.Model,
    data: CalibrationData,
    tensor_names: list[str] | None = None,
    *,
    provider: str = "cpu",
    progress: bool | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, TensorStats]:
    """Runs the calibration data through the model and collects per-tensor statistics.

    A copy of the model exposes the chosen tensors as outputs and runs in one ONNX Runtime
    session with graph optimizations off, so that every name still exists. Each batch's
    outputs are folded into the statistics and dropped: memory does not grow with the
    number of samples.

    Args:
        model: The model; it is not modified.
        data: Calibration data opened for this model.
        tensor_names: Tensors to calibrate; by default every float tensor computed by a
            node of the main graph, and the float graph inputs.
        provider: Execution provider short name (``cpu``, ``cuda``).
        progress: Show a progress bar on stderr; by default only when it is a terminal.
        num_bins: Histogram bins per tensor.
        on_batch: Called with each batch's tensors by name (before they are dropped), e.g.
            to keep the model's outputs for a later comparison.

    Returns:
        Statistics by tensor name.

    Raises:
        InputError: A requested tensor is not in the model.
        CompileError: An activation holds NaN or Inf for the calibration data.
    """
    copy = _instrumented_copy(model)
    values = _select_values(copy.graph, tensor_names)
    if not values:
        raise InputError("the model has no float tensors to calibrate")
    present = {v.name for v in copy.graph.outputs}
    copy.graph.outputs.extend(v for v in values if v.name not in present)
    producers = {v.name: _producer_label(v) for v in values}
    names = [v.name for v in values]
    session = runtime.create_session(copy, provider=provider, optimization="disable")
    del copy
    stats = {name: TensorStats(num_bins) for name in names}
    samples = 0
    with _progress(data.num_samples, progress) as update:
        for batch in data.batches():
            outputs = dict(zip(names, session.run(names, batch), strict=True))
            for name, array in outputs.items():
                _update(stats[name], array, name, producers[name], samples)
            if on_batch is not None:
                on_batch(outputs)
            del outputs
            rows = len(next(iter(batch.values())))
            samples += rows
            update(rows)
    logger.info("Collected statistics of %d tensors over %d samples", len(stats), samples)
    return stats


def _update(stats: TensorStats, array: np.ndarray, name: str, producer: str, first: int) -> None:
    stats.update(array)
    if stats.nan_count or stats.inf_count:
        what = "NaN" if stats.nan_count else "Inf"
        raise CompileError(
            f"tensor '{name}' (output of {producer}) has {what} values for the calibration "
            f"batch starting at sample {first}; the model computes invalid values on this data"
        )


# ---------------------------------------------------------------------------------------------
# Range files.


def save_ranges(
    path: str | os.PathLike, ranges: Mapping[str, tuple[float, float]], meta: Mapping[str, Any]
) -> Path:
    """Writes tensor ranges to a JSON file atomically.

    Args:
        path: Destination file.
        ranges: ``(lo, hi)`` by tensor name.
        meta: JSON-serializable facts about how they were made (method, samples, model).

    Returns:
        The path written.
    """
    path = Path(path)
    document = {
        "format": RANGES_FORMAT,
        "version": _RANGES_VERSION,
        "meta": dict(meta),
        "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in ranges.items()},
    }
    with atomic_write(path, "w") as f:
        json.dump(document, f, indent=1, allow_nan=False)
        f.write("\n")
    logger.info("Saved %d ranges to %s", len(ranges), path)
    return path


def load_ranges(path: str | os.PathLike) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Reads a ranges file written by `save_ranges`.

    Returns:
        ``(ranges, meta)``: ``(lo, hi)`` floats by tensor name, and the metadata.

    Raises:
        InputError: The file is missing, not JSON, or not a valid ranges file.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise InputError(f"{path}: no such ranges file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a valid ranges JSON file: {e}") from e
    if not isinstance(document, dict) or document.get("format") != RANGES_FORMAT:
        raise InputError(f'{path}: not an onnxq ranges file (no "format": "{RANGES_FORMAT}")')
    if document.get("version") != _RANGES_VERSION:
        raise InputError(
            f"{path}: ranges file version {document.get('version')!r} is not supported "
            f"(expected {_RANGES_VERSION})"
        )
    meta, raw = document.get("meta", {}), document.get("ranges")
    if not isinstance(meta, dict) or not isinstance(raw, dict):
        raise InputError(f'{path}: "meta" and "ranges" must be JSON objects')
    return {name: _parse_range(path, name, item) for name, item in raw.items()}, meta


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _parse_range(path: Path, name: str, item: Any) -> tuple[float, float]:
    if (
        not isinstance(item, list)
        or len(item) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
    ):
        raise InputError(f"{path}: range of '{name}' must be [lo, hi] numbers, got {item!r}")
    lo, hi = float(item[0]), float(item[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"{path}: range of '{name}' must be finite with lo <= hi, got {item!r}")
    return lo, hi
