"""Fidelity criteria: whether a candidate's outputs still do the fp32 model's task.

Whole-output SQNR is not the task. Two real int8 models passed 20 dB and failed theirs (a
ViT heatmap whose ``>= 0.8`` region kept an IoU of 0.71 at cosine 0.99; transcription
onsets thresholded at 0.3/0.5 with a Jaccard of 0.85), and one packed output (YOLO's
``[1, 4 + 80, 8400]``: box coordinates in the hundreds next to probabilities) can have a
high SQNR while its small part is noise. So each output is measured through *views*:

- the whole output: SQNR floor (``min_sqnr``);
- one view per part when the output is a ``Concat`` of parts (found in the graph, through
  Transpose and elementwise ops): each part gets its own SQNR floor and checks;
- values in ``[0, 1]`` (a Sigmoid/Softmax producer, or the fp32 values themselves):
  IoU of the thresholded sets ``{x >= t}`` for ``t`` in ``thresholds`` must reach
  ``min_iou`` wherever fp32's set is non-trivial (at least ``_MIN_SET`` elements);
  The IoU is taken pooled over all runs *and* as the mean of per-run IoUs: a task that
  thresholds each input's map on its own (a region of interest per image) is judged per
  input, and one badly moved map must not hide in a pooled count;
- small outputs (at most ``_SMALL_OUTPUT`` values per run, not probabilities: regression
  heads such as quality scores or a few coordinates, and score heads of at most
  ``_MAX_SCORE_REGRESSION`` values, which a Dense layer's regression cannot be told apart
  from; wider heads are class logits) are read as numbers, so their error
  is measured against how much fp32's values vary between runs, not against their size:
  a score of 3.1 read as 3.3 is a 35 dB error against the score, but a large one against
  a spread of 0.5 between inputs. The *spread SQNR* (error energy against the energy of
  fp32's values around their mean over runs) must reach ``min_sqnr``, and no single value
  may be off by more than ``_WORST_SPREAD_FACTOR`` times the error the floor allows;
- the peak of a sparse [0, 1] map (at least ``_MIN_PEAK_MAP`` values per run, at most
  ``_PEAK_SPARSITY`` of them above the lowest threshold: a detector's anchors, whose most
  confident one is the detection) must be where fp32's is, up to float noise in fp32's
  own scores (``_PEAK_TIE``), in ``min_agreement`` of the runs whose fp32 peak reaches
  the lowest threshold: a detector's score part passed 21 dB and its thresholded sets while the
  top box moved on 3 of 16 images. And it must be *stable*: the candidate's error on the
  contending scores is paired with fp32's decision margins (peak to the best untied
  score) over all pairs of check runs, and at least ``min_agreement`` of the pairs must
  keep the margin (see ``_peak_stability``);
- class scores or logits (a Gemm/MatMul/Softmax head, rank >= 2, class axis last):
  top-1 agreement must reach ``min_agreement``. Few samples make that a coarse estimate
  (32 rows: one flip is 97%), so a view fails only when its disagreements are more than
  a binomial test at 95% confidence allows for a true agreement of ``min_agreement``.

A user metric (``--metric pkg.module:fn``) is called with the fp32 and the candidate
outputs, ``{name: [array per run]}``, and returns a bool or ``(bool, score)``.

Outputs are compared per run, as the model ran them (lists of per-run output dicts):
axis 0 is never assumed to be the sample axis.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError
from onnxq.evaluate import FidelityAccumulator

__all__ = [
    "Check",
    "FidelityCriteria",
    "FidelityResult",
    "OutputView",
    "load_metric",
    "measure",
    "plan_views",
]

logger = logging.getLogger(__name__)

# Runs of a model: one dict of outputs by name per run.
Runs = Sequence[Mapping[str, np.ndarray]]
Metric = Callable[[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]], Any]

# A thresholded set needs this many fp32 elements before its IoU means anything.
_MIN_SET = 10
# "Comfortable" margins (see FidelityResult.comfortable).
_SQNR_MARGIN_DB = 1.0
_AGREEMENT_MARGIN = 0.25
# Outputs with at most this many values per run are read as numbers (regression heads).
_SMALL_OUTPUT = 16
# A score head with at most this many values along its last axis may be a regression (a
# few quality scores, a box); more are class logits, judged by top-1 agreement alone.
_MAX_SCORE_REGRESSION = 4
# The spread check needs this many runs before fp32's spread means anything.
_MIN_SPREAD_RUNS = 16
# One value may be off by this many times the rms error the SQNR floor allows: the floor
# is on energy, and a single far-off score is what a user of the score sees, so each value
# is held to the floor itself.
_WORST_SPREAD_FACTOR = 1.0
# A [0, 1] map needs this many values per run before its peak is a decision (the most
# confident detection, the centre of a region) rather than one of a few scores.
_MIN_PEAK_MAP = 100
# The candidate's peak agrees when fp32 scores it as high as its own peak (up to float
# noise): with a tolerance of 0.02, a detector's top box moved to a second object that
# fp32 scored nearly as high, on 1 of 16 task images, while the check samples passed.
_PEAK_TIE = 1e-6
# ... and is a peak only when at most this share of the map reaches the lowest threshold.
_PEAK_SPARSITY = 0.01
# Ops that keep a Concat's parts where they are along its axis.
_ELEMENTWISE = frozenset({"Identity", "Sigmoid", "Relu", "Cast", "Clip", "Softmax", "Mul", "Add"})
_PROBABILITY_OPS = frozenset({"Sigmoid", "Softmax", "HardSigmoid"})
_SCORE_HEADS = frozenset({"Gemm", "MatMul", "Softmax", "LogSoftmax"})
_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"})


@dataclasses.dataclass(frozen=True)
class FidelityCriteria:
    """What counts as keeping the fp32 model's task.

    Attributes:
        min_sqnr: SQNR floor (dB) of every view (whole outputs and packed parts).
        min_agreement: Top-1 agreement floor of class-score views, in [0, 1].
        thresholds: Thresholds of the IoU check on views with values in [0, 1].
        min_iou: IoU floor of those thresholded sets.
        metric: A user metric (see the module docstring), or None.
        metric_name: How the metric is named in reports (its spec).
    """

    min_sqnr: float = 20.0
    min_agreement: float = 0.99
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.8)
    min_iou: float = 0.9
    metric: Metric | None = None
    metric_name: str | None = None


@dataclasses.dataclass(frozen=True)
class OutputView:
    """One measured part of a model output: the whole output or one Concat part.

    Attributes:
        output: The graph output's name.
        axis: Axis of the part (None: the whole output).
        start: First index of the part along ``axis``.
        stop: One past its last index.
        probability: A Sigmoid/Softmax produces it (values in [0, 1]).
        scores: Class scores or logits along the last axis.
    """

    output: str
    axis: int | None = None
    start: int = 0
    stop: int = 0
    probability: bool = False
    scores: bool = False

    @property
    def label(self) -> str:
        """The output name, with the part as a slice for Concat parts."""
        if self.axis is None:
            return self.output
        index = ", ".join([":"] * self.axis + [f"{self.start}:{self.stop}"])
        return f"{self.output}[{index}]"

    def take(self, array: np.ndarray) -> np.ndarray:
        """This view's part of one run's output."""
        if self.axis is None:
            return array
        return np.take(array, np.arange(self.start, self.stop), axis=self.axis)


@dataclasses.dataclass(frozen=True)
class Check:
    """One criterion on one view.

    Attributes:
        view: The view's label (or the metric's name).
        kind: ``sqnr_db``, ``iou@<t>``, ``top1_agreement`` or ``metric``.
        value: The measured value (None when the user metric gives no score).
        floor: The value it must reach (None for the user metric).
        passed: Whether it did.
    """

    view: str
    kind: str
    value: float | None
    floor: float | None
    passed: bool

    def describe(self) -> str:
        """One line: ``view kind value (floor)``."""
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        floor = "" if self.floor is None else f" (floor {self.floor:g})"
        return f"{self.view} {self.kind} {value}{floor}"


@dataclasses.dataclass
class FidelityResult:
    """Every check of a candidate against fp32.

    Attributes:
        checks: The checks, in view order.
        runs: Number of runs compared.
        outputs: Per float output, SQNR, cosine, max abs error and top-1 agreement
            (`FidelityAccumulator.result`), for the report.
    """

    checks: list[Check]
    runs: int
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def comfortable(self) -> bool:
        """Passed with room to spare.

        SQNRs 1 dB over their floor, agreements and IoUs a quarter of the way from their
        floor to 1, worst errors at most 80% of their bound. What the precision search
        asks before it returns a unit to int8: a placement tuned to just pass on the check
        samples tends to miss on the next ones.
        """
        return self.passed and all(_comfortable(c) for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    @property
    def min_sqnr_db(self) -> float:
        """The worst SQNR over all views (inf when none)."""
        return min((c.value for c in self.checks if c.kind == "sqnr_db"), default=math.inf)

    @property
    def min_agreement(self) -> float:
        """The worst agreement-like value (top-1 agreement, IoU) over all views, or 1."""
        values = [
            c.value
            for c in self.checks
            if c.value is not None and (c.kind in ("top1_agreement", "equal") or "iou" in c.kind)
        ]
        return min(values, default=1.0)

    def summary(self) -> str:
        """``passed`` or the failed checks, for logs and reasons."""
        if self.passed:
            return f"passed (worst SQNR {self.min_sqnr_db:.1f} dB)"
        return "; ".join(c.describe() for c in self.failures)

    def to_dict(self) -> dict[str, Any]:
        """The checks and per-output metrics as JSON-ready values."""
        return {
            "passed": self.passed,
            "runs": self.runs,
            "outputs": self.outputs,
            "min_sqnr_db": self.min_sqnr_db,
            "min_agreement": self.min_agreement,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


def _peak_stability(margins: Sequence[float], errors: Sequence[float]) -> float:
    """Estimated share of inputs whose peak stays put: 1 - P(fp32's margin < the error).

    Each run's fp32 margin is paired with every run's candidate error on the contenders:
    an input as close to a tie as one check sample, seen with the error of another, flips.
    The check samples alone cannot show a flip on an input nearer a tie than they were
    (a detector whose two similar objects score 3e-4 apart moved its top box on 1 of 16
    task images while all 32 check samples kept it), so the pairs estimate the rate on
    inputs the check never saw, at a finer grain than the observed count.
    """
    m = np.asarray(margins, np.float64)[:, None]
    e = np.asarray(errors, np.float64)[None, :]
    return float(1.0 - np.mean(m < e))


def _comfortable(check: Check) -> bool:
    if check.floor is None or check.value is None:
        return check.passed
    if check.kind.endswith("sqnr_db"):
        return check.value >= check.floor + _SQNR_MARGIN_DB
    if check.kind == "worst_error":  # an upper bound
        return check.value <= (1.0 - _AGREEMENT_MARGIN) * check.floor
    return check.value >= check.floor + _AGREEMENT_MARGIN * (1.0 - check.floor)


# ---------------------------------------------------------------------------- views


def plan_views(model: ir.Model) -> list[OutputView]:
    """The views of each output of ``model``, read from its graph.

    Integer and boolean outputs (labels, masks) must match fp32 exactly in at least
    ``min_agreement`` of their elements. Expects inferred shapes on the values (the
    compile pipeline infers them); a Concat whose parts have no static size along its
    axis is measured as a whole.
    """
    views: list[OutputView] = []
    for value in model.graph.outputs:
        name = value.name or ""
        if value.dtype is not None and not value.dtype.is_floating_point():
            views.append(OutputView(name))
            continue
        views.append(OutputView(name, probability=_is_probability(value), scores=_is_scores(value)))
        views.extend(_concat_parts(value))
    return views


def _source(value: ir.Value, ops: frozenset[str]) -> ir.Value:
    """Walks up through ``ops`` (first input, constant operands); returns where it stops."""
    node = value.producer()
    while node is not None and node.op_type in ops and node.inputs and node.inputs[0] is not None:
        if node.op_type in ("Mul", "Add") and not _has_const_operand(node):
            break
        value = node.inputs[0]
        node = value.producer()
    return value


def _has_const_operand(node: ir.Node) -> bool:
    return len(node.inputs) == 2 and any(
        v is not None and v.const_value is not None for v in node.inputs[1:]
    )


def _is_probability(value: ir.Value) -> bool:
    source = _source(value, _SHAPE_OPS | {"Cast"})
    producer = source.producer()
    return producer is not None and producer.op_type in _PROBABILITY_OPS


def _is_scores(value: ir.Value) -> bool:
    shape = value.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[-1], int) or shape[-1] < 2:
        return False
    source = _source(value, frozenset({"Identity", "Flatten", "Squeeze", "Reshape"}))
    producer = source.producer()
    if producer is not None and producer.op_type == "Add" and _has_const_operand(producer):
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and producer.op_type in _SCORE_HEADS


def _concat_parts(value: ir.Value) -> list[OutputView]:
    """One view per Concat part when ``value`` is a Concat through Transpose/elementwise."""
    rank = len(value.shape) if value.shape is not None else None
    perms: list[list[int]] = []
    node = value.producer()
    after_probability = False
    while node is not None and (node.op_type in _ELEMENTWISE or node.op_type == "Transpose"):
        if node.op_type in ("Mul", "Add") and not _has_const_operand(node):
            return []
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm")
            if perm is None:
                return []
            perms.append(list(perm))
        after_probability |= node.op_type in _PROBABILITY_OPS
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is None or node.op_type != "Concat" or rank is None or len(node.inputs) < 2:
        return []
    axis = node.attributes.get_int("axis", 0)
    axis = axis + rank if axis < 0 else axis
    sizes = []
    for part in node.inputs:
        shape = part.shape if part is not None else None
        if shape is None or len(shape) != rank or not isinstance(shape[axis], int):
            return []
        sizes.append(shape[axis])
    # Transposes seen from the output back: the Concat axis moves to perm.index(axis).
    for perm in reversed(perms):
        axis = perm.index(axis)
    views, start = [], 0
    for part, size in zip(node.inputs, sizes, strict=True):
        probability = after_probability or _is_probability(part)
        views.append(OutputView(value.name or "", axis, start, start + size, probability))
        start += size
    return views


# ---------------------------------------------------------------------------- measuring


class _ViewAccumulator:
    """Streams one view's statistics over runs."""

    def __init__(self, view: OutputView, criteria: FidelityCriteria):
        self.view = view
        self.criteria = criteria
        self.energy = FidelityAccumulator()
        self.in_unit_range = True
        self.inter = dict.fromkeys(criteria.thresholds, 0)
        self.union = dict.fromkeys(criteria.thresholds, 0)
        self.ref_set = dict.fromkeys(criteria.thresholds, 0)
        self.rows = self.disagree = 0
        self.exact = False
        # Per-run IoUs (runs where fp32's set is non-trivial) for the per-input mean.
        self.run_ious: dict[float, list[float]] = {t: [] for t in criteria.thresholds}
        # Runs whose [0, 1] map peak is a decision, and those where the candidate's moved.
        self.peak_runs = self.peak_moved = 0
        # Per peak run: fp32's decision margin and the candidate's error on the contenders.
        self.peak_margins: list[float] = []
        self.peak_errors: list[float] = []
        # Small outputs' values per run, for the spread check (None once too large).
        self.values: list[tuple[np.ndarray, np.ndarray]] | None = []

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.dtype.kind in "iub":  # labels, indices, masks: equal or not
            if ref.shape != cand.shape:
                raise ValueError(f"{self.view.label}: shape {cand.shape} vs fp32 {ref.shape}")
            self.exact = True
            self.disagree += int(np.sum(ref != cand))
            self.rows += ref.size
            return
        r = np.asarray(self.view.take(ref), np.float64)
        c = np.asarray(self.view.take(cand), np.float64)
        if r.shape != c.shape:
            raise ValueError(f"{self.view.label}: shape {c.shape} differs from fp32 {r.shape}")
        self.energy.update(r, c)
        if r.size:
            self.in_unit_range &= bool(r.min() >= 0.0 and r.max() <= 1.0)
        for t in self.criteria.thresholds:
            a, b = r >= t, c >= t
            inter, union, ref_set = int(np.sum(a & b)), int(np.sum(a | b)), int(np.sum(a))
            self.inter[t] += inter
            self.union[t] += union
            self.ref_set[t] += ref_set
            if ref_set >= _MIN_SET:
                self.run_ious[t].append(inter / union)
        low = min(self.criteria.thresholds, default=0.5)
        if (
            r.size >= _MIN_PEAK_MAP
            and r.min() >= 0.0
            and low <= r.max() <= 1.0
            # A few confident values among many (a detector's anchors): the task takes the
            # peak. A map with large confident regions (text, a region of interest) is
            # judged by its thresholded sets alone.
            and np.count_nonzero(r >= low) <= _PEAK_SPARSITY * r.size
        ):
            self.peak_runs += 1
            top, picked = r.max(), int(np.argmax(c))
            self.peak_moved += int(r.flat[picked] < top - _PEAK_TIE)
            # How far the decision is from flipping: fp32's gap from its peak to the best
            # score not tied with it, and the candidate's error on the contenders.
            below = r[r < top - _PEAK_TIE]
            self.peak_margins.append(float(top - below.max()) if below.size else math.inf)
            contenders = (r >= low).ravel()
            contenders[picked] = True
            self.peak_errors.append(float(np.abs(c.ravel() - r.ravel())[contenders].max()))
        if self.values is not None:
            # A narrow score head may be a regression (quality scores from a Dense
            # layer look like logits); wide ones are class logits.
            small = (
                r.size <= _SMALL_OUTPUT
                and not self.view.probability
                and not (self.view.scores and r.shape[-1] > _MAX_SCORE_REGRESSION)
            )
            if small:
                self.values.append((r.ravel(), c.ravel()))
            else:
                self.values = None
        if self.view.scores and r.ndim >= 2 and r.shape[-1] > 1:
            picked = np.argmax(c, axis=-1)
            best = np.max(r, axis=-1)
            got = np.take_along_axis(r, picked[..., None], axis=-1)[..., 0]
            # A flip between classes fp32 itself scores equally is no disagreement.
            tie = 1e-6 * np.maximum(np.abs(best), 1.0)
            self.disagree += int(np.sum(best - got > tie))
            self.rows += picked.size

    def checks(self) -> list[Check]:
        crit = self.criteria
        label = self.view.label
        if self.exact:
            equal = 1.0 - self.disagree / self.rows if self.rows else 1.0
            ok = _agreement_plausible(self.disagree, self.rows, crit.min_agreement)
            return [Check(label, "equal", equal, crit.min_agreement, ok)]
        sqnr = self.energy.sqnr_db
        out = [Check(label, "sqnr_db", sqnr, crit.min_sqnr, sqnr >= crit.min_sqnr)]
        if self.view.probability or (self.in_unit_range and self.energy.signal > 0):
            for t in crit.thresholds:
                if self.ref_set[t] < _MIN_SET:
                    continue  # fp32's set is (nearly) empty: no shape to keep
                iou = self.inter[t] / self.union[t]
                if self.run_ious[t]:
                    iou = min(iou, float(np.mean(self.run_ious[t])))
                out.append(Check(label, f"iou@{t:g}", iou, crit.min_iou, iou >= crit.min_iou))
            if self.peak_runs:
                agreement = 1.0 - self.peak_moved / self.peak_runs
                # The observed rate, with no allowance for sampling error: a detection that
                # moves on one check sample moves on held-out inputs too (a YOLO head with
                # 1 of 32 moved on the check samples moved 1 of 16 on the task's images).
                ok = agreement >= crit.min_agreement
                out.append(Check(label, "peak_agreement", agreement, crit.min_agreement, ok))
                stable = _peak_stability(self.peak_margins, self.peak_errors)
                ok = stable >= crit.min_agreement
                out.append(Check(label, "peak_stability", stable, crit.min_agreement, ok))
        out.extend(self._spread_checks())
        if self.rows:
            agreement = 1.0 - self.disagree / self.rows
            ok = _agreement_plausible(self.disagree, self.rows, crit.min_agreement)
            out.append(Check(label, "top1_agreement", agreement, crit.min_agreement, ok))
        return out

    def _spread_checks(self) -> list[Check]:
        """Error of a small regression output against fp32's spread between runs."""
        values = self.values
        if (
            not values
            or len(values) < _MIN_SPREAD_RUNS
            or self.in_unit_range
            or len({r.shape for r, _ in values}) != 1
        ):
            return []
        ref = np.stack([r for r, _ in values])
        err = np.stack([c for _, c in values]) - ref
        spread = ref - ref.mean(axis=0)
        signal, noise = float(np.sum(spread**2)), float(np.sum(err**2))
        if signal <= 0.0:
            return []  # fp32 gives the same values for every input: nothing to compare with
        floor = self.criteria.min_sqnr
        sqnr = math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)
        # The largest error a value may have: the rms error the floor allows, times a factor.
        allowed = _WORST_SPREAD_FACTOR * math.sqrt(signal / spread.size) * 10 ** (-floor / 20)
        worst = float(np.max(np.abs(err)))
        label = self.view.label
        return [
            Check(label, "spread_sqnr_db", sqnr, floor, sqnr >= floor),
            Check(label, "worst_error", worst, allowed, worst <= allowed),
        ]


