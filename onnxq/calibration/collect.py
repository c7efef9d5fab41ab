"""Runs calibration data through a model and streams every tensor's values into statistics."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from onnxq import runtime
from onnxq.calibration.data import Batch, CalibrationData, batch_samples, split_batches
from onnxq.calibration.memory import MemoryPlan, activation_sizes, format_size, plan_memory
from onnxq.calibration.stats import DEFAULT_NUM_BINS, TensorStats
from onnxq.errors import CompileError, InputError
from onnxq.inputs import FeedBatches, input_specs

__all__ = ["FLOAT_TYPES", "CalibrationProgress", "collect_stats", "plan_calibration"]

# Called after each calibration batch with the samples done and the total (None: unknown).
CalibrationProgress = Callable[[int, int | None], None]

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


def collect_stats(
    model: ir.Model,
    data: FeedBatches,
    tensor_names: list[str] | None = None,
    *,
    provider: str = "cpu",
    progress: CalibrationProgress | bool | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    on_batch: Callable[[int, Mapping[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
    max_memory: int | None = None,
    on_plan: Callable[[MemoryPlan], None] | None = None,
    plan: MemoryPlan | None = None,
    shard: tuple[int, int | None] | None = None,
    mergeable: bool = False,
) -> dict[str, TensorStats]:
    """Runs the calibration data through the model and collects per-tensor statistics.

    A copy of the model exposes the chosen tensors as outputs and runs in an ONNX Runtime
    session with graph optimizations off, so that every name still exists. Each batch's
    outputs are folded into the statistics and dropped: memory does not grow with the
    number of samples.

    ONNX Runtime holds every exposed tensor of a run at once, which for large activations
    (e.g. 1024x1024 segmentation) exceeds the RAM. With ``max_memory``, the batch size and
    the tensors exposed per pass follow a `MemoryPlan` sized from the first batch's
    activation shapes: batches are split to fewer samples, and when even one sample's
    tensors do not fit, the data is read several times, each pass observing a subset. Each
    tensor's statistics then see the same batches in the same order as in one pass, so the
    ranges are the same.

    Args:
        model: The model; it is not modified.
        data: Batches of model inputs by name, e.g. a `CalibrationData` opened for this
            model (any iterable of feed dicts will do; it is iterated once per pass, so a
            plan of several passes needs a re-iterable one).
        tensor_names: Tensors to calibrate; by default every float tensor computed by a
            node of the main graph, and the float graph inputs.
        provider: Execution provider short name (``cpu``, ``cuda``).
        progress: Called after each batch with the samples done so far and the total
            (``None`` when the data cannot tell), counting every pass over the data, e.g.
            to draw a progress bar; ``True``: a plain counter on stderr.
        num_bins: Histogram bins per tensor.
        on_batch: Called as ``on_batch(index, feeds, tensors)`` for each run: its index in
            the pass, its inputs and its tensors by name (before they are dropped), e.g. to
            keep the model's outputs for a later comparison. With several passes it is
            called in each, with the same runs and that pass's tensors.
        max_memory: Bytes calibration may use (see `onnxq.calibration.memory`); None: one
            pass over the data's batches as they come.
        on_plan: Called with the plan, when there is a budget.
        plan: Run by this plan (e.g. the one `plan_calibration` made for every shard of a
            sharded run) instead of planning from ``max_memory``.
        shard: Run only the data's batches ``start`` to ``stop - 1`` (``stop`` None: to
            the end); the batches before are read and skipped. Samples in messages count
            from the data's start.
        mergeable: Statistics that `onnxq.calibration.stats.merge_stats` can merge.

    Returns:
        Statistics by tensor name (none for a shard past the data's end).

    Raises:
        InputError: A requested tensor is not in the model, the budget is too small for one
            tensor of one sample, or a plan of several passes meets data readable once.
        CompileError: An activation holds NaN or Inf for the calibration data.
    """

    def choose(graph: ir.Graph) -> list[ir.Value]:
        values = _select_values(graph, tensor_names)
        if not values:
            raise InputError("the model has no float tensors to calibrate")
        return values

    skipped = [0]  # samples before the shard, for messages
    batches = _select(data, shard, skipped)
    first = next(batches, None)
    if first is None:
        if shard is not None:
            return {}
        raise InputError("calibration data has no samples")
    groups: list[frozenset[str] | None] = [None]
    batch_size = None
    if plan is None and max_memory is not None:
        # Data that keeps its samples in memory (`CalibrationData.hold`) spends that much.
        resident = getattr(data, "resident_bytes", 0)
        plan = _plan(model, first, choose, max_memory, num_bins, resident)
    if plan is not None:
        if plan.passes > 1 and batches is data:
            raise InputError(
                f"the memory budget needs {plan.passes} passes over the calibration data, "
                "which can be read only once (an iterator); pass a re-iterable source or "
                "a larger memory budget"
            )
        groups, batch_size = [frozenset(g) for g in plan.groups], plan.batch_size
        if on_plan is not None:
            on_plan(plan)
    if isinstance(progress, bool):
        progress = _count_on_stderr if progress else None
    stats: dict[str, TensorStats] = {}
    samples = 0
    total = getattr(data, "num_samples", None)
    total = total and total * len(groups)
    done = 0
    for index, group in enumerate(groups):
        source = itertools.chain([first], batches) if index == 0 else _select(data, shard, [0])
        probe = runtime.Probe(model, _within(choose, group), provider=provider)
        if not probe.names:
            continue  # every tensor of this group is untyped: the probe skipped them all
        stats.update((name, TensorStats(num_bins, mergeable=mergeable)) for name in probe.names)
        samples = skipped[0]
        for run, batch in enumerate(split_batches(source, batch_size)):
            outputs = probe.run(batch)
            for name, array in outputs.items():
                _update(stats[name], array, name, probe.sources[name], samples)
            if on_batch is not None:
                on_batch(run, batch, outputs)
            del outputs
            rows = batch_samples(batch)
            samples += rows
            done += rows
            logger.debug("calibration: %d/%s samples", done, total or "?")
            if progress is not None:
                progress(done, total)
        # One session at a time: each holds its own copy of the weights.
        del probe
    if progress is _count_on_stderr:
        sys.stderr.write("\n")
    logger.info(
        "Collected statistics of %d tensors over %d samples", len(stats), samples - skipped[0]
    )
    return stats


def plan_calibration(
    model: ir.Model,
    first: Mapping[str, np.ndarray],
    tensor_names: list[str] | None,
    max_memory: int,
    *,
    num_bins: int = DEFAULT_NUM_BINS,
) -> MemoryPlan:
    """The `MemoryPlan` `collect_stats` makes from the data's first batch.

    A sharded run makes it once, so that every shard makes the same runs as one pass.
    """
    return _plan(model, first, lambda g: _select_values(g, tensor_names), max_memory, num_bins)


def _select(
    data: FeedBatches, shard: tuple[int, int | None] | None, skipped: list[int]
) -> Iterator[Mapping[str, np.ndarray]]:
    """The data's batches, or a shard's: ``skipped[0]`` counts the samples before it."""
    if shard is None:
        return iter(data)
    start, stop = shard
    # CalibrationData reads only the shard's samples when its source can (see `batches`).
    source = data.batches(start, stop) if isinstance(data, CalibrationData) else iter(data)
    first = start if isinstance(data, CalibrationData) else 0

    def batches() -> Iterator[Mapping[str, np.ndarray]]:
        for index, batch in enumerate(source, start=first):
            if stop is not None and index >= stop:
                return
            if index < start:
                skipped[0] += batch_samples(batch)
                continue
            if index == start and getattr(batch, "first", None) is not None:
                skipped[0] = batch.first
            yield batch

    return batches()


def _count_on_stderr(done: int, total: int | None) -> None:
    """The ``progress=True`` display: a sample counter redrawn in place."""
    of = "" if total is None else f"/{total}"
    sys.stderr.write(f"\rcalibrating: {done}{of} samples")
    sys.stderr.flush()


def _within(
    choose: Callable[[ir.Graph], list[ir.Value]], group: frozenset[str] | None
) -> Callable[[ir.Graph], list[ir.Value]]:
    """Narrows a value chooser to one pass's group of names (None: all of them)."""
    if group is None:
        return choose
    return lambda graph: [v for v in choose(graph) if v.name in group]


def _plan(
    model: ir.Model,
    first: Mapping[str, np.ndarray],
    choose: Callable[[ir.Graph], list[ir.Value]],
    budget: int,
    num_bins: int,
    resident: int = 0,
) -> MemoryPlan:
    """Plans batch size and passes from the activation sizes the first batch implies.

    ``resident``: bytes the data itself holds in memory (its samples, when held).
    """
    rows = batch_samples(first)
    names = [v.name for v in choose(model.graph)]
    sizes = activation_sizes(model, names, first, rows)
    weights = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value)
    # Statistics hold a histogram per tensor; the data's batch stays alive while split.
    held = sum(np.asarray(a).nbytes for a in first.values()) + len(names) * 8 * num_bins
    # Static batch dims cannot take fewer samples than the data's batch.
    static = any(isinstance(s.shape[0], int) for s in input_specs(model) if s.shape)
    plan = plan_memory(
        sizes,
        budget,
        max_batch=rows,
        min_batch=rows if static or not isinstance(first, Batch) else 1,
        fixed=weights + held + resident,
        # ORT's live tensors besides the observed ones; histograms add ~4 temporaries
        # (scaled, floored, int64 bin indices) of the tensor being binned.
        workspace=3.0 + (4.0 if num_bins else 0.0),
    )
    logger.info(
        "Calibration memory plan: batch size %d, %d pass(es) over the data, estimated peak "
        "%s of a %s budget (largest tensor %s per sample)",
        plan.batch_size,
        plan.passes,
        format_size(plan.estimated_peak),
        format_size(budget),
        format_size(max(sizes.values(), default=0)),
    )
    return plan


def _update(stats: TensorStats, array: np.ndarray, name: str, producer: str, first: int) -> None:
    stats.update(array)
    if stats.nan_count or stats.inf_count:
        what = "NaN" if stats.nan_count else "Inf"
        raise CompileError(
            f"tensor '{name}' (output of {producer}) has {what} values for the calibration "
            f"batch starting at sample {first}; the model computes invalid values on this data"
        )
