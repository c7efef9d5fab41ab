"""Release gate: judges a candidate model against thresholds on accuracy, fidelity and speed."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import numpy as np

from onnxq.bench import benchmark
from onnxq.bootstrap import bootstrap_median, ci95
from onnxq.config import check_number, read_pyproject_section
from onnxq.errors import InputError
from onnxq.evaluate import evaluate

__all__ = [
    "EVAL_BATCH_SIZE",
    "Thresholds",
    "judge_interval",
    "load_config",
    "resolve_thresholds",
    "run_gate",
]

logger = logging.getLogger(__name__)

# Accuracy and fidelity do not depend on the batch size, so they run in larger batches than
# the latency measurement (whose batch size is the deployment's).
EVAL_BATCH_SIZE = 32
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Gate thresholds; ``None`` leaves a criterion unchecked.

    Attributes:
        max_accuracy_drop: Largest allowed top-1 drop, in percentage points (needs labels).
        min_sqnr: Smallest allowed SQNR in dB, over all outputs (the worst output counts).
        min_speedup: Smallest allowed speedup, reference median / candidate median latency.
        max_latency_ms: Largest allowed median latency of the candidate, in milliseconds.
    """

    max_accuracy_drop: float | None = None
    min_sqnr: float | None = None
    min_speedup: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        # Every entry point (flags, [tool.onnxq.gate], the API) builds this class, so a
        # threshold that would make its check vacuous or meaningless is refused here.
        domains = {
            "max_accuracy_drop": {"low": 0, "high": 100},
            "min_sqnr": {},
            "min_speedup": {"low": 0, "open_low": True},
            "max_latency_ms": {"low": 0, "open_low": True},
        }
        for name, domain in domains.items():
            value = getattr(self, name)
            if value is not None:
                check_number(f"gate threshold {name.replace('_', '-')}", value, **domain)

    def is_empty(self) -> bool:
        """Tells whether no threshold is set."""
        return all(v is None for v in dataclasses.asdict(self).values())


_KEYS = tuple(f.name for f in dataclasses.fields(Thresholds))


def load_config(path: str | os.PathLike = "pyproject.toml") -> dict[str, float]:
    """Reads thresholds from ``[tool.onnxq.gate]`` of a ``pyproject.toml`` (if it exists).

    Keys may be written ``min-sqnr`` or ``min_sqnr``.

    Raises:
        InputError: The file is not valid TOML, a key is unknown, or a value is not a number.
    """
    section = read_pyproject_section(path, ("tool", "onnxq", "gate"))
    config = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in _KEYS:
            raise InputError(
                f"{path}: unknown key '{key}' in [tool.onnxq.gate]; known: "
                f"{', '.join(k.replace('_', '-') for k in _KEYS)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path}: [tool.onnxq.gate] {key} must be a number, got {value!r}")
        config[name] = float(value)
    return config


def resolve_thresholds(
    flags: Mapping[str, float | None], config_path: str | os.PathLike = "pyproject.toml"
) -> Thresholds:
    """Merges thresholds from the config file with command-line flags (flags win).

    Raises:
        InputError: The config is bad, or no threshold is set at all.
    """
    merged = load_config(config_path)
    merged.update({k: v for k, v in flags.items() if v is not None})
    thresholds = Thresholds(**merged)
    if thresholds.is_empty():
        raise InputError("no gate thresholds: set at least one of " + ", ".join(_KEYS))
    return thresholds


def judge_interval(lo: float, hi: float, threshold: float, *, higher_is_better: bool) -> str:
    """Judges a 95% confidence interval against a threshold.

    Returns ``pass`` when the whole interval meets the threshold, ``fail`` when the whole
    interval misses it, and ``inconclusive`` when the interval straddles it.
    """
    good, bad = (
        (lo >= threshold, hi < threshold) if higher_is_better else (hi <= threshold, lo > threshold)
    )
    return PASS if good else FAIL if bad else INCONCLUSIVE


def _check(name: str, status: str, value: float, threshold: float, message: str, **extra) -> dict:
    return {
        "name": name,
        "status": status,
        "value": value,
        "threshold": threshold,
        "message": message,
        **extra,
    }


def _point_check(
    name: str, value: float, threshold: float, *, higher_is_better: bool, what: str
) -> dict:
    ok = value >= threshold if higher_is_better else value <= threshold
    sign = ">=" if higher_is_better else "<="
    return _check(
        name,
        PASS if ok else FAIL,
        value,
        threshold,
        f"{what} {value:.4g} {'' if ok else 'not '}{sign} {threshold:g}",
    )