def _agreement_plausible(disagree: int, rows: int, min_agreement: float) -> bool:
    """Whether ``disagree`` flips in ``rows`` are plausible (p >= 5%) at the floor's rate.

    One-sided binomial tail: ``P(X >= disagree)`` for ``X ~ Binomial(rows, 1 -
    min_agreement)``; below 5% the agreement is lower than the floor with 95% confidence.
    """
    p = 1.0 - min_agreement
    if disagree == 0:
        return True
    if p <= 0.0:
        return False
    if disagree <= rows * p:
        return True  # at most the mean: the binomial's median is at least this, P >= 0.5
    # Above the mean the terms of the upper tail only decrease: sum them from ``disagree``
    # up until they stop counting (a few standard deviations), in log space since
    # math.comb(rows, k) overflows a float for the millions of rows a token-level or
    # per-pixel output gives. Summing the lower part instead took ``disagree`` terms.
    log_p, log_q = math.log(p), math.log1p(-p)
    log_norm = math.lgamma(rows + 1)
    tail = 0.0
    for k in range(disagree, rows + 1):
        term = math.exp(
            log_norm
            - math.lgamma(k + 1)
            - math.lgamma(rows - k + 1)
            + k * log_p
            + (rows - k) * log_q
        )
        tail += term
        if tail >= 0.05:
            return True
        if term <= 1e-12 * max(tail, 1e-300):
            break
    return False


