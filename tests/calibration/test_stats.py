"""Streaming histograms and the range methods computed from them."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calibration.stats import TensorStats, compute_range
from onnxq.errors import InputError


def _stats(*batches: np.ndarray, num_bins: int = 2048) -> TensorStats:
    stats = TensorStats(num_bins)
    for batch in batches:
        stats.update(batch)
    return stats


def _growing_batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range widens, shifts and jumps, forcing several re-binnings."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(5000).astype(np.float32) * 2.0**i for i in range(5)]
    batches.append(rng.standard_normal(300).astype(np.float32) - 100)
    batches.append(np.full(10, 3.0, np.float32))
    return batches


def test_rebinning_is_exact():
    batches = _growing_batches()
    stats = _stats(*batches)
    data = np.concatenate(batches)
    assert stats.count == data.size == stats.hist.sum()
    assert (stats.min, stats.max) == (data.min(), data.max())
    expected, _ = np.histogram(data, bins=stats.edges)
    np.testing.assert_array_equal(stats.hist, expected)


@pytest.mark.parametrize("first", [0.0, 1e-20, -1e-25, -3e-12])
def test_constant_first_batch_then_varied_data_rebins_exactly(first):
    # A constant first batch gets a bin width of about 2**-124 (all zeros) to 2**-90; the
    # later data widens it by more than 2**63, past what int64 arithmetic can hold.
    data = np.linspace(-3, 7, 1000, dtype=np.float32)
    stats = _stats(np.full(4, first, np.float32), data)
    assert stats.hist.sum() == 1004 and (stats.min, stats.max) == (-3.0, 7.0)
    expected, _ = np.histogram(np.concatenate([np.full(4, first), data]), bins=stats.edges)
    np.testing.assert_array_equal(stats.hist, expected)
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = compute_range(stats, method)
        assert -3.0 <= lo < 0.0 < hi <= 7.0, method


def test_constant_then_growing_range():
    stats = _stats(np.full(100, 0.5, np.float32), np.linspace(-3, 7, 1000, dtype=np.float32))
    assert stats.hist.sum() == 1100 and (stats.min, stats.max) == (-3.0, 7.0)
    assert compute_range(stats) == (-3.0, 7.0)


def test_nonfinite_values_are_counted_and_excluded():
    stats = _stats(np.array([1.0, np.nan, -np.inf, 2.0, np.inf], np.float32))
    assert (stats.count, stats.nan_count, stats.inf_count) == (2, 1, 2)
    assert (stats.min, stats.max) == (1.0, 2.0)


def test_float16_input():
    stats = _stats(np.array([-1.5, 0.25, 4.0], np.float16))
    assert (stats.min, stats.max, stats.count) == (-1.5, 4.0, 3)


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_within_one_bin_of_numpy(percentile):
    """Tolerance: one bin width.

    The histogram locates the bin holding the order statistic numpy's ``inverted_cdf``
    method returns; numpy's default ``linear`` method may instead land up to one sample
    gap further, which in a sparse tail exceeds a bin, so it is compared only at 99%.
    """
    batches = [np.random.default_rng(i).standard_normal(40_000).astype(np.float32) for i in (1, 2)]
    batches[1] = batches[1] * 3 + 1  # widen the range after the first batch
    stats = _stats(*batches)
    data = np.concatenate(batches)
    lo, hi = compute_range(stats, "percentile", percentile=percentile)
    assert abs(hi - np.percentile(data, percentile, method="inverted_cdf")) <= stats.width
    assert abs(lo - np.percentile(data, 100 - percentile, method="inverted_cdf")) <= stats.width
    _, t = compute_range(stats, "percentile", percentile=percentile, symmetric=True)
    abs_ref = np.percentile(np.abs(data), percentile, method="inverted_cdf")
    assert abs(t - abs_ref) <= stats.width
    if percentile == 99.0:
        assert abs(hi - np.percentile(data, percentile)) <= stats.width


def _heavy_tailed() -> np.ndarray:
    """Student's t with 3 degrees of freedom: finite variance, heavy tails."""
    return np.random.default_rng(3).standard_t(df=3, size=100_000).astype(np.float32)


@pytest.mark.parametrize(
    ("method", "params"), [("entropy", {}), ("mse", {}), ("percentile", {"percentile": 99.99})]
)
def test_clipping_methods_shrink_heavy_tails(method, params):
    data = _heavy_tailed()
    stats = _stats(*np.array_split(data, 4))
    lo, hi = compute_range(stats, method, **params)
    assert data.min() <= lo <= 0 <= hi <= data.max()
    assert hi < 0.8 * data.max() and lo > 0.8 * data.min()


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_clipping_methods_on_relu_outputs(method):
    data = np.maximum(_heavy_tailed(), 0)
    lo, hi = compute_range(_stats(data), method)
    assert lo == 0.0 and 0 < hi < data.max()


def test_uniform_data_is_barely_clipped():
    data = np.random.default_rng(4).uniform(-1, 2, 50_000).astype(np.float32)
    stats = _stats(data)
    for method in ("entropy", "mse"):
        lo, hi = compute_range(stats, method)
        assert lo <= -0.95 and hi >= 1.9


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_range_always_includes_zero(method):
    stats = _stats(np.random.default_rng(5).uniform(1, 3, 10_000).astype(np.float32))
    lo, hi = compute_range(stats, method)
    assert lo == 0.0 and 1 < hi <= 3


def test_no_finite_values_gives_empty_range():
    assert compute_range(_stats(np.array([np.nan], np.float32))) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("best", {}, "unknown calibration method 'best'"),
        ("minmax", {"percentile": 99}, "has no parameter percentile"),
        ("percentile", {"percentile": 20}, "percentile must be in"),
        ("mse", {"bits": 1}, "bits >= 2"),
    ],
)
def test_bad_method_or_params(method, params, words):
    with pytest.raises(InputError, match=words):
        compute_range(_stats(np.ones(3, np.float32)), method, **params)


def test_bad_bin_count():
    with pytest.raises(InputError, match="num_bins"):
        TensorStats(7)
