from __future__ import annotations

import numpy as np
import pytest

from onnxq.bootstrap import bootstrap_median, bootstrap_speedup, ci95


def test_bootstraps_are_seeded_and_paired():
    rng = np.random.default_rng(1)
    first = rng.uniform(1.0, 2.0, 200)
    np.testing.assert_array_equal(bootstrap_median(first, seed=3), bootstrap_median(first, seed=3))
    # The other model is exactly twice as fast in every round: pairing makes the CI a point.
    lo, hi = ci95(bootstrap_speedup(first, first / 2))
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
