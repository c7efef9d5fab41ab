"""Accuracy and fidelity of a candidate model against its reference, streamed over a data set."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq import runtime
from onnxq.calibration.data import CalibrationData, open_calibration_data
from onnxq.errors import InputError
from onnxq.inputs import InputSpec, input_specs
from onnxq.io import load_model

__all__ = [
    "AccuracyAccumulator",
    "EvalResult",
    "FidelityAccumulator",
    "evaluate",
    "sqnr_db",
]

logger = logging.getLogger(__name__)


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref²) / sum((ref - cand)²))``.

    Returns ``inf`` when the arrays are identical (no noise) and ``-inf`` when the reference
    is all zeros but the candidate is not.
    """
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    return _sqnr(float(np.sum(ref * ref)), float(np.sum((ref - cand) ** 2)))


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class FidelityAccumulator:
    """Accumulates fidelity metrics of one output over batches without keeping the outputs.

    Metrics: SQNR (dB), cosine similarity of the flattened tensors, max absolute error, and
    top-1 agreement (argmax over the last axis) for outputs of rank 2 or more.
    """

    def __init__(self) -> None:
        self.signal = 0.0  # sum(ref²)
        self.noise = 0.0  # sum((ref - cand)²)
        self.cand_energy = 0.0  # sum(cand²)
        self.dot = 0.0  # sum(ref * cand)
        self.max_abs_error = 0.0
        self.agree = 0
        self.rows = 0
        self.count = 0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """Adds one batch of reference and candidate values of the same shape.

        Raises:
            ValueError: The shapes differ.
        """
        if ref.shape != cand.shape:
            raise ValueError(f"shape mismatch: reference {ref.shape}, candidate {cand.shape}")
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cand, dtype=np.float64)
        diff = r - c
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(diff * diff))
        self.cand_energy += float(np.sum(c * c))
        self.dot += float(np.sum(r * c))
        if diff.size:
            self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(diff))))
        self.count += r.size
        if r.ndim >= 2 and r.shape[-1] > 0:
            self.agree += int(np.sum(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
            self.rows += r.size // r.shape[-1]

    @property
    def sqnr_db(self) -> float:
        """SQNR over everything seen so far."""
        return _sqnr(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        """Cosine similarity of all values seen so far (1.0 when both are all zeros)."""
        norm = math.sqrt(self.signal * self.cand_energy)
        if norm == 0.0:
            return 1.0 if self.signal == self.cand_energy else 0.0
        return self.dot / norm

    @property
    def top1_agreement(self) -> float | None:
        """Fraction of rows whose argmax agrees, or ``None`` for outputs of rank < 2."""
        return self.agree / self.rows if self.rows else None

    def result(self) -> dict:
        """Returns the metrics as a JSON-ready dict."""
        return {
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "max_abs_error": self.max_abs_error,
            "top1_agreement": self.top1_agreement,
            "values": self.count,
        }


class AccuracyAccumulator:
    """Counts top-1 and top-5 hits of class scores against integer labels."""

    def __init__(self) -> None:
        self.top1 = 0
        self.top5 = 0
        self.total = 0
        self.classes = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Adds a batch of scores ``[N, C]`` (or ``[N, ..., C]`` flattened to rows) and labels."""
        scores = scores.reshape(labels.shape[0], -1)
        self.classes = scores.shape[1]
        k = min(5, self.classes)
        # argpartition gives the k best in any order, which is all a top-k hit needs.
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        self.top1 += int(np.sum(np.argmax(scores, axis=1) == labels))
        self.top5 += int(np.sum(np.any(best == labels[:, None], axis=1)))
        self.total += labels.shape[0]

    def result(self) -> dict:
        """Returns ``{"top1", "top5", "samples"}``; accuracies are fractions in [0, 1]."""
        if not self.total:
            return {"top1": None, "top5": None, "samples": 0}
        return {
            "top1": self.top1 / self.total,
            # With fewer than 5 classes top-5 would be trivially 1.0 and mislead.
            "top5": self.top5 / self.total if self.classes >= 5 else None,
            "samples": self.total,
        }


@dataclasses.dataclass
class EvalResult:
    """Accuracy and fidelity of a candidate against its reference.

    Attributes:
        reference: Reference model path.
        candidate: Candidate model path.
        samples: Number of samples evaluated.
        accuracy: ``{"reference": {top1, top5, samples}, "candidate": {...},
            "top1_drop_points": float}`` when labels were given, else ``None``.
        fidelity: Per output name, the ``FidelityAccumulator.result()`` dict.
        per_layer: ``[{"tensor", "sqnr_db", "cosine", "max_abs_error"}]`` worst first, or
            ``None`` when not asked for.
    """

    reference: str
    candidate: str
    samples: int
    accuracy: dict | None
    fidelity: dict[str, dict]
    per_layer: list[dict] | None = None

    @property
    def min_sqnr_db(self) -> float:
        """The worst SQNR over all outputs."""
        return min(f["sqnr_db"] for f in self.fidelity.values())

    def to_dict(self) -> dict:
        """Returns the JSON report: the attributes plus ``kind`` and ``min_sqnr_db``."""
        d = dataclasses.asdict(self)
        d["kind"] = "eval"
        d["min_sqnr_db"] = self.min_sqnr_db
        return d


def evaluate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    data: str | os.PathLike,
    *,
    labels_key: str | None = None,
    batch_size: int = 32,
    per_layer: bool = False,
    provider: str = "cpu",
) -> EvalResult:
    """Compares a candidate model with its reference on a data set, batch by batch.

    Both models run with all ONNX Runtime optimizations (the deployment path). Outputs are
    matched by name; accuracy uses the first output as class scores.

    Args:
        reference: The reference (e.g. fp32) model file.
        candidate: The candidate (e.g. int8) model file.
        data: Inputs as for calibration (`open_calibration_data`): an ``.npz`` keyed by input
            name (plus optionally the labels; other keys are ignored), or a folder.
        labels_key: Key of integer class labels in ``data``; enables top-1/top-5 accuracy.
        batch_size: Rows per run (a model with a static batch dimension uses its own).
        per_layer: Also compare intermediate tensors present in both models by name.
        provider: ``cpu`` or ``cuda``.

    Raises:
        InputError: Unreadable models or data, mismatched inputs or outputs, bad batch size.
    """
    if batch_size <= 0:
        raise InputError(f"batch size must be a positive integer, got {batch_size}")
    if not Path(data).exists():
        raise InputError(f"{data}: no such data file")
    ref_model, cand_model = load_model(reference), load_model(candidate)
    _matching_specs(ref_model, cand_model)
    outputs = _matching_outputs(ref_model, cand_model)
    dataset = open_calibration_data(
        data, ref_model, batch_size=batch_size, labels_key=labels_key, ignore_extra=True
    )
    ref_sess = runtime.create_session(reference, provider=provider)
    cand_sess = runtime.create_session(candidate, provider=provider)
    fidelity = {name: FidelityAccumulator() for name in outputs}
    acc = {"reference": AccuracyAccumulator(), "candidate": AccuracyAccumulator()}
    for batch in dataset:
        ref_out = dict(zip(outputs, ref_sess.run(outputs, batch), strict=True))
        cand_out = dict(zip(outputs, cand_sess.run(outputs, batch), strict=True))
        for name in outputs:
            fidelity[name].update(ref_out[name], cand_out[name])
        if batch.labels is not None:
            acc["reference"].update(ref_out[outputs[0]], batch.labels)
            acc["candidate"].update(cand_out[outputs[0]], batch.labels)
    result = EvalResult(
        reference=str(reference),
        candidate=str(candidate),
        samples=dataset.samples_read or 0,
        accuracy=_accuracy_dict(acc) if labels_key else None,
        fidelity={name: f.result() for name, f in fidelity.items()},
    )
    if per_layer:
        result.per_layer = _per_layer(ref_model, cand_model, dataset, provider)
    return result


def _accuracy_dict(acc: Mapping[str, AccuracyAccumulator]) -> dict:
    ref, cand = acc["reference"].result(), acc["candidate"].result()
    # Percentage points: the unit release criteria are usually written in.
    return {
        "reference": ref,
        "candidate": cand,
        "top1_drop_points": 100.0 * (ref["top1"] - cand["top1"]),
    }


def _matching_specs(ref: ir.Model, cand: ir.Model) -> list[InputSpec]:
    specs = input_specs(ref)
    cand_names = sorted(s.name for s in input_specs(cand))
    if sorted(s.name for s in specs) != cand_names:
        raise InputError(
            f"the models take different inputs: reference {[s.name for s in specs]}, "
            f"candidate {cand_names}"
        )
    return specs


def _matching_outputs(ref: ir.Model, cand: ir.Model) -> list[str]:
    ref_names = [v.name for v in ref.graph.outputs]
    cand_names = {v.name for v in cand.graph.outputs}
    common = [n for n in ref_names if n in cand_names]
    if not common:
        raise InputError(
            f"the models share no output name: reference {ref_names}, "
            f"candidate {sorted(cand_names)}"
        )
    return common


def _float_values(model: ir.Model) -> dict[str, ir.Value]:
    """Intermediate float values by name (node outputs that are not graph outputs)."""
    outputs = {v.name for v in model.graph.outputs}
    values = {}
    for node in model.graph:
        for value in node.outputs:
            if value.name and value.name not in outputs and _is_float(value):
                values[value.name] = value
    return values


def _is_float(value: ir.Value) -> bool:
    # Untyped values are kept: ONNX Runtime infers them, and non-float ones are skipped later.
    return value.dtype is None or value.dtype.is_floating_point()


def _per_layer(ref: ir.Model, cand: ir.Model, data: CalibrationData, provider: str) -> list[dict]:
    """SQNR per intermediate tensor present in both models, worst first."""
    ref_values, cand_values = _float_values(ref), _float_values(cand)
    wanted = {n for n in ref_values if n in cand_values}
    if not wanted:
        logger.warning("per-layer: the models share no intermediate tensor name")
        return []

    def choose(graph: ir.Graph) -> list[ir.Value]:
        return [v for node in graph for v in node.outputs if v.name in wanted]

    ref_probe = runtime.Probe(ref, choose, provider=provider)
    cand_probe = runtime.Probe(cand, choose, provider=provider)
    names = [n for n in ref_probe.names if n in cand_probe.names]
    accs: dict[str, FidelityAccumulator] = {n: FidelityAccumulator() for n in names}
    for batch in data:
        ref_out, cand_out = ref_probe.run(batch), cand_probe.run(batch)
        for name in list(accs):
            r, c = ref_out[name], cand_out[name]
            if r.shape != c.shape or not np.issubdtype(r.dtype, np.floating):
                logger.debug(
                    "per-layer: skipping '%s' (%s %s vs %s)", name, r.dtype, r.shape, c.shape
                )
                del accs[name]
                continue
            accs[name].update(r, c)
    rows = [
        {"tensor": n, "sqnr_db": a.sqnr_db, "cosine": a.cosine, "max_abs_error": a.max_abs_error}
        for n, a in accs.items()
    ]
    return sorted(rows, key=lambda row: row["sqnr_db"])
