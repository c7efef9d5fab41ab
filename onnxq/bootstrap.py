"""Bootstrap confidence intervals of latency medians, paired speedups and accuracies."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "N_BOOTSTRAP",
    "bootstrap_median",
    "bootstrap_proportion",
    "bootstrap_speedup",
    "ci95",
]

# Bootstrap replicates: enough for stable 2.5/97.5 percentiles, cheap next to the runs.
N_BOOTSTRAP = 2000
# Index elements per bootstrap chunk (8 bytes each): bounds memory on long runs.
BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def ci95(replicates: np.ndarray) -> tuple[float, float]:
    """Returns the 2.5th and 97.5th percentiles of bootstrap replicates."""
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return float(lo), float(hi)


def _bootstrap(
    columns: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], seed: int, n_boot: int
) -> np.ndarray:
    """Resamples rows (the same indices for every column) and applies ``statistic`` per replicate.

    Replicates are drawn in chunks so long runs do not need an ``n_boot x n`` index matrix.
    """
    n = min(c.size for c in columns)
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(n, 1))
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out.append(statistic(*(c[:n][idx] for c in columns)))
    return np.concatenate(out)


def bootstrap_median(
    samples: np.ndarray, *, seed: int = 0, n_boot: int = N_BOOTSTRAP
) -> np.ndarray:
    """Returns bootstrap replicates of the median of ``samples`` (seeded, reproducible)."""
    samples = np.asarray(samples, dtype=np.float64)
    return _bootstrap([samples], lambda s: np.median(s, axis=1), seed, n_boot)


def bootstrap_speedup(
    first: np.ndarray, other: np.ndarray, *, seed: int = 0, n_boot: int = N_BOOTSTRAP
) -> np.ndarray:
    """Returns bootstrap replicates of ``median(first) / median(other)``.

    Rounds are resampled as pairs (the same round indices for both models) because the two
    runs of one round saw the same machine state; that keeps the ratio honest under drift.
    """
    columns = [np.asarray(first, dtype=np.float64), np.asarray(other, dtype=np.float64)]
    return _bootstrap(
        columns, lambda a, b: np.median(a, axis=1) / np.median(b, axis=1), seed, n_boot
    )


def bootstrap_proportion(
    hits: int, total: int, *, seed: int = 0, n_boot: int = N_BOOTSTRAP
) -> np.ndarray:
    """Returns bootstrap replicates of a proportion such as top-1 accuracy, ``hits / total``.

    Resampling ``total`` hit-or-miss samples with replacement draws each one a hit with
    probability ``hits / total``, so a replicate's hit count is Binomial(total, hits / total):
    the same distribution as resampling the samples themselves, without keeping them.

    Raises:
        ValueError: ``total`` is not positive or ``hits`` is outside ``[0, total]``.
    """
    if total <= 0 or not 0 <= hits <= total:
        raise ValueError(f"need 0 <= hits <= total and total > 0, got {hits} of {total}")
    rng = np.random.default_rng(seed)
    return rng.binomial(total, hits / total, size=n_boot) / total
