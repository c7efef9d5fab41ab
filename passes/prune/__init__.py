"""Pruning passes: weight sparsity (magnitude, 2:4, masks) and structured channel removal."""

from __future__ import annotations

from onnxq.passes.prune.channels import PruneChannelsPass
from onnxq.passes.prune.sparsity import (
    TWO_FOUR_NOTE,
    ApplyMasksPass,
    PruneWeightsPass,
    load_masks,
    measure_sparsity,
    zipped_size,
)
from onnxq.passes.prune.surgery import RemovedSlice

__all__ = [
    "TWO_FOUR_NOTE",
    "ApplyMasksPass",
    "PruneChannelsPass",
    "PruneWeightsPass",
    "RemovedSlice",
    "load_masks",
    "measure_sparsity",
    "zipped_size",
]
