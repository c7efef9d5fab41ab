"""Sharded calibration: workers each stream a shard of the data, their statistics merge exactly."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calibration.collect import CalibrationProgress, collect_stats, plan_calibration
from onnxq.calibration.memory import MemoryPlan
from onnxq.calibration.stats import DEFAULT_NUM_BINS, TensorStats, merge_stats
from onnxq.executor import Executor, LocalExecutor
from onnxq.inputs import FeedBatches

__all__ = ["ShardedStats", "collect_stats_sharded", "shard_bounds"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ShardedStats:
    """What a sharded calibration found.

    Attributes:
        stats: Merged statistics by tensor name, as one pass over the data would have them.
        samples: Samples the shards ran (None: not sharded, see the data's count).
        shards: How many shards ran on the executor (0: calibrated in this process).
    """

    stats: dict[str, TensorStats]
    samples: int | None
    shards: int


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every shard task shares besides the model and the data."""

    tensor_names: list[str] | None
    provider: str
    num_bins: int
    plan: MemoryPlan | None


@dataclasses.dataclass
class _ShardResult:
    stats: dict[str, TensorStats]
    samples: int


def shard_bounds(batches: int, shards: int) -> list[tuple[int, int | None]]:
    """Splits ``batches`` batch indices into at most ``shards`` contiguous ranges.

    The ranges have near-equal sizes. The last range is open (``stop`` None): data whose
    samples change shape makes more batches than its sample count implies, and the last
    shard takes them all.
    """
    shards = max(1, min(shards, batches))
    inner = [round(i * batches / shards) for i in range(1, shards)]
    cuts = [0, *sorted(set(inner) - {0, batches})]
    return [(start, stop) for start, stop in zip(cuts, [*cuts[1:], None], strict=True)]


def _collect_shard(
    item: tuple[int, int | None], model_bytes: bytes, data: FeedBatches, job: _Job
) -> _ShardResult:
    """A shard task: streams its batches through the model, returns mergeable statistics."""
    start, stop = item
    model = ir.from_proto(onnx.load_from_string(model_bytes))
    counted = _Counter()
    stats = collect_stats(
        model,
        data,
        job.tensor_names,
        provider=job.provider,
        num_bins=job.num_bins,
        on_batch=counted,
        plan=job.plan,
        shard=(start, stop),
        mergeable=True,
    )
    return _ShardResult(stats, counted.samples)


class _Counter:
    """Counts the samples of the first pass's runs."""

    def __init__(self) -> None:
        self.samples, self.runs = 0, 0

    def __call__(
        self, index: int, feeds: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        if index == self.runs:  # a new run (later passes repeat the same runs)
            self.runs += 1
            self.samples += int(getattr(feeds, "samples", 1))


def collect_stats_sharded(
    model: ir.Model,
    data: FeedBatches,
    executor: Executor,
    tensor_names: list[str] | None = None,
    *,
    provider: str = "cpu",
    progress: CalibrationProgress | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    max_memory: int | None = None,
    on_plan: Callable[[MemoryPlan], None] | None = None,
) -> ShardedStats:
    """`collect_stats` with the data's batches split into one shard per worker.

    Each task streams its shard (one batch at a time: memory does not grow with the
    shard) and returns mergeable statistics; `merge_stats` joins them in the data's
    order, so every range method gives exactly the ranges of one pass. The memory plan is
    made once from the first batch: every shard makes the runs one pass would, each
    within ``max_memory`` (a per-worker budget). The model and the data's description go
    through the executor's object store once; each worker reads its shard itself.

    Data whose sample count is unknown (a callable), or an in-process executor of one
    worker, is calibrated in this process by `collect_stats`; one Ray worker gets the
    data as one shard (the driver may be a laptop attached to a cluster).

    Args:
        model: The model; it is not modified.
        data: A re-iterable source of batches that knows ``num_batches`` (e.g. a
            `onnxq.calibration.data.CalibrationData`); it must pickle.
        executor: Runs the shard tasks.
        tensor_names: See `collect_stats`.
        provider: See `collect_stats`.
        progress: Called as shards finish, with the samples done and the total.
        num_bins: See `collect_stats`.
        max_memory: See `collect_stats`.
        on_plan: See `collect_stats`.

    Raises:
        See `collect_stats`.
    """
    batches = getattr(data, "num_batches", None)
    shards = shard_bounds(batches, executor.workers) if batches else []
    in_process = isinstance(executor, LocalExecutor) and len(shards) <= 1
    if not shards or in_process:
        stats = collect_stats(
            model,
            data,
            tensor_names,
            provider=provider,
            progress=progress,
            num_bins=num_bins,
            max_memory=max_memory,
            on_plan=on_plan,
        )
        return ShardedStats(stats, None, 0)
    plan = None
    if max_memory is not None:
        first = next(iter(data))
        plan = plan_calibration(model, first, tensor_names, max_memory, num_bins=num_bins)
        if on_plan is not None:
            on_plan(plan)
    job = _Job(tensor_names, provider, num_bins, plan)
    total = getattr(data, "num_samples", None)

    def shard_done(count: int, of: int | None) -> None:
        # Shards finish whole: the bar moves by shards, in samples when the total is known.
        if progress is not None:
            progress(round(count / len(shards) * total) if total else count, total)

    logger.info("Calibrating in %d shards on %d workers", len(shards), executor.workers)
    model_bytes = ir.to_proto(model).SerializeToString()
    results = executor.map(
        _collect_shard,
        shards,
        shared=(executor.put(model_bytes), executor.put(data), job),
        progress=shard_done,
    )
    names = dict.fromkeys(name for r in results for name in r.stats)
    stats = {
        name: merge_stats([r.stats[name] for r in results if name in r.stats]) for name in names
    }
    return ShardedStats(stats, sum(r.samples for r in results), len(shards))
