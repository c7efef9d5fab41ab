"""Accuracy-aware mixed precision: the fewest fp32 islands that make int8 meet its criteria.

Units. The search decides per *quantized range* (a scale group: one activation tensor,
the tensors that share its scale through data-movement ops, and every int8 node that
touches it). Keeping a single node fp32 does not remove a bad range: its producer still
quantizes its output for the other consumers. Keeping the group's nodes fp32 does.
`QDQResult.scale_groups` (from `InsertQDQPass`) gives the groups.

Method, and why:

1. Check all-int8 end to end. Most models pass; then nothing else runs.
2. Rank the units. When one trial per unit fits in half the budget, end to end: each
   unit kept fp32 alone (the rest int8), ranked by what that gains on the criteria
   (worst agreement, then worst SQNR); this sees how much a range's noise is amplified
   downstream, e.g. a classifier's pooled features. Otherwise by a cheap local measure:
   the SQNR of rounding each range's fp32 values to its int8 grid, per channel and
   averaged, on the first tuning batch (one fp32 run with the tensors exposed). Outlier-
   stretched ranges, the usual cause of a failed int8 model, rank first; per channel
   because an outlier channel hides the damage it does to the others from a whole-tensor
   SQNR. (A ResNet-50 has ~70 units: one compile-and-run each is often more than the
   budget.) Ties keep the local order.
3. Decide end to end, on the deployed model (ONNX Runtime's full optimisation, this CPU,
   the same runs the final check uses): keep the worst 1, 2, 4, ... units fp32 until the
   criteria hold, then bisect for the shortest passing prefix. When the budget affords
   fewer trials than doubling from 1 needs (a detector with 300 ranges and 20 s trials),
   doubling starts higher, so that it still reaches every unit.
4. Minimise: try returning each kept unit to int8 (least locally damaged first) and keep
   it int8 when the criteria still hold with a margin (`FidelityResult.comfortable`):
   tuned to just pass on the check samples, a ViT heatmap's IoU missed on other images.
   What stays fp32 is an island, reported with its local cost (dB) and its measured
   gain: the final placement's worst SQNR and agreement against the same placement with
   that island returned to int8.

Bounded, and deterministic: the search makes at most ``max_trials`` end-to-end checks
(``--tune-trials``), and every decision (rank end to end or locally, where doubling starts,
how far minimising goes) is taken from that count, never from the clock, so the same
model and data give the same placement on a busy machine as on an idle one. The time
bound (``budget_s``, ``--tune-budget``) is a safety net on top: a trial that would start
past it is not started, and the placement then says that time, not the trial count,
stopped the search (``stopped_by``). Stopping early keeps the best passing placement
found; with none, the outcome is fp32 with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq import runtime
from onnxq.config import CompileConfig
from onnxq.executor import Executor
from onnxq.fidelity import FidelityCriteria, FidelityResult, load_metric, measure, plan_views
from onnxq.numerics import Numerics, numerics_for
from onnxq.passes.calibrate import RANGE_KEY
from onnxq.passes.fuse import ACTIVATION_KEY, UNIT_KEY, MarkFusedUnitsPass
from onnxq.passes.layernorm import PreventSkipLayerNormFusionPass, without_skip_layernorm
from onnxq.passes.qdq import InsertQDQPass, QuantParams
from onnxq.passes.results import QDQResult

__all__ = [
    "DEFAULT_TUNE_BUDGET_S",
    "DEFAULT_TUNE_TRIALS",
    "QDQ_DETAILS_KEY",
    "Island",
    "Placement",
    "PrecisionSearch",
    "Trial",
    "Unit",
    "choose_precision",
    "criteria_from",
    "tune_precision",
]

logger = logging.getLogger(__name__)

DEFAULT_TUNE_BUDGET_S = 600.0
# Enough to rank a model of up to 16 ranges end to end and then bisect it, or to double
# and bisect ~300 ranges and minimise the result.
DEFAULT_TUNE_TRIALS = 32

Progress = Callable[[str], None]
# Builds and checks several keep-fp32 maps at once: each one's checks and seconds.
EvaluateMany = Callable[[Sequence[Mapping[str, str]]], list[tuple[FidelityResult, float]]]
# Key in an int8 model's ``meta``: what InsertQDQPass reported for it (for the report).
QDQ_DETAILS_KEY = "onnxq.qdq_details"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One quantized range and the int8 nodes that keep it.

    Attributes:
        name: The tensor whose calibrated range sets the group's scale.
        nodes: The int8 nodes kept fp32 to take this range out of the model.
        local_sqnr_db: SQNR of rounding the tensor's fp32 values to its int8 grid.
    """

    name: str
    nodes: tuple[str, ...]
    local_sqnr_db: float


