"""``--mode auto``: per unit, static int8, dynamic int8, weight-only or fp32, as measured here.

A *unit* is a node some mode quantizes: a MatMul/Gemm with a constant weight, an LSTM, an
embedding table, an int8 op of static QDQ. Method, reusing what the single modes use:

1. One candidate per mode, with every unit that mode can take: static (QDQ from the
   calibrated ranges, placed for accuracy by the mixed-precision search,
   `onnxq.mixed_precision.choose_precision`, then for ONNX Runtime's fusions,
   `onnxq.placement.place_structurally`; only with calibration data), dynamic
   (`QuantizeDynamicPass`) and weight-only (`QuantizeWeightsNBitsPass` at ``--bits`` and
   ``--block-size``). With calibration data each is checked against fp32 on the check
   samples; a candidate that misses the fidelity criteria is out. Without data, static is
   not considered and fidelity is not checked (the report says so).
2. The candidates and onnxq's optimised fp32 are timed interleaved on one input (the
   first calibration sample or ``--shape``; `onnxq.placement.time_models`: models too
   large to hold a session of each at once are timed each in a pair with fp32, as the
   latency step does), and `onnxq.placement.decide` (the rule every onnxq latency
   decision uses) says which pay.
3. Paying modes are ranked by speedup; two whose paired interval of relative speed holds 1
   (indistinguishable on this machine) are ranked by worst-output SQNR. Each unit goes to
   the first ranked mode that quantizes it; a unit no paying, faithful mode takes stays
   fp32, with each mode's reason.
4. When the units went to more than one mode, the mixed model is built (static QDQ first,
   then dynamic, then weight-only, each leaving out the units the others took; on the CPU
   provider with the residual Adds as Sum, as the candidates were timed), placed
   structurally, checked, and timed against fp32 and the fastest single mode; `decide`
   picks what ships. A mixed model that misses the criteria is not shipped (the fastest
   single mode is).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq import io
from onnxq.bootstrap import ci95
from onnxq.config import CompileConfig
from onnxq.fidelity import FidelityResult, measure, plan_views
from onnxq.mixed_precision import QDQ_DETAILS_KEY, choose_precision, criteria_from, quantize_clone
from onnxq.mixed_precision import run_model as run_deployed
from onnxq.numerics import numerics_for
from onnxq.passes.dynamic import QuantizeDynamicPass
from onnxq.passes.weight_only import QuantizeWeightsNBitsPass
from onnxq.pipeline import optimised_fp32
from onnxq.placement import TimedRounds, place_structurally, time_models

__all__ = [
    "AUTO_MODES",
    "NO_CHECK",
    "NO_DATA",
    "AutoPlacement",
    "ModeCandidate",
    "Timer",
    "choose_modes",
    "model_timer",
]

logger = logging.getLogger(__name__)

# In the order the mixed model applies them (static QDQ needs the untouched fp32 graph).
AUTO_MODES = ("static", "dynamic", "weight-only")
NO_DATA = (
    "static int8 needs calibration data (--calibration-data): without it auto considers "
    "only dynamic and weight-only, and does not check their fidelity"
)
NO_CHECK = (
    "static int8 is placed by the mixed-precision search on the check samples, and "
    "--check-samples 0 leaves none: auto considers only dynamic and weight-only, unchecked"
)
# label -> model in ("fp32" the baseline); out: the rounds as `onnxq.placement.time_models`
# has them, or label -> per-round latencies (ms) of one set of interleaved rounds.
Timer = Callable[[Mapping[str, ir.Model]], TimedRounds | Mapping[str, np.ndarray]]
Batches = Sequence[Mapping[str, np.ndarray]]


@dataclasses.dataclass
class ModeCandidate:
    """One mode applied to every unit it can take, and what was measured of it.

    Attributes:
        mode: ``static``, ``dynamic`` or ``weight-only``.
        model: The model in that mode (None: the mode is out before timing).
        units: Nodes the mode quantizes.
        not_quantized: Node -> why the mode leaves it fp32.
        keep_fp32: Static: the nodes the accuracy and fusion placement kept fp32.
        fidelity: Its checks against fp32 (None: not checked, no data).
        out: Why the mode is not used (None: it pays and is faithful).
        speedup: Optimised fp32 median / its median (None: not timed).
        ci95: 95% bootstrap interval of ``speedup`` (paired rounds).
        note: Why it ranks where it does when speed alone did not decide.
    """

    mode: str
    model: ir.Model | None
    units: list[str] = dataclasses.field(default_factory=list)
    not_quantized: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_fp32: dict[str, str] = dataclasses.field(default_factory=dict)
    fidelity: FidelityResult | None = None
    out: str | None = None
    speedup: float | None = None
    ci95: tuple[float, float] | None = None
    note: str | None = None

    @property
    def min_sqnr_db(self) -> float | None:
        return self.fidelity.min_sqnr_db if self.fidelity is not None else None

    def describe(self) -> str:
        """Its measurements in a few words, e.g. ``dynamic 2.10x fp32 [2.0, 2.2], 33.1 dB``."""
        parts = []
        if self.speedup is not None:
            lo, hi = self.ci95 or (self.speedup, self.speedup)
            parts.append(f"{self.speedup:.2f}x fp32 [{lo:.2f}, {hi:.2f}]")
        if self.min_sqnr_db is not None:
            parts.append(f"worst SQNR {self.min_sqnr_db:.1f} dB")
        return f"{self.mode} " + (", ".join(parts) or "not measured")

    def to_dict(self) -> dict[str, Any]:
        """The report's view of the mode."""
        return {
            "considered": self.model is not None or self.out not in (NO_DATA, NO_CHECK),
            "used": self.out is None,
            "reason": self.out,
            "units": len(self.units),
            "speedup_vs_fp32": self.speedup,
            "speedup_vs_fp32_ci95": list(self.ci95) if self.ci95 else None,
            "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None,
        }