def _interval_check(
    name: str,
    replicates: np.ndarray,
    value: float,
    threshold: float,
    *,
    higher_is_better: bool,
    what: str,
) -> dict:
    lo, hi = ci95(replicates)
    status = judge_interval(lo, hi, threshold, higher_is_better=higher_is_better)
    holds = replicates >= threshold if higher_is_better else replicates <= threshold
    probability = float(np.mean(holds))
    sign = ">=" if higher_is_better else "<="
    message = (
        f"{what} {value:.4g}, 95% CI [{lo:.4g}, {hi:.4g}], needs {sign} {threshold:g}; "
        f"P(holds) ~ {probability:.2f} (bootstrap)"
    )
    if status == INCONCLUSIVE:
        message = (
            "inconclusive (counts as failure): " + message + "; rerun with a longer time budget"
        )
    return _check(name, status, value, threshold, message, ci95=[lo, hi], probability=probability)


def _accuracy_checks(thresholds: Thresholds, ev: dict) -> list[dict]:
    checks = []
    if thresholds.max_accuracy_drop is not None:
        drop = ev["accuracy"]["top1_drop_points"]
        checks.append(
            _point_check(
                "max_accuracy_drop",
                drop,
                thresholds.max_accuracy_drop,
                higher_is_better=False,
                what="top-1 drop (points)",
            )
        )
    if thresholds.min_sqnr is not None:
        checks.append(
            _point_check(
                "min_sqnr",
                ev["min_sqnr_db"],
                thresholds.min_sqnr,
                higher_is_better=True,
                what="worst-output SQNR dB",
            )
        )
    return checks


def _latency_checks(
    thresholds: Thresholds, bench, reference: str, candidate: str, batch: int, provider: str
) -> list[dict]:
    cand = bench.find(candidate, batch, provider)
    checks = []
    if thresholds.min_speedup is not None:
        base = float(np.median(bench.find(reference, batch, provider).samples_ms))
        speedup = base / float(np.median(cand.samples_ms))
        checks.append(
            _interval_check(
                "min_speedup",
                bench.speedup_replicates(cand),
                speedup,
                thresholds.min_speedup,
                higher_is_better=True,
                what="speedup",
            )
        )
    if thresholds.max_latency_ms is not None:
        reps = bootstrap_median(cand.samples_ms, seed=bench.seed)
        checks.append(
            _interval_check(
                "max_latency_ms",
                reps,
                float(np.median(cand.samples_ms)),
                thresholds.max_latency_ms,
                higher_is_better=False,
                what="candidate p50 ms",
            )
        )
    return checks


def run_gate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    data: str | os.PathLike,
    thresholds: Thresholds,
    *,
    labels_key: str | None = None,
    batch_size: int = 1,
    provider: str = "cpu",
    time_budget: float = 5.0,
    per_layer: bool = False,
    seed: int = 0,
) -> dict:
    """Evaluates and (when a latency threshold is set) benchmarks, then judges every threshold.

    Accuracy and SQNR are exact on the data set and judged as points. Latency thresholds are
    judged on bootstrap 95% confidence intervals: ``pass`` when the whole interval meets the
    threshold, ``fail`` when it misses it entirely, ``inconclusive`` when it straddles it. The
    gate passes only when every check is ``pass``: an inconclusive speed claim is not proven,
    so CI fails rather than waves it through; the report gives the interval and the bootstrap
    probability that the threshold holds, so a rerun with a longer time budget can settle it.

    Returns:
        ``{"kind": "gate", "status": "pass"|"fail", "reference", "candidate", "thresholds",
        "checks": [{name, status, value, threshold, message, ci95?, probability?}],
        "summary", "eval": EvalResult dict or None, "bench": BenchResult dict or None}``.

    Raises:
        InputError: An accuracy threshold without labels, or bad models or data.
    """
    if thresholds.max_accuracy_drop is not None and not labels_key:
        raise InputError("--max-accuracy-drop needs labels: give --labels KEY of the data file")
    reference, candidate = str(reference), str(candidate)
    checks: list[dict] = []
    ev = bench = None
    if thresholds.max_accuracy_drop is not None or thresholds.min_sqnr is not None or per_layer:
        ev = evaluate(
            reference,
            candidate,
            data,
            labels_key=labels_key,
            batch_size=EVAL_BATCH_SIZE,
            per_layer=per_layer,
            provider=provider,
        ).to_dict()
        checks += _accuracy_checks(thresholds, ev)
    if thresholds.min_speedup is not None or thresholds.max_latency_ms is not None:
        bench = benchmark(
            [reference, candidate],
            provider=provider,
            batch_sizes=(batch_size,),
            data=data,
            max_time=time_budget,
            seed=seed,
        )
        checks += _latency_checks(thresholds, bench, reference, candidate, batch_size, provider)
    failed = [c for c in checks if c["status"] != PASS]
    status = FAIL if failed else PASS
    summary = f"{len(checks) - len(failed)} of {len(checks)} checks pass" + (
        f"; not passing: {', '.join(c['name'] for c in failed)}" if failed else ""
    )
    for c in checks:
        logger.info("gate %s: %s: %s", c["name"], c["status"], c["message"])
    return {
        "kind": "gate",
        "status": status,
        "reference": reference,
        "candidate": candidate,
        "thresholds": dataclasses.asdict(thresholds),
        "checks": checks,
        "summary": summary,
        "eval": ev,
        "bench": None if bench is None else bench.to_dict(),
    }
