"""Verification: each pass against the previous stage; a model ONNX Runtime must accept."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import runtime
from onnxq.errors import InputError, VerificationError
from onnxq.evaluate import sqnr_db
from onnxq.inputs import input_specs, random_inputs

__all__ = ["Verifier", "check_loads"]

logger = logging.getLogger(__name__)


class Verifier:
    """Checks a model after each pass: ONNX checker, then outputs on ONNX Runtime.

    Passes that preserve outputs are compared with the previous stage (max abs difference
    relative to each output's magnitude); the others (quantization) with the fp32
    reference by SQNR; a pass that resets the reference (pruning) becomes the reference.
    """

    def __init__(
        self,
        model: ir.Model,
        tolerance: float,
        min_sqnr: float,
        seed: int = 0,
        feeds: Mapping[str, np.ndarray] | None = None,
    ):
        """Runs the input model once for the reference outputs.

        Args:
            model: The input model.
            tolerance: Largest relative output change an exact pass may make.
            min_sqnr: SQNR floor (dB) of inexact passes against fp32.
            seed: Seed of the random inputs made when ``feeds`` is None.
            feeds: Inputs to verify on, e.g. the first calibration batch: quantization is
                only meaningful on data like the calibration data (random normal inputs
                fall outside the calibrated ranges).

        Raises:
            InputError: No ``feeds`` and inputs with dynamic dimensions.
        """
        self.tolerance = tolerance
        self.min_sqnr = min_sqnr
        try:
            self.feeds = (
                dict(feeds)
                if feeds is not None
                else random_inputs(input_specs(model), batch=2, seed=seed)
            )
        except InputError as e:
            raise InputError(f"checking each pass needs sample inputs: {e}") from None
        self.reference = self._outputs(model, "input model")
        self.previous = self.reference

    def _outputs(self, model: ir.Model, stage: str) -> dict[str, np.ndarray]:
        try:
            session = runtime.create_session(model, optimization="disable")
            return runtime.run(session, self.feeds)
        except Exception as e:  # ORT raises several unrelated exception types
            raise VerificationError(f"{stage}: ONNX Runtime cannot run the model: {e}") from e

    def check(
        self,
        label: str,
        model: ir.Model,
        *,
        preserves_outputs: bool = True,
        resets_reference: bool = False,
    ) -> float:
        """Verifies ``model`` after a pass and returns the largest relative difference.

        Args:
            label: Names the pass in errors, e.g. ``pass FoldBatchNormPass (fuse)``.
            model: The model after the pass.
            preserves_outputs: Compare with the previous stage within the tolerance;
                otherwise with the fp32 reference by SQNR.
            resets_reference: The pass changes the outputs by design: only check that
                the model is valid and runs, and compare later passes with it.

        Raises:
            VerificationError: The model is invalid or its outputs moved too far.
        """
        try:
            onnx.checker.check_model(ir.serde.serialize_model(model))
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0]
            raise VerificationError(f"{label} produced an invalid model: {first}") from e
        outputs = self._outputs(model, label)
        if resets_reference:
            # Pruning changes the outputs by design: it is only checked to be a valid model
            # that runs, and later passes are compared with the pruned model.
            worst = _max_rel_diff(self.previous, outputs)
            self.reference = outputs
        elif preserves_outputs:
            worst = _max_rel_diff(self.previous, outputs)
            if worst > self.tolerance:
                raise VerificationError(
                    f"{label} changed the outputs: max abs difference {worst:.3g} "
                    f"(relative to output magnitude) > tolerance {self.tolerance:g}"
                )
        else:
            worst = _max_rel_diff(self.reference, outputs)
            sqnr = min(sqnr_db(self.reference[k], outputs[k]) for k in outputs)
            if sqnr < self.min_sqnr:
                raise VerificationError(
                    f"{label}: SQNR against fp32 {sqnr:.1f} dB < floor {self.min_sqnr:g} dB"
                )
        self.previous = outputs
        return worst


def check_loads(model: ir.Model, what: str) -> None:
    """Checks that ONNX Runtime accepts ``model`` (a session without graph optimisation).

    Cheap next to running it, and it catches what ONNX's checker lets through (e.g. a
    subgraph returning an outer-scope value directly).

    Args:
        model: The model about to be published.
        what: What the error message says the model is (and what became of it).

    Raises:
        VerificationError: ONNX Runtime refuses the model.
    """
    try:
        runtime.create_session(model, optimization="disable")
    except Exception as e:  # ORT raises several unrelated exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VerificationError(f"{what}: ONNX Runtime cannot load it: {first}") from e


def _max_rel_diff(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, expected in ref.items():
        got = out[name]
        if got.shape != expected.shape:
            return float("inf")
        if not np.issubdtype(expected.dtype, np.floating):
            worst = max(worst, float(np.any(got != expected)) * np.inf)
            continue
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        worst = max(worst, float(np.max(np.abs(got - expected), initial=0.0)) / scale)
    return worst