@dataclasses.dataclass
class AutoPlacement:
    """What auto decided.

    Attributes:
        model: The model to write (None: the optimised fp32 model given; when fp32
            ships it may be that model with the float pipelines' rewrites, e.g. Sum).
        emitted: ``fp32``, one mode's name, or ``mixed`` (units in several modes).
        reason: One line: why this model ships.
        units: Node -> ``{"mode": ..., "reason": ...}`` (``mode`` is ``fp32`` when kept).
        modes: Mode -> its candidate.
        fidelity: The written model's checks (None: not checked or fp32 written).
        mixed: The mixed model's timing (``speedup_vs_fp32``, interval) when one was built.
        timing: How the candidates were timed (`onnxq.placement.TimedRounds.to_dict`:
            together, or each in a pair with fp32 when too large; None: not timed).
    """

    model: ir.Model | None
    emitted: str
    reason: str
    units: dict[str, dict[str, str]]
    modes: dict[str, ModeCandidate]
    fidelity: FidelityResult | None = None
    mixed: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The compile report's ``auto`` section."""
        counts: dict[str, int] = {}
        for choice in self.units.values():
            counts[choice["mode"]] = counts.get(choice["mode"], 0) + 1
        return {
            "emitted": self.emitted,
            "reason": self.reason,
            "modes": {m: c.to_dict() for m, c in self.modes.items()},
            "counts": dict(sorted(counts.items())),
            "units": dict(sorted(self.units.items())),
            "mixed": self.mixed,
            "timing": self.timing,
            "rule": "modes that meet the fidelity criteria and pay against optimised fp32 "
            "(onnxq.placement.decide) are ranked by speedup, modes indistinguishable in speed "
            "by worst-output SQNR; each unit takes the first ranked mode that quantizes it; a "
            "model with units in several modes ships only if it beats the first mode alone "
            "by the same rule",
        }


