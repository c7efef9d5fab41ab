"""Post-compile checks of the deployed int8 model: fidelity against fp32, and latency."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxq import runtime
from onnxq.calibration.data import CalibrationData
from onnxq.errors import VerificationError
from onnxq.evaluate import FidelityAccumulator

__all__ = ["check_fidelity", "check_latency"]

logger = logging.getLogger(__name__)


def check_fidelity(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    data: CalibrationData,
    *,
    min_sqnr: float,
    provider: str = "cpu",
    reference_outputs: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Compares the candidate as deployed (full optimisation) with the fp32 reference.

    The candidate runs with all of ONNX Runtime's graph optimisations, so the int8
    kernels it fuses, and their numerics on this CPU, are what is measured.

    Args:
        reference: The fp32 model file.
        candidate: The int8 model file.
        data: The samples to compare on (batches in a fixed order).
        min_sqnr: Lowest acceptable SQNR (dB) of any output.
        provider: Execution provider.
        reference_outputs: The fp32 outputs for the first samples of ``data``, when
            calibration kept them: the fp32 model then does not run again.

    Returns:
        ``{"outputs": {name: {sqnr_db, cosine, max_abs_error, top1_agreement}},
        "min_sqnr_db", "samples"}``.

    Raises:
        VerificationError: An output's SQNR is below ``min_sqnr``.
    """
    cand = runtime.create_session(candidate, provider=provider, optimization="all")
    expect = _expected_outputs(reference, provider, reference_outputs)
    names = [o.name for o in cand.get_outputs()]
    acc = {name: FidelityAccumulator() for name in names}
    samples = 0
    for batch in data.batches():
        rows = len(next(iter(batch.values())))
        expected = expect(batch, samples, rows)
        got = runtime.run(cand, batch)
        for name in names:
            if name in expected and expected[name].dtype.kind == "f":
                acc[name].update(expected[name], got[name])
        samples += rows
    outputs = {name: a.result() for name, a in acc.items() if a.count}
    worst = min((o["sqnr_db"] for o in outputs.values()), default=float("inf"))
    result = {"outputs": outputs, "min_sqnr_db": worst, "samples": samples, "floor_db": min_sqnr}
    if worst < min_sqnr:
        bad = min(outputs, key=lambda n: outputs[n]["sqnr_db"])
        raise VerificationError(
            f"int8 output '{bad}' has SQNR {worst:.1f} dB against fp32, below the floor of "
            f"{min_sqnr:g} dB (--min-sqnr); try --method percentile/entropy, or --exclude "
            "the layers `onnxq eval --per-layer` shows as worst"
        )
    return result


def _expected_outputs(
    reference: str | os.PathLike,
    provider: str,
    kept: Mapping[str, np.ndarray] | None,
) -> Callable[[dict[str, np.ndarray], int, int], dict[str, np.ndarray]]:
    """Returns ``expect(batch, first_row, rows)``: kept fp32 outputs, or a fresh fp32 run."""
    if kept is not None:
        return lambda batch, first, rows: {n: a[first : first + rows] for n, a in kept.items()}
    session = runtime.create_session(reference, provider=provider, optimization="all")
    return lambda batch, first, rows: runtime.run(session, batch)


def check_latency(
    reference: str | os.PathLike, candidate: str | os.PathLike, *, seconds: float = 2.0
) -> dict[str, Any]:
    """Times fp32 and int8 interleaved at batch 1 and warns when int8 is slower."""
    from onnxq.bench import benchmark

    result = benchmark([str(reference), str(candidate)], max_time=seconds, min_runs=10)
    entry = result.to_dict()["results"][1]
    latency = {
        "fp32_p50_ms": result.to_dict()["results"][0]["p50_ms"],
        "int8_p50_ms": entry["p50_ms"],
        "speedup": entry["speedup_vs_first"],
        "speedup_ci95": entry["speedup_ci95"],
    }
    if latency["speedup"] < 1.0:
        logger.warning(
            "the int8 model is slower than fp32 on this machine (%.2fx); see the report's "
            "not_quantized list, or keep the fp32 model",
            latency["speedup"],
        )
    return latency