def measure(
    reference: Runs,
    candidate: Runs,
    views: Sequence[OutputView],
    criteria: FidelityCriteria,
) -> FidelityResult:
    """Checks a candidate's runs against fp32's runs of the same inputs.

    Args:
        reference: fp32 outputs, one dict per run.
        candidate: The candidate's outputs for the same runs.
        views: What to measure (see `plan_views`); views of outputs a run lacks are skipped.
        criteria: The floors.

    Raises:
        ValueError: The run counts or an output's shapes differ.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate runs for {len(reference)} fp32 runs")
    accs = [_ViewAccumulator(v, criteria) for v in views]
    for ref, cand in zip(reference, candidate, strict=True):
        for acc in accs:
            name = acc.view.output
            if name in ref and name in cand:
                acc.update(ref[name], cand[name])
    checks = [c for acc in accs for c in acc.checks()]
    if criteria.metric is not None:
        checks.append(_user_check(reference, candidate, criteria))
    outputs = {
        a.view.output: a.energy.result() for a in accs if a.view.axis is None and a.energy.count
    }
    return FidelityResult(checks, len(reference), outputs)


def _user_check(reference: Runs, candidate: Runs, criteria: FidelityCriteria) -> Check:
    names = list(reference[0]) if reference else []
    ref = {n: [run[n] for run in reference] for n in names}
    cand = {n: [run[n] for run in candidate] for n in names}
    assert criteria.metric is not None
    label = criteria.metric_name or getattr(criteria.metric, "__name__", "metric")
    try:
        verdict = criteria.metric(ref, cand)
    except Exception as e:  # the user's code: report it as theirs
        raise InputError(f"metric {label} raised {type(e).__name__}: {e}") from e
    score: float | None = None
    if isinstance(verdict, tuple):
        if len(verdict) != 2:
            raise InputError(f"metric {label} must return a bool or (bool, score)")
        verdict, score = verdict[0], float(verdict[1])
    if not isinstance(verdict, (bool, np.bool_)):
        raise InputError(
            f"metric {label} returned {type(verdict).__name__}; expected a bool or (bool, score)"
        )
    return Check(label, "metric", score, None, bool(verdict))


def load_metric(spec: str) -> Metric:
    """Imports a user metric from ``package.module:function``.

    Raises:
        InputError: The spec is malformed, cannot be imported, or is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad metric '{spec}': expected package.module:function")
    try:
        fn = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise InputError(f"metric {spec}: cannot import it: {e}") from None
    if not callable(fn):
        raise InputError(f"metric {spec}: not callable")
    return fn