def choose_modes(
    fp32: ir.Model,
    config: CompileConfig,
    *,
    reference: ir.Model | None = None,
    batches: Batches = (),
    timer: Timer,
    progress: Callable[[str], None] | None = None,
) -> AutoPlacement:
    """Chooses per unit between static int8, dynamic int8, weight-only and fp32.

    Args:
        fp32: The optimised fp32 model; with calibration data, calibrated (ranges in its
            values' metadata, fused units marked). Left as it is.
        config: The compile configuration (bits, block size, criteria, exclusions).
        reference: The model whose outputs count as right (default ``fp32``).
        batches: The check samples, one dict per run; empty: no calibration data (static
            is not considered and fidelity is not checked).
        timer: Times models interleaved on this machine (see `model_timer`).
        progress: Called with one line per mixed-precision trial of static.
    """
    checker = _Checker(reference if reference is not None else fp32, fp32, batches, config)
    # Float activations everywhere but in static QDQ: the residual Adds as Sum there, as the
    # dynamic and weight-only pipelines have them (the compile's pipeline leaves them for
    # static, where the Add is an int8 unit). The same float model is the baseline timed.
    floats = optimised_fp32(fp32, config)
    candidates = {
        "static": _static(fp32, config, checker, progress),
        "dynamic": _dynamic(floats, config),
        "weight-only": _weight_only(floats, config),
    }
    for c in candidates.values():
        if c.model is not None and c.out is None and checker.enabled:
            c.fidelity = checker(c.model)
            if not c.fidelity.passed:
                c.out = f"misses the fidelity criteria ({c.fidelity.summary()})"
    timed = {m: c.model for m, c in candidates.items() if c.model is not None and c.out is None}
    times = _rounds(timer({"fp32": floats, **timed})) if timed else None
    for mode in timed:
        c = candidates[mode]
        decision = times.decide("fp32", [mode])
        c.speedup, c.ci95 = decision.speedups[mode], decision.intervals[mode]
        if decision.choice != mode:
            c.out = f"not faster than optimised fp32 on this machine ({c.describe()})"
    ranked = _rank([c for c in candidates.values() if c.out is None], times)
    assign = _assign(candidates, ranked)
    if not ranked:
        reason = "no mode is both faithful and faster than fp32 here"
        placement = _fp32(candidates, assign, reason)
        if floats is not fp32:
            placement.model = floats  # the optimised fp32, as --no-quantize writes it
    elif {choice["mode"] for choice in assign.values()} - {"fp32"} == {ranked[0].mode}:
        placement = _single(ranked[0], candidates, assign)
    else:
        placement = _mix(fp32, config, candidates, assign, ranked[0], checker, timer, floats=floats)
    placement.timing = times.to_dict() if times is not None else None
    return placement


# ---------------------------------------------------------------------------- candidates


class _Checker:
    """Fidelity of a candidate against the reference on the check samples (as compile does)."""

    def __init__(
        self, reference: ir.Model, fp32: ir.Model, batches: Batches, config: CompileConfig
    ):
        self.batches = list(batches)
        self.enabled = bool(self.batches)
        self.provider = config.provider
        self.criteria = criteria_from(config)
        self.views = plan_views(fp32)
        self.reference = reference
        self._runs: list[dict[str, np.ndarray]] | None = None

    def __call__(self, model: ir.Model) -> FidelityResult:
        if self._runs is None:
            self._runs = run_deployed(self.reference, self.batches, self.provider)
        candidate = run_deployed(model, self.batches, self.provider)
        return measure(self._runs, candidate, self.views, self.criteria)


def _static(
    fp32: ir.Model,
    config: CompileConfig,
    checker: _Checker,
    progress: Callable[[str], None] | None,
) -> ModeCandidate:
    if not checker.enabled:
        return ModeCandidate("static", None, out=NO_CHECK if config.calibration else NO_DATA)
    placement = choose_precision(fp32, config, checker.batches, progress, fp32=checker.reference)
    if placement.model is None:
        return ModeCandidate("static", None, out=placement.reason, keep_fp32={})

    def build(keep: Mapping[str, str]) -> ir.Model:
        return _qdq(fp32, config, keep)

    model, reverted, _ = place_structurally(build, placement.model, placement.keep_fp32)
    details = model.meta.get(QDQ_DETAILS_KEY, {})
    return ModeCandidate(
        "static",
        model,
        units=list(details.get("quantized_nodes", [])),
        not_quantized=dict(details.get("not_quantized", {})),
        keep_fp32={**placement.keep_fp32, **reverted},
        fidelity=placement.fidelity,
    )


