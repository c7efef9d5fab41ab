"""Search the largest pruning sparsity whose top-1 drop stays within an accuracy budget.

``--prune channels:auto --max-accuracy-drop 1.0 --eval-data test.npz --labels label``
compiles pruned fp32 candidates into a temporary folder, evaluates each against the
unpruned model and keeps the largest sparsity whose drop (percentage points) fits.

Accuracy is not perfectly monotone in sparsity (digits: 83.6% at channels:0.3, 81.9% at
0.5 but 65.8% vs 93.3% with ``:compensate``), so bisection is a heuristic: it assumes that
a sparsity within budget makes every smaller one fit too. Every tried point is recorded.

On an executor of several workers each round evaluates, besides the bisection's next
point, the points the following steps would try (the next levels of the bisection tree,
the "fits" side first), and then walks the tree as the sequential search would: the
points it steps on, and so the result, are the sequential search's; the others are
dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import InputError
from onnxq.evaluate import evaluate
from onnxq.executor import Executor
from onnxq.prune_spec import PruneSpec

__all__ = ["AUTO", "SearchResult", "is_auto", "search_sparsity"]

logger = logging.getLogger(__name__)

AUTO = "auto"
SEARCHABLE = ("channels", "unstructured")
# Drops are differences of fractions times 100: 0.2 points can come out as 0.2000000001.
_EPS = 1e-9


@dataclasses.dataclass
class SearchResult:
    """What the sparsity search found.

    Attributes:
        sparsity: The largest tried sparsity within budget (0.0: none fits, do not prune).
        spec: The ``--prune`` request to compile with, or ``None`` when ``sparsity`` is 0.
        accuracy_fp32: Top-1 of the unpruned model on the eval data (fraction in [0, 1]).
        accuracy_pruned: Top-1 of the chosen pruned model (the fp32 one when none fits).
        drop_points: ``100 * (accuracy_fp32 - accuracy_pruned)``.
        max_drop_points: The budget.
        tried: ``(sparsity, top1)`` of every candidate, in the order tried.
    """

    sparsity: float
    spec: str | None
    accuracy_fp32: float
    accuracy_pruned: float
    drop_points: float
    max_drop_points: float
    tried: list[tuple[float, float]]

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as JSON-ready values (``tried`` as lists of two numbers)."""
        d = dataclasses.asdict(self)
        d["tried"] = [list(point) for point in self.tried]
        return d


def is_auto(spec_text: str | None) -> bool:
    """Whether a ``--prune`` request asks for the sparsity to be searched (``kind:auto``)."""
    return bool(spec_text) and AUTO in spec_text.strip().split(":")[1:2]


def _spec_template(spec_text: str) -> Callable[[float], str]:
    """Returns ``sparsity -> spec text`` for a ``kind:auto[:options]`` request.

    Raises:
        InputError: Not an ``auto`` request of a searchable kind.
    """
    kind, *rest = spec_text.strip().split(":")
    if kind not in SEARCHABLE or not rest or rest[0] != AUTO:
        raise InputError(
            f"'{spec_text}': the sparsity can only be searched as "
            f"{' or '.join(f'{k}:auto[:options]' for k in SEARCHABLE)}"
        )

    def spec_for(sparsity: float) -> str:
        return ":".join([kind, f"{sparsity:.4g}", *rest[1:]])

    return spec_for


def _check_request(
    labels_key: str, max_drop_points: float, low: float, high: float, steps: int
) -> None:
    if not labels_key:
        raise InputError("the sparsity search needs labels: name their key in the eval data")
    if not 0 <= max_drop_points <= 100:  # (NaN fails it too: it would accept any drop)
        raise InputError(
            f"the accuracy budget must be >= 0 points (at most 100), got {max_drop_points:g}"
        )
    if not 0 <= low < high < 1:
        raise InputError(f"the sparsity range must satisfy 0 <= low < high < 1, got {low}, {high}")
    if steps < 1:
        raise InputError(f"the search needs at least 1 step, got {steps}")


