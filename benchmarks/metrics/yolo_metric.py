"""``--metric yolo_metric:top_box``: a YOLO head's best box must stay where fp32 puts it.

``output0`` is ``[1, 4 + 1 + 32, 8400]``: box centre and size, score, mask coefficients.
"""

from __future__ import annotations

import numpy as np


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    ix = max(0.0, min(ax + aw / 2, bx + bw / 2) - max(ax - aw / 2, bx - bw / 2))
    iy = max(0.0, min(ay + ah / 2, by + bh / 2) - max(ay - ah / 2, by - bh / 2))
    inter = ix * iy
    return float(inter / (aw * ah + bw * bh - inter + 1e-9))


def top_box(reference, candidate):
    """Passes when the best boxes agree in 97% of the samples fp32 detects something in.

    Agree: the candidate's best box scores >= 0.25 and overlaps fp32's (IoU > 0.5).
    """
    agree = total = 0
    for r, c in zip(reference["output0"], candidate["output0"], strict=True):
        for rs, cs in zip(r, c, strict=True):  # the samples of one run
            i, j = int(np.argmax(rs[4])), int(np.argmax(cs[4]))
            if rs[4, i] < 0.25:
                continue
            total += 1
            agree += bool(cs[4, j] >= 0.25 and _iou(rs[:4, i], cs[:4, j]) > 0.5)
    rate = agree / total if total else 1.0
    return rate >= 0.97, rate
