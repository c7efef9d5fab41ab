"""Weight sparsity: magnitude, 2:4 and mask-file zeros in Conv/Gemm/MatMul weights, shapes kept."""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError
from onnxq.passes.prune.weights import Exclusions, Weight, find_weights, parse_sparsity
from onnxq.passes.results import DetailedPassResult

__all__ = [
    "TWO_FOUR_NOTE",
    "ApplyMasksPass",
    "PruneWeightsPass",
    "load_masks",
    "measure_sparsity",
    "zipped_size",
]

logger = logging.getLogger(__name__)

TWO_FOUR_NOTE = (
    "2:4 pattern for GPU sparse tensor cores; no speed-up on ONNX Runtime's CPU provider"
)
_UNSTRUCTURED_NOTE = (
    "zeros only: same latency and file size on ONNX Runtime; smaller once compressed"
)


def _sparsity(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0)) / max(array.size, 1)


def measure_sparsity(model: ir.Model, min_sparsity: float = 0.01) -> dict[str, object]:
    """Reports the zeros already in Conv/Gemm/MatMul weights (e.g. pruned in Torch).

    Args:
        model: The fp32 model (weights as initializers).
        min_sparsity: Layers with fewer zeros than this are left out of ``layers``.

    Returns:
        ``{"weights", "zeros", "sparsity", "layers": {layer: sparsity}}``.
    """
    weights = find_weights(model, lambda node: False)
    total = sum(w.array.size for w in weights)
    zeros = sum(int(np.count_nonzero(w.array == 0)) for w in weights)
    layers = {w.layer: round(_sparsity(w.array), 4) for w in weights}
    return {
        "weights": total,
        "zeros": zeros,
        "sparsity": round(zeros / total, 4) if total else 0.0,
        "layers": {k: v for k, v in layers.items() if v >= min_sparsity},
    }


def zipped_size(model: ir.Model) -> int:
    """Bytes of the serialized model after zlib compression: what zeros save in transit."""
    return len(zlib.compress(ir.serde.serialize_model(model).SerializeToString(), 6))


def load_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Loads ``initializer name -> 0/1 mask`` arrays from an ``.npz``.

    Raises:
        InputError: The file cannot be read, or is not an ``.npz`` of numeric arrays.
    """
    # np.load takes any non-zip, non-.npy file for a pickle and advises loading it unsafely:
    # an .npz is a zip archive, so anything else is refused first.
    if not zipfile.is_zipfile(path):
        what = (
            "no such file"
            if not Path(path).is_file()
            else "not a valid .npz file (a zip of .npy arrays, as numpy.savez writes)"
        )
        raise InputError(f"cannot read prune masks '{path}': {what}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as e:
        if "pickle" in str(e):  # numpy's text would advise allow_pickle=True: never do that
            raise InputError(
                f"cannot read prune masks '{path}': holds Python objects, not numeric 0/1 arrays"
            ) from None
        raise InputError(f"cannot read prune masks '{path}': not a valid .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read prune masks '{path}': not a valid .npz file ({e})") from None


class _MaskWeightsPass(ir.passes.InPlacePass):
    """Shared by the sparsity passes: choose masks, zero the weights, report what changed."""

    note = ""

    def __init__(self, exclude: Sequence[str] = ()):
        super().__init__()
        self.exclude = tuple(exclude)
        self._excluded = Exclusions(exclude)

    def _targets(self, model: ir.Model) -> list[Weight]:
        weights = find_weights(model, self._excluded)
        if not weights:
            raise InputError(
                "nothing to prune: the model has no Conv/Gemm/MatMul with constant weights"
                + (f" outside the excluded {list(self.exclude)}" if self.exclude else "")
            )
        return weights

    def _keep(self, weights: list[Weight]) -> list[np.ndarray | None]:
        """One boolean keep-mask per weight (None: leave that weight as it is)."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> DetailedPassResult:
        weights = self._targets(model)
        zipped_before = zipped_size(model)
        modified = False
        layers: dict[str, list[float]] = {}
        for weight, keep in zip(weights, self._keep(weights), strict=True):
            before = weight.array
            after = before if keep is None else np.where(keep, before, 0).astype(before.dtype)
            if not np.array_equal(before, after):
                weight.value.const_value = ir.tensor(after, name=weight.value.name)
                modified = True
            layers[weight.layer] = [round(_sparsity(before), 4), round(_sparsity(after), 4)]
        total = sum(w.array.size for w in weights)
        zeros = sum(int(np.count_nonzero(w.array == 0)) for w in weights)
        details = {
            "sparsity": round(zeros / max(total, 1), 4),
            "layers": layers,  # layer -> [sparsity before, after]
            "zipped_bytes_before": zipped_before,
            "zipped_bytes_after": zipped_size(model) if modified else zipped_before,
            "note": self.note,
        }
        logger.info("%r: %.1f%% of pruned weights are 0", self, 100 * zeros / max(total, 1))
        return DetailedPassResult(model, modified=modified, details=details)