class _Evaluator:
    """Compiles one pruned fp32 candidate and returns its top-1 and the unpruned model's.

    It travels to executor workers: each candidate is compiled into its own temporary
    folder, so candidates evaluated at once never share a file.
    """

    def __init__(
        self,
        input_path: str | os.PathLike,
        eval_data: str | os.PathLike,
        labels_key: str,
        config: CompileConfig,
        compensate: bool,
    ):
        self.input_path = input_path
        self.eval_data = eval_data
        self.labels_key = labels_key
        self.config = config
        # Only bias compensation reads the calibration data: otherwise it is not opened.
        self.calibration = config.calibration if compensate else None

    def __call__(self, spec: str) -> tuple[float, float, bool]:
        with tempfile.TemporaryDirectory(prefix="onnxq-prune-search-") as tmp:
            return self._evaluate(spec, Path(tmp) / "candidate.onnx")

    def _evaluate(self, spec: str, candidate: Path) -> tuple[float, float, bool]:
        config = CompileConfig(
            quantize=False,
            prune=spec,
            prune_exclude=self.config.prune_exclude,
            calibration=self.calibration,
            batch_size=self.config.batch_size,
            max_samples=self.config.max_samples,
            provider=self.config.provider,
        )
        report = compile_model(self.input_path, candidate, config).to_dict()
        accuracy = evaluate(
            self.input_path,
            candidate,
            self.eval_data,
            labels_key=self.labels_key,
            provider=self.config.provider,
        ).accuracy
        return accuracy["reference"]["top1"], accuracy["candidate"]["top1"], _removed(report)


def _evaluate(spec: str, evaluator: _Evaluator) -> tuple[float, float, bool]:
    """An executor task: one candidate's (fp32 top-1, pruned top-1, removed anything)."""
    return evaluator(spec)


def _removed(report: dict[str, Any]) -> bool:
    """Whether a pruned compile removed anything (channel pruning rounds kept channels)."""
    channels = (report.get("pruning") or {}).get("PruneChannelsPass")
    if channels is None:
        return True  # weight pruning at a sparsity above 0 always zeroes weights
    return any(before != after for before, after in channels.get("layers", {}).values())


