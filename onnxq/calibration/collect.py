"""Runs calibration data through a model and streams every tensor's values into statistics."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import click
import numpy as np
import onnx_ir as ir

from onnxq import runtime
from onnxq.calibration.data import batch_samples
from onnxq.calibration.stats import DEFAULT_NUM_BINS, TensorStats
from onnxq.errors import CompileError, InputError
from onnxq.inputs import FeedBatches

__all__ = ["FLOAT_TYPES", "collect_stats"]

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


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
    selected, non_float = [], []
    for name, value in candidates.items():
        # Untyped values go to the probe, which reports and skips them.
        if value.dtype is None or value.dtype in FLOAT_TYPES:
            selected.append(value)
        else:
            non_float.append(name)
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
    data: FeedBatches,
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
        data: Batches of model inputs by name, e.g. a `CalibrationData` opened for this
            model (any iterable of feed dicts will do; it is iterated once).
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

    def choose(graph: ir.Graph) -> list[ir.Value]:
        values = _select_values(graph, tensor_names)
        if not values:
            raise InputError("the model has no float tensors to calibrate")
        return values

    probe = runtime.Probe(model, choose, provider=provider)
    stats = {name: TensorStats(num_bins) for name in probe.names}
    samples = 0
    with _progress(getattr(data, "num_samples", None), progress) as update:
        for batch in data:
            outputs = probe.run(batch)
            for name, array in outputs.items():
                _update(stats[name], array, name, probe.sources[name], samples)
            if on_batch is not None:
                on_batch(outputs)
            del outputs
            rows = batch_samples(batch)
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
