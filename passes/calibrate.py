"""A pass that attaches calibrated quantization ranges to the model's values."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from onnxq.calibration.collect import CalibrationProgress
from onnxq.calibration.memory import MemoryPlan, default_budget
from onnxq.calibration.sharded import collect_stats_sharded
from onnxq.calibration.stats import DEFAULT_NUM_BINS, check_method, compute_range
from onnxq.errors import InputError
from onnxq.executor import Executor, LocalExecutor
from onnxq.inputs import FeedBatches
from onnxq.passes.results import CalibrationResult

__all__ = ["RANGE_KEY", "CalibrateRangesPass", "value_range"]

logger = logging.getLogger(__name__)

# Key in ``ir.Value.meta`` holding a value's calibrated ``(lo, hi)`` as Python floats.
RANGE_KEY = "onnxq.range"


def value_range(value: ir.Value) -> tuple[float, float] | None:
    """Returns the calibrated ``(lo, hi)`` stored on a value, or None."""
    return value.meta.get(RANGE_KEY)


class CalibrateRangesPass(ir.passes.InPlacePass):
    """Computes each float tensor's quantization range and stores it on its IR value.

    The range lands in ``value.meta["onnxq.range"]`` as ``(lo, hi)`` floats with
    ``lo <= 0 <= hi``. Ranges come either from running calibration data through the model
    (streamed statistics, then ``method``) or from preloaded ``ranges`` (e.g. a file read
    with `onnxq.calibration.ranges_file.load_ranges`), which skips running the model.

    The pass reports ``modified=False``: metadata neither changes what the graph computes nor
    is serialized, and a fixed-point pass manager would otherwise re-run calibration.

    The result is a `CalibrationResult`: ``details`` holds ``method``, ``params``,
    ``num_samples`` (None for preloaded ranges) and ``num_tensors`` (values that received a
    range); ``ranges`` the ranges applied, by tensor name; and ``plan`` how the run fit
    the memory budget (batch size, passes over the data).
    """

    def __init__(
        self,
        data: FeedBatches | None = None,
        *,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        method: str = "minmax",
        params: Mapping[str, Any] | None = None,
        tensor_names: list[str] | None = None,
        provider: str = "cpu",
        progress: CalibrationProgress | None = None,
        num_bins: int = DEFAULT_NUM_BINS,
        max_memory: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        """Configures the pass.

        Args:
            data: Feeds to run the model on, one dict per run: e.g. a `CalibrationData`
                opened for the model this pass will run on.
            ranges: Preloaded ``(lo, hi)`` by tensor name, instead of ``data``.
            method: Range method (see `onnxq.calibration.stats.compute_range`).
            params: The method's parameters.
            tensor_names: Tensors to calibrate; default: all float tensors.
            provider: Execution provider used to run the calibration data.
            progress: Called after each calibration batch with the samples done and the
                total (see `onnxq.calibration.collect.collect_stats`).
            num_bins: Histogram bins per tensor.
            max_memory: Bytes calibration may use (see
                `onnxq.calibration.memory`); default: half the available memory, capped.
                With several workers, each worker's budget.
            executor: Runs the data's shards in parallel, one per worker (see
                `onnxq.calibration.sharded`): the ranges are exactly those of one pass.
                Default: one pass in this process.

        Raises:
            InputError: Not exactly one of ``data`` and ``ranges``, or a bad method.
        """
        super().__init__()
        if (data is None) == (ranges is None):
            raise InputError("calibration needs either calibration data or preloaded ranges")
        self.params = dict(params or {})
        check_method(method, self.params)
        self.data = data
        self.preloaded = dict(ranges) if ranges is not None else None
        self.method = method
        self.tensor_names = tensor_names
        self.provider = provider
        self.progress = progress
        self.num_bins = num_bins
        self.max_memory = max_memory
        self.executor = executor or LocalExecutor()

    def __repr__(self) -> str:
        if self.preloaded is not None:
            return f"CalibrateRangesPass(ranges=<{len(self.preloaded)} tensors>)"
        params = f", params={self.params}" if self.params else ""
        return f"CalibrateRangesPass(method={self.method!r}{params}, data={self.data!r})"

    def call(self, model: ir.Model) -> CalibrationResult:
        """Computes (or takes) the ranges and stores them on the model's values."""
        values = _named_values(model.graph)
        shards = 0
        plans: list[MemoryPlan] = []
        if self.preloaded is not None:
            ranges = self._match_preloaded(values)
            num_samples = None
        else:
            assert self.data is not None
            budget = self.max_memory if self.max_memory is not None else default_budget()
            collected = collect_stats_sharded(
                model,
                self.data,
                self.executor,
                self.tensor_names,
                provider=self.provider,
                progress=self.progress,
                # minmax needs no histogram: skipping it halves calibration time.
                num_bins=0 if self.method == "minmax" else self.num_bins,
                max_memory=budget,
                on_plan=plans.append,
            )
            ranges = {
                name: compute_range(s, self.method, **self.params)
                for name, s in collected.stats.items()
            }
            # Only a CalibrationData counts samples; other feeds report None.
            num_samples = collected.samples or getattr(self.data, "samples_read", None)
            shards = collected.shards
        for name, (lo, hi) in ranges.items():
            values[name].meta[RANGE_KEY] = (float(lo), float(hi))
        details = {
            "method": "preloaded" if self.preloaded is not None else self.method,
            "params": dict(self.params),
            "num_samples": num_samples,
            "num_tensors": len(ranges),
        }
        if shards:
            details["shards"] = shards
        logger.info("Calibrated %d tensors (%s)", len(ranges), details["method"])
        return CalibrationResult(
            model,
            modified=False,
            details=details,
            ranges=dict(ranges),
            plan=plans[0] if plans else None,
        )

    def _match_preloaded(self, values: dict[str, ir.Value]) -> dict[str, tuple[float, float]]:
        assert self.preloaded is not None
        unknown = [name for name in self.preloaded if name not in values]
        matched = {n: r for n, r in self.preloaded.items() if n in values}
        if not matched:
            raise InputError(
                f"none of the {len(self.preloaded)} preloaded ranges names a tensor of this "
                "model (were they calibrated for another model?)"
            )
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            logger.warning(
                "%d preloaded range(s) name no tensor of the model: %s", len(unknown), shown
            )
        return matched


def _named_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Values of the main graph by name: inputs, initializers and node outputs."""
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update((name, v) for name, v in graph.initializers.items())
    for node in graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values