def _qdq(fp32: ir.Model, config: CompileConfig, keep: Mapping[str, str]) -> ir.Model:
    numerics = numerics_for(config.target)
    return quantize_clone(
        fp32,
        numerics,
        keep,
        exclude=config.exclude,
        op_types=config.op_types,
        prevent_skip_layernorm=config.runs_on_cpu,
    )[0]


def _dynamic_pass(config: CompileConfig, leave: Sequence[str] = ()) -> QuantizeDynamicPass:
    # The pass takes regular expressions: the nodes left to other modes by exact name.
    exclude = (*config.exclude, *(re.escape(n) for n in leave))
    return QuantizeDynamicPass(
        numerics_for(config.target), exclude=exclude, op_types=config.op_types
    )


def _weight_only_pass(config: CompileConfig, leave: Sequence[str] = ()) -> QuantizeWeightsNBitsPass:
    return QuantizeWeightsNBitsPass(
        config.bits,
        config.block_size,
        symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        exclude=(*config.exclude, *leave),
    )


def _dynamic(fp32: ir.Model, config: CompileConfig) -> ModeCandidate:
    return _apply("dynamic", fp32, _dynamic_pass(config))


def _weight_only(fp32: ir.Model, config: CompileConfig) -> ModeCandidate:
    return _apply("weight-only", fp32, _weight_only_pass(config))


def _apply(mode: str, fp32: ir.Model, pass_: ir.passes.PassBase) -> ModeCandidate:
    model = fp32.clone()
    details = pass_(model).details  # type: ignore[attr-defined]
    _tidy(model)
    units = list(details["quantized_nodes"])
    out = None if units else "quantizes no node of this model"
    return ModeCandidate(
        mode, model if units else None, units, dict(details["not_quantized"]), out=out
    )


def _tidy(model: ir.Model) -> None:
    for p in (
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
        common_passes.NameFixPass(),
    ):
        p(model)


# ---------------------------------------------------------------------------- the choice


def _rounds(times: TimedRounds | Mapping[str, np.ndarray]) -> TimedRounds:
    """A timer's result as `TimedRounds` (a mapping: one set of rounds, fp32 the pivot)."""
    return times if isinstance(times, TimedRounds) else TimedRounds.together(times, "fp32")


def _tied(a: ModeCandidate, b: ModeCandidate, times: TimedRounds) -> bool:
    """Whether a and b are indistinguishable in speed (the interval of a/b holds 1).

    Paired when a and b ran in the same rounds; timed in pairs with fp32, through fp32.
    """
    lo, hi = ci95(times.speedup(b.mode, a.mode)[1])
    return lo <= 1.0 <= hi


def _rank(paying: list[ModeCandidate], times: TimedRounds | None) -> list[ModeCandidate]:
    """Fastest first; neighbours tied in speed, the more faithful first (when measured)."""
    ranked = sorted(paying, key=lambda c: -(c.speedup or 0.0))
    swapped = True
    while swapped:
        swapped = False
        for i in range(len(ranked) - 1):
            a, b = ranked[i], ranked[i + 1]
            if a.min_sqnr_db is None or b.min_sqnr_db is None:
                continue
            if times is not None and b.min_sqnr_db > a.min_sqnr_db and _tied(a, b, times):
                ranked[i], ranked[i + 1], swapped = b, a, True
                b.note = f"as fast as {a.mode} within the noise, and more faithful"
    return ranked


