"""Streaming per-tensor statistics (min/max, histogram) and the range methods computed from them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxq.errors import InputError

__all__ = [
    "DEFAULT_NUM_BINS",
    "METHODS",
    "TensorStats",
    "check_method",
    "compute_range",
    "merge_stats",
]

logger = logging.getLogger(__name__)

DEFAULT_NUM_BINS = 2048

# The entropy search scans about this many thresholds before refining around the best.
_COARSE_CANDIDATES = 256

# Bin indices are exact integers in float64 only below 2**53; keep far from that.
_MAX_ABS_INDEX = 2.0**40


class TensorStats:
    """Running statistics of one tensor's values over all calibration batches.

    The histogram has a fixed number of bins whose edges are integer multiples of a
    power-of-two width ``2**exponent``. Zero is therefore always a bin edge, and when a batch
    exceeds the covered range the width doubles (as often as needed): every old bin then
    falls exactly into one new bin, so re-binning never approximates and no raw values are
    kept. The observed range always spans more than a quarter of the bins (more than half
    unless the grid alignment is unlucky).

    With ``num_bins=0`` only count, min and max are kept: all the ``minmax`` method needs,
    at a fraction of the cost.

    Statistics of consecutive parts of the data merge exactly (`merge_stats`): the final
    width and offset depend only on the first batch's min and max and on the overall min
    and max (see `merge_stats`), so with ``mergeable=True`` the first batch's are kept.

    Attributes:
        num_bins: Number of histogram bins (0: no histogram).
        count: Number of finite values seen.
        zero_count: Number of exact zeros seen (e.g. after ReLU); they are in bin ``[0, width)``.
        nan_count: Number of NaN values seen (excluded from everything else).
        inf_count: Number of +-Inf values seen (excluded from everything else).
        min: Smallest finite value seen (``inf`` before any).
        max: Largest finite value seen (``-inf`` before any).
        hist: Bin counts (int64), or ``None`` before the first finite value.
        exponent: Bin width is ``2.0**exponent``.
        offset: Index of the first bin: bin ``i`` covers
            ``[(offset + i) * width, (offset + i + 1) * width)``.
        first: With ``mergeable``, the finite ``(min, max)`` of the first batch that had
            finite values (else None).
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, *, mergeable: bool = False) -> None:
        if num_bins != 0 and (num_bins < 16 or num_bins % 2):
            raise InputError(f"num_bins must be 0 or an even number >= 16, got {num_bins}")
        self.num_bins = num_bins
        self.count = 0
        self.zero_count = 0
        self.nan_count = 0
        self.inf_count = 0
        self.min = math.inf
        self.max = -math.inf
        self.hist: np.ndarray | None = None
        self.exponent = 0
        self.offset = 0
        self.mergeable = mergeable
        self.first: tuple[float, float] | None = None

    def __repr__(self) -> str:
        return (
            f"TensorStats(count={self.count}, min={self.min:.6g}, max={self.max:.6g}, "
            f"nan={self.nan_count}, inf={self.inf_count}, bins={self.num_bins}, "
            f"width=2**{self.exponent})"
        )

    @property
    def width(self) -> float:
        """Width of one histogram bin."""
        return 2.0**self.exponent

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges (float64)."""
        return (self.offset + np.arange(self.num_bins + 1, dtype=np.float64)) * self.width

    def update(self, values: np.ndarray) -> None:
        """Adds a batch of values (any shape, float) to the statistics."""
        x = np.asarray(values)
        if x.dtype != np.float32 and x.dtype != np.float64:
            # float16/bfloat16 arithmetic is slow and imprecise; float32 holds them exactly.
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        # min/max propagate NaN and show Inf, so the costly mask is only built when needed.
        if not (math.isfinite(lo) and math.isfinite(hi)):
            x, lo, hi = self._drop_nonfinite(x)
            if x.size == 0:
                return
        if self.mergeable and self.first is None:
            self.first = (lo, hi)
        self.count += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if not self.num_bins:
            return
        self.zero_count += x.size - int(np.count_nonzero(x))
        self._fit_range(lo, hi)
        inv_width = 2.0 ** (-self.exponent)
        if self.exponent < -100:
            # 2**-exponent would overflow float32; such tiny widths are computed in float64.
            x = x.astype(np.float64)
        # Scaling by a power of two and flooring are exact, so indices match the edges exactly.
        idx = np.floor(x * x.dtype.type(inv_width)).astype(np.int64)
        idx -= self.offset
        self.hist += np.bincount(idx, minlength=self.num_bins)[: self.num_bins]

    def _drop_nonfinite(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        nan = np.isnan(x)
        inf = np.isinf(x)
        self.nan_count += int(nan.sum())
        self.inf_count += int(inf.sum())
        x = x[~(nan | inf)]
        if x.size == 0:
            return x, math.nan, math.nan
        return x, float(x.min()), float(x.max())

    def _fits(self, exponent: int, lo: float, hi: float) -> bool:
        width = 2.0**exponent
        return math.floor(hi / width) - math.floor(lo / width) < self.num_bins

    def _fit_range(self, lo: float, hi: float) -> None:
        """Makes the histogram cover ``[lo, hi]``, growing the bin width if needed."""
        if self.hist is None:
            self.exponent = self._initial_exponent(lo, hi)
            self.offset = math.floor(lo / self.width)
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
            return
        width = self.width
        if self.offset * width <= lo and hi < (self.offset + self.num_bins) * width:
            return
        # Only occupied bins must survive, and they all lie between the old min and max.
        lo, hi = min(lo, self.min), max(hi, self.max)
        # The same width with a shifted offset may do; else double until everything fits.
        exponent = self.exponent
        while not self._fits(exponent, lo, hi):
            exponent += 1
        self._rebin(exponent, lo)

    def _initial_exponent(self, lo: float, hi: float) -> int:
        span = hi - lo
        if span > 0:
            exponent = math.floor(math.log2(span / self.num_bins))
        else:
            # A constant so far: pick a fine width so later data still gets resolution.
            magnitude = max(abs(lo), 1e-30)
            exponent = math.floor(math.log2(magnitude)) - 24
        largest = max(abs(lo), abs(hi), 1e-300)
        exponent = max(exponent, math.ceil(math.log2(largest / _MAX_ABS_INDEX)))
        while not self._fits(exponent, lo, hi):
            exponent += 1
        return exponent

    def _rebin(self, exponent: int, lo: float) -> None:
        """Shifts and merges the bins into ``2**(exponent - self.exponent)`` wider ones, exactly."""
        new_offset = math.floor(lo / 2.0**exponent)
        occupied = np.nonzero(self.hist)[0]
        # Floor division by 2**k is an arithmetic right shift. k can exceed 63 (a tensor
        # constant, e.g. all 0, in the first batch gets a tiny width; later data widens it),
        # and 2**k then fits no int64; indices are below 2**62, so >> 63 already gives
        # their floor (0 or -1), as any larger k would.
        shift = min(exponent - self.exponent, 63)
        new_index = np.right_shift(self.offset + occupied, shift) - new_offset
        self.hist = _sum_by_index(self.hist[occupied], new_index, self.num_bins)
        self.exponent, self.offset = exponent, new_offset

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """Returns counts of ``|x|`` in bins ``[j * width, (j + 1) * width)`` and the width.

        Exact because zero is a bin edge: the negative bin ``k`` folds onto ``-k - 1``.
        """
        assert self.hist is not None
        index = self.offset + np.arange(self.num_bins, dtype=np.int64)
        folded = np.where(index < 0, -index - 1, index)
        size = int(folded.max()) + 1
        return _sum_by_index(self.hist, folded, size), self.width


def merge_stats(parts: Sequence[TensorStats]) -> TensorStats:
    """Statistics of consecutive parts of the data, as if collected in one pass.

    The result is bit for bit what one `TensorStats` fed the parts' batches in order
    holds, so every range method gives the same range. Why the width and offset can be
    rebuilt: the first batch sets the width (``2**e0``) and the offset; a later batch
    changes them only when it leaves the covered window, which always holds the range
    seen so far, and then the width becomes the least one >= the current that fits that
    range and the offset ``floor(min / width)``. Widths only grow and fitting is monotone,
    so the final width is the least one >= ``2**e0`` that fits the overall range, and the
    offset ``floor(overall min / width)`` (a later min inside the window lies in its first
    bin). Replaying the first batch's range and then the overall range through an empty
    histogram gives exactly that; each part's bins then fall exactly into the final ones.

    Args:
        parts: The parts' statistics in the order of the data, each made with
            ``mergeable=True`` and the same ``num_bins``.

    Returns:
        New, mergeable statistics; the parts are not changed.

    Raises:
        ValueError: No parts, different ``num_bins``, or a part not made mergeable.
    """
    if not parts:
        raise ValueError("merge_stats needs at least one part")
    num_bins = parts[0].num_bins
    if any(p.num_bins != num_bins for p in parts):
        raise ValueError("merge_stats: the parts have different num_bins")
    filled = [p for p in parts if p.count]
    if any(not p.mergeable for p in filled):
        raise ValueError("merge_stats: a part was not collected with mergeable=True")
    merged = TensorStats(num_bins, mergeable=True)
    for part in parts:
        merged.count += part.count
        merged.zero_count += part.zero_count
        merged.nan_count += part.nan_count
        merged.inf_count += part.inf_count
    if not filled:
        return merged
    merged.first = filled[0].first
    merged.min = min(p.min for p in filled)
    merged.max = max(p.max for p in filled)
    if not num_bins:
        return merged
    assert merged.first is not None
    merged._fit_range(*merged.first)  # the first batch: width 2**e0, its offset
    merged._fit_range(merged.min, merged.max)
    coarser = [p.exponent for p in filled if p.exponent > merged.exponent]
    if coarser:
        # A part whose own first batch was nearly constant, or ~2**40 widths from 0, can
        # start wider than the whole run: its bins cannot be split, so the merge widens to
        # them, close to but not exactly the one-pass histogram.
        logger.warning(
            "merging calibration statistics: a part's bins are wider (2**%d) than one pass "
            "makes them (2**%d); the merged histogram is close to, not exactly, one pass's",
            max(coarser),
            merged.exponent,
        )
        exponent = max(coarser)
        while not merged._fits(exponent, merged.min, merged.max):
            exponent += 1
        merged._rebin(exponent, merged.min)
    assert merged.hist is not None
    for part in filled:
        assert part.hist is not None
        occupied = np.nonzero(part.hist)[0]
        index = np.right_shift(part.offset + occupied, min(merged.exponent - part.exponent, 63))
        merged.hist += _sum_by_index(part.hist[occupied], index - merged.offset, num_bins)
    return merged


def _sum_by_index(counts: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    np.add.at(out, index, counts)
    return out


# ---------------------------------------------------------------------------------------------
# Range methods. Each takes the stats and keyword parameters and returns (lo, hi) before the
# common post-processing (clamp into [min, max], include 0).


def _minmax(stats: TensorStats) -> tuple[float, float]:
    return stats.min, stats.max


def _quantile(stats: TensorStats, q: float) -> float:
    """Value below which a fraction ``q`` of the values lie, interpolated inside the bin."""
    assert stats.hist is not None
    cumulative = np.cumsum(stats.hist)
    target = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, target, side="left"))
    i = min(i, stats.num_bins - 1)
    before = cumulative[i - 1] if i > 0 else 0
    inside = stats.hist[i]
    fraction = (target - before) / inside if inside else 0.0
    value = (stats.offset + i + fraction) * stats.width
    return min(max(value, stats.min), stats.max)


def _abs_quantile(stats: TensorStats, q: float) -> float:
    hist, width = stats.abs_histogram()
    cumulative = np.cumsum(hist)
    target = q * cumulative[-1]
    j = min(int(np.searchsorted(cumulative, target, side="left")), hist.size - 1)
    before = cumulative[j - 1] if j > 0 else 0
    fraction = (target - before) / hist[j] if hist[j] else 0.0
    return min((j + fraction) * width, max(abs(stats.min), abs(stats.max)))


def _percentile(
    stats: TensorStats, percentile: float = 99.999, symmetric: bool = False
) -> tuple[float, float]:
    if not 50.0 < percentile <= 100.0:
        raise InputError(f"percentile must be in (50, 100], got {percentile}")
    q = percentile / 100.0
    if symmetric:
        t = _abs_quantile(stats, q)
        return -t, t
    return _quantile(stats, 1.0 - q), _quantile(stats, q)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalized histograms.

    Where p has mass and q has none, q gets a tiny mass instead of making the divergence
    infinite. Unlike ORT's smoothing this touches only those bins, so long empty tails
    (common in activation histograms) cannot push other bins negative.
    """
    mask = p > 0
    p = p[mask] / p.sum()
    q = q[mask]
    if q.sum() == 0:
        return math.inf
    q = np.where(q == 0, 1e-4 * q.sum() / q.size, q)
    q = q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _entropy_threshold(hist: np.ndarray, num_quantized_bins: int) -> int:
    """Number of leading bins of ``hist`` minimizing KL(reference || quantized)."""
    hist = hist.astype(np.float64)
    nonzero = np.nonzero(hist)[0]
    n = int(nonzero[-1]) + 1 if nonzero.size else 0
    # Candidates keep at least num_quantized_bins bins of occupied range: for data far from
    # zero, a shorter one folds everything into one bin and scores a meaningless KL of 0.
    start = num_quantized_bins + (int(nonzero[0]) if nonzero.size else 0)
    if n <= start:
        return max(n, 1)
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])

    def best_of(candidates: range) -> int:
        divergences = [
            _threshold_divergence(hist, suffix, i, num_quantized_bins) for i in candidates
        ]
        return candidates[int(np.argmin(divergences))]

    # Coarse to fine: the divergence varies slowly with the threshold, so a strided scan
    # followed by a full scan around its best costs a fraction of scanning every bin.
    stride = max(1, (n - start) // _COARSE_CANDIDATES)
    best = best_of(range(start, n + 1, stride))
    if stride == 1:
        return best
    return best_of(range(max(start, best - stride + 1), min(n, best + stride - 1) + 1))


def _threshold_divergence(hist: np.ndarray, suffix: np.ndarray, i: int, levels: int) -> float:
    """KL divergence of clipping ``hist`` after ``i`` bins and quantizing to ``levels``."""
    sliced = hist[:i]
    reference = sliced.copy()
    reference[-1] += suffix[i]
    # Group sizes differ by at most one bin, so no quantized bin swallows a remainder.
    starts = np.arange(levels) * i // levels
    group = np.arange(i) * levels // i
    used = sliced != 0
    group_sum = np.add.reduceat(sliced, starts)
    group_used = np.add.reduceat(used.astype(np.float64), starts)
    # Each quantized bin's mass is spread over the source bins that were non-empty.
    share = np.divide(group_sum, group_used, out=np.zeros_like(group_sum), where=group_used > 0)
    return _kl_divergence(reference, np.where(used, share[group], 0.0))


def _entropy(stats: TensorStats, num_quantized_bins: int | None = None) -> tuple[float, float]:
    # One-signed data gets all 256 levels on its side; signed data 128 per side.
    one_signed = stats.min >= 0 or stats.max <= 0
    levels = num_quantized_bins or (256 if one_signed else 128)
    if levels < 2:
        raise InputError(f"num_quantized_bins must be >= 2, got {levels}")
    hist, width = stats.abs_histogram()
    # Zero is exactly representable, so exact zeros cost nothing; left in, the spike that
    # ReLU leaves at zero dominates the divergence and drives the threshold to its minimum.
    hist[0] -= stats.zero_count
    t = _entropy_threshold(hist, levels) * width
    return -t, t


def _mse(stats: TensorStats, bits: int = 8, num_candidates: int = 256) -> tuple[float, float]:
    """Shrinks ``[min, max]`` by the factor that minimizes the expected quantization MSE.

    Values inside the range are assumed uniform within a step (error ``step**2 / 12``);
    clipped values cost their squared distance to the range end (bin centers).
    """
    if bits < 2 or num_candidates < 1:
        raise InputError(
            f"mse needs bits >= 2 and num_candidates >= 1, got {bits} and {num_candidates}"
        )
    assert stats.hist is not None
    lo0, hi0 = min(stats.min, 0.0), max(stats.max, 0.0)
    centers = (stats.offset + np.arange(stats.num_bins) + 0.5) * stats.width
    counts = stats.hist.astype(np.float64)
    scale = np.arange(1, num_candidates + 1, dtype=np.float64)[:, None] / num_candidates
    lo, hi = lo0 * scale, hi0 * scale
    step = (hi - lo) / (2**bits - 1)
    clipped = np.clip(centers[None, :], lo, hi)
    inside = (centers[None, :] >= lo) & (centers[None, :] <= hi)
    error = np.where(inside, step**2 / 12.0, (centers[None, :] - clipped) ** 2)
    best = int(np.argmin(error @ counts))
    return float(lo[best, 0]), float(hi[best, 0])


METHODS: dict[str, Callable[..., tuple[float, float]]] = {
    "minmax": _minmax,
    "percentile": _percentile,
    "entropy": _entropy,
    "mse": _mse,
}

_PARAMS = {
    "minmax": set(),
    "percentile": {"percentile", "symmetric"},
    "entropy": {"num_quantized_bins"},
    "mse": {"bits", "num_candidates"},
}


def check_method(method: str, params: Mapping[str, Any]) -> None:
    """Checks a method name and its parameter names.

    Raises:
        InputError: Unknown method or parameter.
    """
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; choose from {sorted(METHODS)}")
    unknown = sorted(set(params) - _PARAMS[method])
    if unknown:
        allowed = ", ".join(sorted(_PARAMS[method])) or "none"
        raise InputError(
            f"calibration method '{method}' has no parameter {', '.join(unknown)} "
            f"(allowed: {allowed})"
        )


def compute_range(stats: TensorStats, method: str = "minmax", **params: Any) -> tuple[float, float]:
    """Computes a tensor's quantization range from its statistics.

    Args:
        stats: The tensor's collected statistics.
        method: ``minmax``; ``percentile`` (``percentile=99.999``, ``symmetric=False``: both
            tails cut independently, or ``|x|`` cut and mirrored); ``entropy`` (TensorRT-style
            KL-divergence search on the ``|x|`` histogram, ``num_quantized_bins`` defaults to
            256 for one-signed and 128 for signed data); ``mse`` (``bits=8``,
            ``num_candidates=256``: the scaled ``[min, max]`` minimizing expected MSE).
        **params: The method's parameters.

    Returns:
        ``(lo, hi)`` as Python floats with ``lo <= 0 <= hi`` (the QDQ zero point must be
        representable) and within ``[min(min, 0), max(max, 0)]``.

    Raises:
        InputError: Unknown method or parameter, or a parameter out of range.
    """
    check_method(method, params)
    if stats.count == 0:
        logger.warning("no finite values were seen for a tensor; its range is (0, 0)")
        return 0.0, 0.0
    lo, hi = METHODS[method](stats, **params)
    lo = min(max(float(lo), stats.min), 0.0)
    hi = max(min(float(hi), stats.max), 0.0)
    return lo, hi