class PruneWeightsPass(_MaskWeightsPass):
    """Zeros the smallest Conv/Gemm/MatMul weights (per layer, global, or 2:4 pattern).

    Args:
        sparsity: Fraction of each weight (``layer``) or of all weights (``global``) set to
            0; ignored by ``2:4``, which is 50% by construction.
        method: ``layer``, ``global`` or ``2:4``.
        exclude: Node names, regular expressions or op types left dense.
    """

    def __init__(
        self, sparsity: float = 0.5, *, method: str = "layer", exclude: Sequence[str] = ()
    ):
        super().__init__(exclude)
        if method not in ("layer", "global", "2:4"):
            raise InputError(f"unknown prune method '{method}'; choose from layer, global, 2:4")
        self.sparsity = parse_sparsity(str(sparsity))
        self.method = method
        self.note = TWO_FOUR_NOTE if method == "2:4" else _UNSTRUCTURED_NOTE

    def __repr__(self) -> str:
        return (
            f"PruneWeightsPass(sparsity={self.sparsity:g}, method={self.method!r}, "
            f"exclude={list(self.exclude)})"
        )

    def _keep(self, weights: list[Weight]) -> list[np.ndarray | None]:
        if self.method == "2:4":
            return [_two_four_keep(w.array, w.axis) for w in weights]
        if self.method == "layer":
            return [_magnitude_keep(np.abs(w.array), self.sparsity) for w in weights]
        # Global: one threshold over every weight, so sensitive small layers keep more.
        flat = np.concatenate([np.abs(w.array).ravel() for w in weights])
        keep = _magnitude_keep(flat, self.sparsity)
        bounds = np.cumsum([0, *(w.array.size for w in weights)])
        return [
            keep[lo:hi].reshape(w.array.shape)
            for w, lo, hi in zip(weights, bounds[:-1], bounds[1:], strict=True)
        ]


def _magnitude_keep(magnitude: np.ndarray, sparsity: float) -> np.ndarray:
    """Keeps all but exactly ``round(sparsity * size)`` smallest entries (ties broken)."""
    drop = round(sparsity * magnitude.size)
    keep = np.ones(magnitude.size, dtype=bool)
    if drop:
        keep[np.argpartition(magnitude.ravel(), drop - 1)[:drop]] = False
    return keep.reshape(magnitude.shape)


def _two_four_keep(array: np.ndarray, axis: int) -> np.ndarray | None:
    """Keeps the 2 largest of every 4 consecutive weights along ``axis`` (None: Cin % 4)."""
    if array.shape[axis] % 4:
        logger.info(
            "2:4 skips a weight of shape %s: input channels not a multiple of 4", array.shape
        )
        return None
    moved = np.moveaxis(np.abs(array), axis, -1)
    groups = moved.reshape(-1, 4)
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(groups, axis=1, kind="stable")[:, 2:], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


class ApplyMasksPass(_MaskWeightsPass):
    """Multiplies initializers by given 0/1 masks (from an ``.npz`` or Torch's prune).

    Args:
        masks: Initializer name -> mask of the initializer's shape, holding only 0 and 1.
        exclude: Node names, regular expressions or op types whose weights stay dense.
    """

    note = "masks from file: zeros only, same latency on ONNX Runtime"

    def __init__(self, masks: Mapping[str, np.ndarray], *, exclude: Sequence[str] = ()):
        super().__init__(exclude)
        self.masks = dict(masks)
        for name, mask in self.masks.items():
            if not np.isin(mask, (0, 1)).all():
                raise InputError(f"mask for '{name}' must hold only 0 and 1")

    def __repr__(self) -> str:
        return f"ApplyMasksPass(masks={len(self.masks)} initializers)"

    def _targets(self, model: ir.Model) -> list[Weight]:
        targets = []
        excluded = {
            node.inputs[1] for node in model.graph if len(node.inputs) > 1 and self._excluded(node)
        }
        for name, mask in self.masks.items():
            value = model.graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise InputError(f"mask '{name}' names no initializer of the model")
            shape = tuple(value.const_value.shape)
            if tuple(mask.shape) != shape:
                raise InputError(
                    f"mask '{name}' has shape {tuple(mask.shape)}, its initializer {shape}"
                )
            if value not in excluded:
                targets.append(Weight(value, name, 0))
        return targets

    def _keep(self, weights: list[Weight]) -> list[np.ndarray | None]:
        return [self.masks[w.value.name].astype(bool) for w in weights]