def _assign(
    candidates: Mapping[str, ModeCandidate], ranked: Sequence[ModeCandidate]
) -> dict[str, dict[str, str]]:
    """Each unit -> the first ranked mode that quantizes it, or fp32 with every mode's why."""
    units = dict.fromkeys(u for c in candidates.values() for u in c.units)
    assign = {}
    for unit in units:
        chosen = next((c for c in ranked if unit in c.units), None)
        if chosen is not None:
            others = [c.describe() for c in ranked if c is not chosen and unit in c.units]
            reason = f"ranked first of the modes that quantize it: {chosen.describe()}"
            if chosen.note:
                reason += f", {chosen.note}"
            if others:
                reason += f" (also possible: {'; '.join(others)})"
            assign[unit] = {"mode": chosen.mode, "reason": reason}
            continue
        whys = []
        for c in candidates.values():
            # The mode's own reason is in the report's modes section: its gist here.
            gist = (c.out or "").split(" (")[0]
            if unit in c.units:
                whys.append(f"{c.mode}: {gist}")
            else:
                why = c.keep_fp32.get(unit) or c.not_quantized.get(unit) or gist
                whys.append(f"{c.mode}: {why or 'does not quantize it'}")
        assign[unit] = {"mode": "fp32", "reason": "; ".join(whys)}
    return assign


def _fp32(
    candidates: dict[str, ModeCandidate], assign: dict[str, dict[str, str]], reason: str
) -> AutoPlacement:
    logger.warning("--mode auto writes the optimised fp32 model: %s", reason)
    return AutoPlacement(None, "fp32", reason, assign, candidates)


def _single(
    best: ModeCandidate,
    candidates: dict[str, ModeCandidate],
    assign: dict[str, dict[str, str]],
    reason: str | None = None,
) -> AutoPlacement:
    """Ships one mode's model: its units in that mode, the others fp32."""
    for choice in assign.values():
        if choice["mode"] not in ("fp32", best.mode):
            choice["mode"] = "fp32"
            choice["reason"] = reason or f"{best.mode} alone ships"
    return AutoPlacement(
        best.model,
        best.mode,
        reason
        or f"{best.describe()}: the fastest mode that pays"
        + (" and meets the fidelity criteria" if best.fidelity is not None else ""),
        assign,
        candidates,
        fidelity=best.fidelity,
    )


def _mix(
    fp32: ir.Model,
    config: CompileConfig,
    candidates: dict[str, ModeCandidate],
    assign: dict[str, dict[str, str]],
    best: ModeCandidate,
    checker: _Checker,
    timer: Timer,
    *,
    floats: ir.Model,
) -> AutoPlacement:
    """Builds, places, checks and times the model with units in several modes.

    ``floats`` is ``fp32`` as the float-activation pipelines write it (`optimised_fp32`):
    the baseline timed against, and the base of a mixed model without static units.
    """
    static = candidates["static"]

    def build(keep: Mapping[str, str]) -> ir.Model:
        return _build_mixed(fp32, floats, config, candidates, assign, keep)

    keep = dict(static.keep_fp32)
    model = build(keep)
    if any(choice["mode"] == "static" for choice in assign.values()):
        model, reverted, _ = place_structurally(build, model, keep)
        for node, why in reverted.items():
            if node in assign:
                assign[node] = {"mode": "fp32", "reason": f"static int8 unit reverted: {why}"}
    fidelity = checker(model) if checker.enabled else None
    if fidelity is not None and not fidelity.passed:
        why = f"the mixed model misses the fidelity criteria ({fidelity.summary()})"
        return _single(best, candidates, assign, f"{why}: {best.describe()} alone ships")
    timed = {
        "fp32": floats,
        "mixed": model,
        best.mode: best.model,
    }
    times = _rounds(timer(timed))  # type: ignore[arg-type]
    vs_fp32 = {k: times.decide("fp32", [k]) for k in ("mixed", best.mode)}
    # The mixed model must beat the single mode by the same rule single modes beat fp32 by:
    # a mixed model no faster than one mode is more ops and more error for nothing. (Timed
    # in pairs with fp32, the two are compared through it.)
    vs_best = times.decide(best.mode, ["mixed"])
    mixed = {
        "speedup_vs_fp32": vs_fp32["mixed"].speedups["mixed"],
        "speedup_vs_fp32_ci95": list(vs_fp32["mixed"].intervals["mixed"]),
        f"speedup_vs_{best.mode}": vs_best.speedups["mixed"],
        f"speedup_vs_{best.mode}_ci95": list(vs_best.intervals["mixed"]),
        "fidelity": fidelity.to_dict() if fidelity is not None else None,
        "timing": times.to_dict(),
    }
    if vs_best.choice == "mixed" and vs_fp32["mixed"].choice == "mixed":
        return AutoPlacement(
            model,
            "mixed",
            f"units in several modes: {vs_fp32['mixed'].reason}, "
            f"{vs_best.speedups['mixed']:.2f}x {best.mode} alone",
            assign,
            candidates,
            fidelity,
            mixed,
        )
    if vs_fp32[best.mode].choice == best.mode:
        lo, hi = vs_best.intervals["mixed"]
        why = (
            f"the mixed model is not faster than {best.mode} alone "
            f"({vs_best.speedups['mixed']:.2f}x, 95% CI [{lo:.2f}, {hi:.2f}])"
        )
        placement = _single(best, candidates, assign, f"{why}: {best.mode} alone ships")
        placement.mixed = mixed
        return placement
    placement = _fp32(candidates, assign, f"in the final timing: {vs_fp32[best.mode].reason}")
    placement.mixed = mixed
    for choice in assign.values():
        choice.update(mode="fp32", reason=placement.reason)
    return placement


