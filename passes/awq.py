"""Activation-aware scales for block-wise weight-only quantization (AWQ-style), and its error.

AWQ (Lin et al., 2023) observes that a few input channels of a MatMul carry large
activations, and that their weights matter more: scaling weight row ``k`` up by ``s_k``
before rounding (and the input channel down by ``1/s_k``, exactly compensating in fp32)
gives those rows finer steps at the expense of the rows that see small activations. The
scales are ``s = mean|x|^alpha`` (normalised), with ``alpha`` searched on a grid for the
least output error ``||x W - (x / s) Q(s W)||`` on calibration activations; ``alpha = 0``
is plain round-to-nearest, so the choice is never worse than it on those activations.

The quantizer is ONNX Runtime's own (`DefaultWeightOnlyQuantizer`), and `dequantize_blocks`
reads its ``MatMulNBits`` packing back, so the error measured is that of the weights
written.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
)

__all__ = [
    "ALPHAS",
    "ScaleChoice",
    "block_grid",
    "dequantize_blocks",
    "output_sqnr_db",
    "quantizer",
    "search_scales",
]

# alpha in 0, 0.1, ..., 1 (the AWQ paper's grid has 20 points; 11 find the same optimum on
# the zoo decoder to within 0.1 dB, in half the time).
ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def quantizer(bits: int, block_size: int, symmetric: bool) -> DefaultWeightOnlyQuantizer:
    """ONNX Runtime's block quantizer (the packing MatMulNBits reads)."""
    return DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    )


def dequantize_blocks(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """The float ``W [K, N]`` a MatMulNBits packing stands for.

    Args:
        packed: ``[N, k_blocks, blob]`` uint8, ``8 / bits`` values a byte, low bits first.
        scales: ``[N, k_blocks]`` (or flat).
        zero_points: ``[N, ceil(k_blocks * bits / 8)]`` uint8 packed likewise; None:
            symmetric (the kernel's default zero point, ``2^(bits-1)``).
        k: Rows of ``W`` (the padding of the last block is cut).
        bits: 4 or 8.
        block_size: Rows per block.
    """
    n, k_blocks, _ = packed.shape
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    q = ((packed[..., None] >> shifts) & mask).reshape(n, k_blocks, -1)[..., :block_size]
    scales, zp = block_grid(scales, zero_points, n, k_blocks, bits)
    w = (q.astype(np.float32) - zp[..., None]) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, k_blocks * block_size)[:, :k].T)


def block_grid(
    scales: np.ndarray, zero_points: np.ndarray | None, n: int, k_blocks: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scales and zero points of a MatMulNBits packing, each ``[N, k_blocks]``.

    ``zero_points`` as packed (``bits`` a value, low bits first); None: symmetric, the
    kernel's default zero point ``2^(bits-1)``.
    """
    scales = np.asarray(scales, np.float32).reshape(n, k_blocks)
    if zero_points is None:
        return scales, np.full((n, k_blocks), 1 << (bits - 1), np.float32)
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    unpacked = (zero_points.reshape(n, -1)[..., None] >> shifts) & ((1 << bits) - 1)
    return scales, unpacked.reshape(n, -1)[:, :k_blocks].astype(np.float32)


def fake_quantize(w: np.ndarray, quant: DefaultWeightOnlyQuantizer) -> np.ndarray:
    """``w [K, N]`` packed by ``quant`` and read back (what the kernel multiplies by)."""
    packed, scales, zero_points = quant.qbits_block_quant(np.ascontiguousarray(w, np.float32))
    config = quant.config
    zp = None if config.is_symmetric else zero_points
    return dequantize_blocks(packed, scales, zp, w.shape[0], config.bits, config.block_size)


def output_sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """SQNR (dB) of a layer's output: signal energy over error energy."""
    noise = float(np.sum((reference - approx) ** 2, dtype=np.float64))
    signal = float(np.sum(reference**2, dtype=np.float64))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")


@dataclasses.dataclass(frozen=True)
class ScaleChoice:
    """The search's result for one weight.

    Attributes:
        alpha: The exponent chosen (0: plain round-to-nearest, ``scales`` None).
        scales: ``s [K]``: the weight rows are packed multiplied by it, the input divided.
        sqnr_db: Output SQNR with the chosen scales, on the calibration activations.
        rtn_sqnr_db: Output SQNR of plain round-to-nearest (alpha 0), for the report.
    """

    alpha: float
    scales: np.ndarray | None
    sqnr_db: float
    rtn_sqnr_db: float


def search_scales(
    x: np.ndarray,
    w: np.ndarray,
    quant: DefaultWeightOnlyQuantizer,
    alphas: tuple[float, ...] = ALPHAS,
) -> ScaleChoice:
    """Finds the per-input-channel scales with the least output error on ``x``.

    Args:
        x: Calibration activations the layer multiplies, ``[M, K]``.
        w: The weight, ``[K, N]``.
        quant: The block quantizer the weight will be packed with.
        alphas: The exponents tried (0 must be among them: the plain baseline).
    """
    x = np.asarray(x, np.float32)
    reference = x @ w
    magnitude = np.mean(np.abs(x), axis=0)
    # Dead channels (all-zero input) get the smallest live magnitude, not a zero scale.
    live = magnitude[magnitude > 0]
    magnitude = np.maximum(magnitude, live.min() if live.size else 1.0)
    best: tuple[float, float, np.ndarray | None] | None = None
    rtn = float("-inf")
    for alpha in alphas:
        if alpha == 0:
            scales = None
            approx = x @ fake_quantize(w, quant)
        else:
            scales = magnitude**alpha
            # Centred on 1 (geometric mean of the extremes): the scales move weight rows
            # relative to each other, not the whole matrix's range.
            scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
            approx = (x / scales) @ fake_quantize(w * scales[:, None], quant)
        sqnr = output_sqnr_db(reference, approx)
        if alpha == 0:
            rtn = sqnr
        if best is None or sqnr > best[1]:
            best = (float(alpha), sqnr, scales)
    assert best is not None
    return ScaleChoice(best[0], best[2], best[1], rtn)