def search_sparsity(
    input_path: str | os.PathLike,
    spec_text: str,
    eval_data: str | os.PathLike,
    labels_key: str,
    max_drop_points: float,
    config: CompileConfig,
    *,
    low: float = 0.0,
    high: float = 0.9,
    steps: int = 6,
    executor: Executor | None = None,
) -> SearchResult:
    """Bisects the sparsity of ``spec_text`` (``kind:auto[:options]``) within a top-1 budget.

    Each step compiles ``input_path`` pruned (fp32, no quantization) at the midpoint of the
    current interval, evaluates top-1 against the unpruned model, and moves up when the
    drop fits ``max_drop_points`` and down otherwise. ``steps`` compiles in all: the
    resolution is ``(high - low) / 2**steps``.

    Args:
        input_path: The unpruned model.
        spec_text: A ``--prune`` request with ``auto`` as its sparsity, e.g.
            ``channels:auto:compensate``.
        eval_data: ``.npz`` keyed by the model's input names, plus integer labels.
        labels_key: Key of the labels in ``eval_data``.
        max_drop_points: Largest allowed top-1 drop, in percentage points.
        config: The compile configuration: ``prune_exclude``, ``provider``, batch size and
            (with ``:compensate``) the calibration data are used.
        low: Smallest sparsity considered.
        high: Largest sparsity considered (below 1).
        steps: Candidates compiled and evaluated.
        executor: Evaluates the points of the next steps at once on its workers (see
            the module docstring); the result is the sequential search's. Default: one
            candidate at a time in this process.

    Returns:
        The largest tried sparsity within budget, or sparsity 0 (with a logged warning)
        when none fits.

    Raises:
        InputError: A bad request, budget or range, or unusable eval data.
    """
    _check_request(labels_key, max_drop_points, low, high, steps)
    spec_for = _spec_template(spec_text)
    # Parsed once up front: bad options fail before anything is compiled.
    compensate = PruneSpec.parse(spec_for(high), exclude=config.prune_exclude).compensate
    tried: list[tuple[float, float]] = []
    # Sparsities whose compile removed nothing (kept channels round up to whole blocks).
    empty: set[float] = set()
    fp32 = 0.0
    evaluator = _Evaluator(input_path, eval_data, labels_key, config, compensate)
    width = executor.workers if executor is not None else 1
    shared = (executor.put(evaluator),) if executor is not None and width > 1 else ()
    known: dict[float, tuple[float, float, bool]] = {}
    for step in range(steps):
        sparsity = round((low + high) / 2, 4)
        if sparsity not in known:
            # This point and the ones the next steps may try, at once: only those the
            # walk steps on are used, so the result is the sequential search's.
            ahead = _points_ahead(low, high, min(width, 2 ** (steps - step) - 1))
            if shared:
                assert executor is not None
                outcomes = executor.map(_evaluate, [spec_for(p) for p in ahead], shared=shared)
            else:
                outcomes = [evaluator(spec_for(p)) for p in ahead]
            known = dict(zip(ahead, outcomes, strict=True))
        fp32, top1, removed = known[sparsity]
        tried.append((sparsity, top1))
        if not removed:
            empty.add(sparsity)
        fits = 100.0 * (fp32 - top1) <= max_drop_points + _EPS
        logger.info(
            "prune search: %s top-1 %.4f (fp32 %.4f) %s",
            spec_for(sparsity),
            top1,
            fp32,
            "fits" if fits else "over budget",
        )
        low, high = (sparsity, high) if fits else (low, sparsity)
    return _result(tried, fp32, max_drop_points, spec_for, empty)


def _points_ahead(low: float, high: float, count: int) -> list[float]:
    """The first ``count`` points of the bisection tree below ``[low, high]``.

    Level by level, the "fits" (higher) side first: the midpoint, then the next step's
    two, and so on.
    """
    points: list[float] = []
    level = [(low, high)]
    while len(points) < count:
        below = []
        for lo, hi in level:
            mid = round((lo + hi) / 2, 4)
            points.append(mid)
            below += [(mid, hi), (lo, mid)]
        level = below
    return points[:count]


def _result(
    tried: list[tuple[float, float]],
    fp32: float,
    max_drop_points: float,
    spec_for: Callable[[float], str],
    empty: set[float] = frozenset(),
) -> SearchResult:
    """The largest tried sparsity within budget (not the last one: accuracy is not monotone)."""
    fitting = [(s, top1) for s, top1 in tried if 100.0 * (fp32 - top1) <= max_drop_points + _EPS]
    if not fitting:
        logger.warning(
            "prune search: no tried sparsity keeps the top-1 drop within %g points (smallest "
            "tried %g); the model is not pruned",
            max_drop_points,
            min(s for s, _ in tried),
        )
        sparsity, top1, spec = 0.0, fp32, None
    else:
        sparsity, top1 = max(fitting)
        spec = spec_for(sparsity)
        if sparsity in empty:
            # Said, not silent: a "found" sparsity that prunes nothing is no result.
            logger.warning(
                "prune search: the largest sparsity within budget (%g) removes nothing from "
                "this model (kept channels round up to whole blocks); the model is not pruned",
                sparsity,
            )
            sparsity, top1, spec = 0.0, fp32, None
    return SearchResult(
        sparsity=sparsity,
        spec=spec,
        accuracy_fp32=fp32,
        accuracy_pruned=top1,
        drop_points=round(100.0 * (fp32 - top1), 6),
        max_drop_points=max_drop_points,
        tried=tried,
    )
