"""``--metric mos_metric:max_abs_01``: DNSMOS P.835's three MOS values within 0.05 of fp32."""

from __future__ import annotations

import numpy as np


def max_abs_01(reference, candidate):
    """Passes when no MOS value (1-5 scale) moves by more than 0.05; returns the worst."""
    worst = max(
        float(np.max(np.abs(r - c)))
        for r, c in zip(reference["Identity:0"], candidate["Identity:0"], strict=True)
    )
    return worst <= 0.05, worst