def _build_mixed(
    fp32: ir.Model,
    floats: ir.Model,
    config: CompileConfig,
    candidates: Mapping[str, ModeCandidate],
    assign: Mapping[str, Mapping[str, str]],
    keep: Mapping[str, str],
) -> ir.Model:
    """The model with each unit in its assigned mode (``keep``: static nodes kept fp32).

    Static QDQ is inserted into ``fp32`` (`_qdq` writes its fp32 residual Adds as Sum on
    the CPU provider); without static units the model starts from ``floats``, so that its
    residual Adds are Sum as in the dynamic and weight-only candidates timed before it.
    """

    def elsewhere(mode: str) -> list[str]:
        return [u for u in candidates[mode].units if assign[u]["mode"] != mode]

    if any(choice["mode"] == "static" for choice in assign.values()):
        other = {u: "--mode auto: another mode took it" for u in elsewhere("static")}
        model = _qdq(fp32, config, {**other, **keep})
    else:
        model = floats.clone()
    if any(choice["mode"] == "dynamic" for choice in assign.values()):
        _dynamic_pass(config, elsewhere("dynamic"))(model)
    if any(choice["mode"] == "weight-only" for choice in assign.values()):
        _weight_only_pass(config, elsewhere("weight-only"))(model)
    _tidy(model)
    return model


# ---------------------------------------------------------------------------- timing


def model_timer(
    feeds: Mapping[str, np.ndarray] | None,
    *,
    seconds: float = 2.0,
    holding: Sequence[ir.Model] = (),
) -> Timer:
    """A `Timer` that saves the models and times them interleaved on ``feeds`` (batch 1).

    Models too large to hold a session of each at once are timed each in a pair with
    ``fp32`` (`onnxq.placement.time_models`, after closing the models' weight maps).

    Args:
        feeds: One input by name (None: seeded random inputs of the declared shapes).
        seconds: Budget of timed rounds, all models together.
        holding: Other models the caller holds, whose weight maps are closed before timing.
    """

    def time_saved(models: Mapping[str, ir.Model]) -> TimedRounds:
        with tempfile.TemporaryDirectory(prefix="onnxq-auto-") as tmp:
            paths = {}
            for i, (label, model) in enumerate(models.items()):
                paths[label] = Path(tmp) / f"{i}.onnx"
                io.save_model(model, paths[label])
            return time_models(
                paths, "fp32", feeds, seconds=seconds, holding=(*models.values(), *holding)
            )

    return time_saved