@dataclasses.dataclass(frozen=True)
class Trial:
    """One end-to-end check of a placement."""

    phase: str
    fp32_units: tuple[str, ...]
    passed: bool
    min_sqnr_db: float
    min_agreement: float
    seconds: float
    summary: str


@dataclasses.dataclass(frozen=True)
class Island:
    """A unit kept fp32 in the final placement.

    Attributes:
        unit: The range's tensor name.
        nodes: Its nodes (kept fp32).
        cost_db: Local SQNR of its int8 rounding (how badly int8 fits it).
        gain_sqnr_db: Worst-output SQNR gained by keeping it fp32 (None: not measured
            within the budget).
        gain_agreement_points: Worst agreement (top-1 / IoU) gained, in points.
    """

    unit: str
    nodes: tuple[str, ...]
    cost_db: float
    gain_sqnr_db: float | None = None
    gain_agreement_points: float | None = None


@dataclasses.dataclass
class Placement:
    """What the search decided.

    Attributes:
        status: ``int8`` (all units int8), ``mixed`` (islands kept fp32) or ``fp32``
            (no placement met the criteria: ship fp32).
        keep_fp32: Node -> reason, for `InsertQDQPass`'s ``keep_fp32``.
        islands: The fp32 islands, worst local cost first.
        fidelity: The chosen placement's checks (the last failing ones for ``fp32``).
        model: The chosen int8 model (None for ``fp32``).
        reason: Why fp32, for ``fp32``.
        trials: Every end-to-end check, in order.
        units: Number of units the search could keep fp32.
        budget_s: The time bound applied.
        seconds: Time the search took.
        max_trials: The trial bound applied.
        stopped_by: What ended the search before it finished: ``trials`` (the count,
            deterministic), ``time`` (the clock: another run may place differently), or
            None (it finished).
    """

    status: str
    keep_fp32: dict[str, str]
    islands: list[Island]
    fidelity: FidelityResult | None
    model: ir.Model | None
    reason: str | None = None
    trials: list[Trial] = dataclasses.field(default_factory=list)
    units: int = 0
    budget_s: float = 0.0
    seconds: float = 0.0
    max_trials: int = 0
    stopped_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report section (no model)."""
        return {
            "status": self.status,
            "reason": self.reason,
            "units": self.units,
            "fp32_islands": [dataclasses.asdict(i) for i in self.islands],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "trials": [dataclasses.asdict(t) for t in self.trials],
            "budget_s": round(self.budget_s, 1),
            "seconds": round(self.seconds, 2),
            "max_trials": self.max_trials,
            "stopped_by": self.stopped_by,
        }


def _reason(unit: Unit) -> str:
    return f"kept fp32 for accuracy: its int8 range costs {unit.local_sqnr_db:.1f} dB locally"


class PrecisionSearch:
    """Finds the fewest units to keep fp32 so a candidate meets its fidelity criteria.

    Args:
        build: ``build(keep_fp32)`` -> the int8 model with those nodes kept fp32.
        evaluate: Checks a built model end to end.
        units: The units, in any order (ranked here, worst local SQNR first), or a
            function making them: called only once all-int8 failed, so a model that
            passes pays for one trial and no ranking.
        budget_s: No trial starts after this many seconds (a safety net: see the
            module docstring).
        max_trials: At most this many end-to-end checks (all-int8 included).
        progress: Called with one line per trial.
        is_int8: Whether a built model still runs anything in int8 (keeping one range
            fp32 can leave its neighbours isolated, and nothing int8 at all).
        clock: Seconds, for tests.
        evaluate_many: Builds and checks several placements (keep-fp32 maps) at once, e.g.
            on an executor's workers, returning each one's checks and seconds. The
            independent trials (ranking, gains) then run ``width`` at a time; results the
            sequential search would not have asked for are dropped, so the placement and
            the trials are the sequential search's.
        width: How many trials ``evaluate_many`` runs at once.
    """

    def __init__(
        self,
        build: Callable[[Mapping[str, str]], ir.Model],
        evaluate: Callable[[ir.Model], FidelityResult],
        units: Sequence[Unit] | Callable[[], Sequence[Unit]],
        *,
        budget_s: float = DEFAULT_TUNE_BUDGET_S,
        max_trials: int = DEFAULT_TUNE_TRIALS,
        progress: Progress | None = None,
        is_int8: Callable[[ir.Model], bool] = lambda model: True,
        clock: Callable[[], float] = time.monotonic,
        evaluate_many: EvaluateMany | None = None,
        width: int = 1,
    ):
        self.build = build
        self.is_int8 = is_int8
        self.evaluate = evaluate
        self._make_units = units if callable(units) else lambda: units
        self.units: list[Unit] = []
        self.budget_s = budget_s
        self.max_trials = max_trials
        self.stopped_by: str | None = None
        self.progress = progress
        self.clock = clock
        self.trials: list[Trial] = []
        self._start = 0.0
        self._last_trial_s = 0.0
        # Every trial's checks; built models are large, so only the latest passing one.
        self._results: dict[frozenset[str], FidelityResult] = {}
        self._models: dict[frozenset[str], ir.Model] = {}
        self.evaluate_many = evaluate_many
        self.width = width if evaluate_many is not None else 1
        # Results of trials run ahead, by placement, for `_try` to take in its order.
        self._ahead: dict[frozenset[str], tuple[FidelityResult, float]] = {}

    # ------------------------------------------------------------------ trials

    def _time_left(self) -> bool:
        """Whether one more trial may start (records what stopped the search if not)."""
        if len(self.trials) >= self.max_trials:
            self.stopped_by = self.stopped_by or "trials"
            return False
        spent = self.clock() - self._start
        if spent + self._last_trial_s > self.budget_s:
            self.stopped_by = self.stopped_by or "time"
            return False
        return True

    def _affordable(self) -> int:
        """Trials left: by count, and by the clock only when it binds first."""
        left = self.max_trials - len(self.trials)
        if self._last_trial_s > 0 and math.isfinite(self.budget_s):
            by_time = int((self.budget_s - (self.clock() - self._start)) // self._last_trial_s)
            left = min(left, by_time)
        return max(0, left)

    def _try(self, phase: str, chosen: Sequence[Unit]) -> FidelityResult:
        key = frozenset(u.name for u in chosen)
        if key in self._results:
            return self._results[key]
        model = None
        if key in self._ahead:
            result, seconds = self._ahead.pop(key)
        else:
            start = self.clock()
            model = self.build(_keep_map(chosen))
            result = self.evaluate(model)
            seconds = self.clock() - start
        self._last_trial_s = seconds
        self._results[key] = result
        if result.passed:  # the latest passing model is the one shipped: keep only it
            self._models = {key: model} if model is not None else {}
        trial = Trial(
            phase,
            tuple(sorted(key)),
            result.passed,
            result.min_sqnr_db,
            result.min_agreement,
            round(seconds, 3),
            result.summary(),
        )
        self.trials.append(trial)
        line = f"{phase}: {len(chosen)} fp32 unit(s) -> {trial.summary} ({seconds:.1f}s)"
        logger.info("mixed precision %s", line)
        # A model that passes all-int8 has no search to follow: nothing to show.
        if self.progress is not None and (self.trials[1:] or not result.passed):
            self.progress(line)
        return result

    def _run_ahead(self, candidates: Sequence[Sequence[Unit]]) -> None:
        """Runs the next independent trials at once, as many as the trial bound allows.

        `_try` takes their results when the search asks for them, in its own order;
        the rest are dropped at the next call, so they decide nothing.
        """
        self._ahead = {}
        if self.evaluate_many is None or self.width <= 1:
            return
        todo = [c for c in candidates if frozenset(u.name for u in c) not in self._results]
        todo = todo[: min(self.width, self._affordable())]
        if len(todo) > 1:
            outcomes = self.evaluate_many([_keep_map(c) for c in todo])
            self._ahead = {
                frozenset(u.name for u in c): o for c, o in zip(todo, outcomes, strict=True)
            }

    def _model(self, units: Sequence[Unit]) -> ir.Model:
        """The model built for ``units`` (kept when it was the latest to pass; else rebuilt)."""
        key = frozenset(u.name for u in units)
        if key not in self._models:
            self._models = {key: self.build(_keep_map(units))}
        return self._models[key]

    # ------------------------------------------------------------------ search

    def run(self) -> Placement:
        """Runs the search (see the module docstring) and returns the placement."""
        self._start = self.clock()
        first = self._try("all int8", [])
        if first.passed:
            return self._placement("int8", [], None)
        if not self._time_left():  # e.g. --tune-budget 0: not even worth ranking
            return self._placement("fp32", None, self._no_placement_reason(first))
        self.units = sorted(self._make_units(), key=lambda u: (u.local_sqnr_db, u.name))
        if not self.units:
            return self._placement("fp32", None, "no quantized unit can be kept fp32")
        if 2 * len(self.units) <= self._affordable():
            self._rank_end_to_end()
        prefix = self._shortest_prefix()
        if prefix is None:
            return self._placement("fp32", None, self._no_placement_reason(first))
        only_fp32 = (
            "int8 meets the fidelity criteria only with every quantized layer fp32 (all "
            f"int8: {first.summary()})"
        )
        if prefix == len(self.units):
            return self._placement("fp32", None, only_fp32)
        kept = self._minimise(self.units[:prefix])
        if not self.is_int8(self._model(kept)):
            return self._placement("fp32", None, only_fp32)
        return self._placement("mixed", kept, None, self._gains(kept))

    def _rank_end_to_end(self) -> None:
        """Orders the units by what keeping each fp32 alone gains (stable: local order).

        Stops at the first unit whose trial passes: it is the whole answer.
        """
        gained = {}
        for index, unit in enumerate(self.units):
            if index % self.width == 0:
                self._run_ahead([[u] for u in self.units[index : index + self.width]])
            if not self._time_left():
                self._ahead = {}
                return  # keep the local order
            result = self._try("rank", [unit])
            gained[unit.name] = (result.passed, result.min_agreement, result.min_sqnr_db)
            if result.passed:
                break  # one island is the fewest there can be: no need to rank the rest
        self._ahead = {}
        lowest = (False, -math.inf, -math.inf)
        self.units.sort(key=lambda u: gained.get(u.name, lowest), reverse=True)

    def _shortest_prefix(self) -> int | None:
        """Smallest k whose worst-k units fp32 pass (doubling, then bisection)."""
        failed, passed = 0, None
        k = self._first_k()
        while passed is None and self._time_left():
            k = min(k, len(self.units))
            if k == len(self.units):
                passed = k  # every unit fp32: the fp32 model itself
                break
            if self._try("grow", self.units[:k]).passed:
                passed = k
            else:
                failed, k = k, 2 * k
        if passed is None:
            return None
        while passed - failed > 1 and self._time_left():
            mid = (failed + passed) // 2
            if self._try("bisect", self.units[:mid]).passed:
                passed = mid
            else:
                failed = mid
        return passed

    def _first_k(self) -> int:
        """Where doubling starts: 1, unless the budget affords too few trials for that.

        Doubling from 1 to every unit takes log2(units) trials; with fewer affordable
        (two are left for bisection), it starts high enough to still reach every unit.
        """
        doublings = max(1, self._affordable() - 2)
        return max(1, math.ceil(len(self.units) / 2**doublings))

    def _minimise(self, chosen: list[Unit]) -> list[Unit]:
        """Returns units to int8, least locally damaged first, while the criteria hold."""
        kept = list(chosen)
        for unit in sorted(chosen, key=lambda u: -u.local_sqnr_db):
            if not self._time_left():
                break
            without = [u for u in kept if u is not unit]
            if self._try("minimise", without).comfortable:
                kept = without
        return kept

    def _gains(self, kept: list[Unit]) -> dict[str, tuple[float, float]]:
        """What each island gains: the final placement against it returned to int8.

        Mostly cached from minimising (the last tries of each island); the rest costs one
        trial per island, while the budget lasts.
        """
        final = self._try("gain", kept)
        gains = {}
        for index, unit in enumerate(kept):
            if index % self.width == 0:
                self._run_ahead(
                    [[u for u in kept if u is not k] for k in kept[index : index + self.width]]
                )
            without = [u for u in kept if u is not unit]
            if frozenset(u.name for u in without) not in self._results and not self._time_left():
                continue
            result = self._try("gain", without)
            gains[unit.name] = (
                final.min_sqnr_db - result.min_sqnr_db,
                100.0 * (final.min_agreement - result.min_agreement),
            )
        self._ahead = {}
        return gains

    def _no_placement_reason(self, first: FidelityResult) -> str:
        bound = (
            f"the {self.max_trials}-trial bound (--tune-trials)"
            if self.stopped_by == "trials"
            else f"the {self.budget_s:.0f} s tuning budget (--tune-budget)"
        )
        return (
            f"no int8 placement met the fidelity criteria within {bound} after "
            f"{len(self.trials)} trial(s); all int8: {first.summary()}"
        )

    def _placement(
        self,
        status: str,
        kept: list[Unit] | None,
        reason: str | None,
        gains: Mapping[str, tuple[float, float]] | None = None,
    ) -> Placement:
        gains = gains or {}
        if kept is None:  # fp32: report the last failing checks
            result, model = self._results[frozenset()], None
            islands: list[Island] = []
            logger.warning("mixed precision: keeping fp32: %s", reason)
        else:
            result, model = self._results[frozenset(u.name for u in kept)], self._model(kept)
            islands = [
                Island(u.name, u.nodes, u.local_sqnr_db, *_rounded(gains.get(u.name))) for u in kept
            ]
        seconds = self.clock() - self._start
        return Placement(
            status,
            _keep_map(kept or []),
            islands,
            result,
            model,
            reason,
            self.trials,
            len(self.units),
            self.budget_s,
            seconds,
            self.max_trials,
            self.stopped_by,
        )


def _rounded(gain: tuple[float, float] | None) -> tuple[float | None, float | None]:
    if gain is None:
        return None, None
    return tuple(round(g, 2) if math.isfinite(g) else g for g in gain)  # type: ignore[return-value]


def _keep_map(units: Sequence[Unit]) -> dict[str, str]:
    keep: dict[str, str] = {}
    for unit in units:
        for node in unit.nodes:
            keep.setdefault(node, _reason(unit))
    return keep


# ---------------------------------------------------------------------------- wiring


def quantize_clone(
    calibrated: ir.Model,
    numerics: Numerics,
    keep_fp32: Mapping[str, str] | None = None,
    *,
    exclude: Sequence[str] = (),
    op_types: Sequence[str] = (),
    prevent_skip_layernorm: bool = False,
) -> tuple[ir.Model, QDQResult]:
    """An int8 copy of a calibrated fp32 model, and what QDQ insertion did to it.

    The calibrated model is left as it is.

    The ranges travel with the clone (value metadata), so nothing is recalibrated. Fused
    unit marks are made again: the activation mark refers to a node of the original.
    ``prevent_skip_layernorm`` (ONNX Runtime's CPU provider): the residual Adds left fp32
    before a LayerNormalization become Sum (`PreventSkipLayerNormFusionPass`), as in the
    fp32 model the int8 one is timed against; quantized Adds feed a QuantizeLinear and stay.
    """
    model = calibrated.clone()
    for node in model.graph:
        node.meta.pop(UNIT_KEY, None)
        node.meta.pop(ACTIVATION_KEY, None)
    MarkFusedUnitsPass()(model)
    qdq = InsertQDQPass(numerics, exclude=exclude, op_types=op_types, keep_fp32=keep_fp32)(model)
    for p in (
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
        common_passes.NameFixPass(),
        *([PreventSkipLayerNormFusionPass()] if prevent_skip_layernorm else []),
    ):
        p(model)
    model.meta[QDQ_DETAILS_KEY] = dict(qdq.details)
    return model, qdq


def run_model(
    model: ir.Model, batches: Sequence[Mapping[str, np.ndarray]], provider: str = "cpu"
) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` as deployed (full optimisation), one dict per batch."""
    session = runtime.create_session(model, provider=provider, optimization="all")
    return [runtime.run(session, batch) for batch in batches]


def local_sqnr(
    calibrated: ir.Model,
    names: Sequence[str],
    numerics: Numerics,
    batch: Mapping[str, np.ndarray],
    provider: str = "cpu",
) -> dict[str, float]:
    """Local cost of each named tensor: its fp32 values rounded to its calibrated int8 grid.

    Returns ``{name: dB}`` (see `_channel_mean_sqnr`; inf for tensors without a range).
    """
    values = {v.name: v for node in calibrated.graph for v in node.outputs if v.name}
    inputs = {v.name for v in calibrated.graph.inputs}
    wanted = {n for n in names if n in values}
    arrays = {n: a for n, a in batch.items() if n in inputs}
    if wanted:  # (a Probe of nothing would return every output)
        probe = runtime.Probe(
            calibrated,
            lambda graph: [v for node in graph for v in node.outputs if v.name in wanted],
            provider=provider,
        )
        arrays.update(probe.run(batch))
    values.update({v.name: v for v in calibrated.graph.inputs if v.name})
    result = {}
    for name in names:
        value = values.get(name)
        if value is None or name not in arrays or RANGE_KEY not in value.meta:
            result[name] = math.inf
            continue
        qp = QuantParams.from_range(*value.meta[RANGE_KEY], numerics.activation_dtype)
        result[name] = _channel_mean_sqnr(np.asarray(arrays[name], np.float64), qp)
    return result


def _channel_mean_sqnr(x: np.ndarray, qp: QuantParams) -> float:
    """Mean over channels of each channel's rounding SQNR (dB, clipped to [-10, 60]).

    Per channel, because one outlier channel stretches a per-tensor range until the other
    channels round to zero, while the tensor's SQNR, dominated by the outlier's energy,
    still looks fine. Channels: axis 1 of rank >= 4 (NCHW), else the last axis.
    """
    info = np.iinfo(qp.dtype)
    q = np.clip(np.round(x / qp.scale) + qp.zero_point, info.min, info.max)
    noise = (x - (q - qp.zero_point) * qp.scale) ** 2
    if x.ndim == 0:
        x, noise = x.reshape(1, 1), noise.reshape(1, 1)
    axis = 1 if x.ndim >= 4 else x.ndim - 1
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    signal = np.sum(x * x, axis=reduce)
    noise_sum = np.sum(noise, axis=reduce)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10 * np.log10(signal / noise_sum)
    db = np.where(noise_sum == 0, 60.0, np.where(signal == 0, -10.0, db))
    return float(np.mean(np.clip(db, -10.0, 60.0)))


def tune_precision(
    calibrated: ir.Model,
    numerics: Numerics,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    criteria: FidelityCriteria | None = None,
    budget_s: float = DEFAULT_TUNE_BUDGET_S,
    max_trials: int = DEFAULT_TUNE_TRIALS,
    exclude: Sequence[str] = (),
    op_types: Sequence[str] = (),
    provider: str = "cpu",
    progress: Progress | None = None,
    int8: QDQResult | None = None,
    fp32: ir.Model | None = None,
    executor: Executor | None = None,
    prevent_skip_layernorm: bool = False,
) -> Placement:
    """Quantizes a calibrated fp32 model, keeping fp32 the fewest units the criteria need.

    Args:
        calibrated: The fp32 model with ranges (after `CalibrateRangesPass`); unchanged.
        numerics: Integer formats of the target.
        batches: The tuning inputs, one dict per run (the final check's runs).
        criteria: The fidelity criteria (default: `FidelityCriteria()`).
        budget_s: Upper bound on the search time, in seconds.
        max_trials: Upper bound on the search's end-to-end checks.
        exclude: Node-name patterns the user keeps fp32 (as ``--exclude``).
        op_types: Only these op types are quantized (as ``--op-types``).
        provider: Execution provider for the runs.
        progress: Called with one line per trial.
        int8: The all-int8 model already quantized from ``calibrated`` with these
            settings (the compile pipeline's): checked first and shipped when it passes.
        fp32: The model whose outputs count as right (default ``calibrated``): the
            compile passes the model as the user gave it, so that what cleanup and
            fusion change is held to the same criteria.
        executor: Runs the independent trials (ranking, gains) on its workers; the
            placement is the one the sequential search finds (default: this process).
        prevent_skip_layernorm: Every candidate as `quantize_clone` writes it for ONNX
            Runtime's CPU provider (fp32 residual Adds before LayerNormalization as Sum),
            ``int8`` included: what is checked is what ships.

    Returns:
        The placement; its ``model`` is the int8 model to ship (None: ship fp32).
    """
    criteria = criteria or FidelityCriteria()
    views = plan_views(calibrated)
    reference = run_model(fp32 if fp32 is not None else calibrated, batches, provider)

    def clone(keep: Mapping[str, str] | None = None) -> tuple[ir.Model, QDQResult]:
        return quantize_clone(
            calibrated,
            numerics,
            keep,
            exclude=exclude,
            op_types=op_types,
            prevent_skip_layernorm=prevent_skip_layernorm,
        )

    if int8 is None:
        base, qdq = clone()
    else:
        base, qdq = int8.model, int8
        if prevent_skip_layernorm:
            base = without_skip_layernorm(base)
        base.meta[QDQ_DETAILS_KEY] = dict(int8.details)

    def build(keep: Mapping[str, str]) -> ir.Model:
        if not keep:
            return base
        return clone(keep)[0]

    def evaluate(model: ir.Model) -> FidelityResult:
        return measure(reference, run_model(model, batches, provider), views, criteria)

    groups = qdq.scale_groups

    def units() -> list[Unit]:
        local = local_sqnr(calibrated, list(groups), numerics, batches[0], provider)
        return [Unit(name, tuple(nodes), local[name]) for name, nodes in groups.items()]

    evaluate_many = None
    if executor is not None and executor.workers > 1:
        context = executor.put(
            _TrialContext(
                ir.to_proto(calibrated).SerializeToString(),
                {v.name: v.meta[RANGE_KEY] for v in _values(calibrated) if RANGE_KEY in v.meta},
                numerics,
                tuple(exclude),
                tuple(op_types),
                list(batches),
                reference,
                views,
                criteria,
                provider,
                prevent_skip_layernorm,
            )
        )

        def evaluate_many(keeps: Sequence[Mapping[str, str]]) -> list[tuple[FidelityResult, float]]:
            return executor.map(_run_trial, [dict(k) for k in keeps], shared=(context,))

    search = PrecisionSearch(
        build,
        evaluate,
        units,
        budget_s=budget_s,
        max_trials=max_trials,
        progress=progress,
        is_int8=_has_int8,
        evaluate_many=evaluate_many,
        width=executor.workers if evaluate_many is not None else 1,
    )
    placement = search.run()
    if placement.status == "mixed":
        logger.info(
            "mixed precision: %d of %d units kept fp32: %s",
            len(placement.islands),
            placement.units,
            ", ".join(i.unit for i in placement.islands),
        )
    return placement


@dataclasses.dataclass
class _TrialContext:
    """What a trial on a worker needs, sent once through the executor.

    The calibrated model travels as bytes, its ranges apart (value metadata is not
    serialized); then the quantization settings, and the tuning runs with their fp32
    outputs.
    """

    model: bytes
    ranges: dict[str, tuple[float, float]]
    numerics: Numerics
    exclude: tuple[str, ...]
    op_types: tuple[str, ...]
    batches: list[Mapping[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]
    views: Any
    criteria: FidelityCriteria
    provider: str
    prevent_skip_layernorm: bool = False

    @functools.cached_property
    def calibrated(self) -> ir.Model:
        """The calibrated model, rebuilt once per worker that keeps this context."""
        model = ir.from_proto(onnx.load_from_string(self.model))
        for value in _values(model):
            if value.name in self.ranges:
                value.meta[RANGE_KEY] = self.ranges[value.name]
        return model


def _values(model: ir.Model) -> list[ir.Value]:
    return [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]


def _run_trial(keep: Mapping[str, str], context: _TrialContext) -> tuple[FidelityResult, float]:
    """An executor task: builds the placement keeping ``keep`` fp32 and checks it."""
    start = time.monotonic()
    model = quantize_clone(
        context.calibrated,
        context.numerics,
        keep,
        exclude=context.exclude,
        op_types=context.op_types,
        prevent_skip_layernorm=context.prevent_skip_layernorm,
    )[0]
    runs = run_model(model, context.batches, context.provider)
    result = measure(context.reference, runs, context.views, context.criteria)
    return result, time.monotonic() - start


def _has_int8(model: ir.Model) -> bool:
    return any(node.op_type == "QuantizeLinear" for node in model.graph)


def criteria_from(config: CompileConfig) -> FidelityCriteria:
    """The fidelity criteria a compile configuration asks for (imports ``--metric``)."""
    return FidelityCriteria(
        min_sqnr=config.min_sqnr,
        min_agreement=config.min_agreement,
        metric=load_metric(config.metric) if config.metric else None,
        metric_name=config.metric,
    )


def choose_precision(
    calibrated: ir.Model,
    config: CompileConfig,
    batches: Sequence[Mapping[str, np.ndarray]],
    progress: Progress | None = None,
    int8: QDQResult | None = None,
    fp32: ir.Model | None = None,
    executor: Executor | None = None,
) -> Placement:
    """`tune_precision` as a compile configuration sets it up (target, criteria, budget)."""
    return tune_precision(
        calibrated,
        numerics_for(config.target),
        batches,
        criteria=criteria_from(config),
        budget_s=config.tune_budget,
        max_trials=config.tune_trials,
        exclude=config.exclude,
        op_types=config.op_types,
        provider=config.provider,
        progress=progress,
        int8=int8,
        fp32=fp32,
        executor=executor,
        prevent_skip_layernorm=config.runs_on_cpu,
    )
