"""The memory budget of calibration: activation sizes, the budget, and the batch/pass plan."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError
from onnxq.inputs import infer_concrete_shapes

__all__ = [
    "MemoryPlan",
    "activation_sizes",
    "available_memory",
    "default_budget",
    "format_size",
    "parse_size",
    "plan_memory",
]

logger = logging.getLogger(__name__)

# The default budget: this share of the memory the OS reports available, at most the cap.
DEFAULT_SHARE = 0.5
DEFAULT_CAP = 16 << 30
# When /proc/meminfo cannot be read (not Linux).
FALLBACK_BUDGET = 4 << 30

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parses a byte count such as ``4GB``, ``512M``, ``1.5GiB`` or ``1000000``.

    Units are powers of 1024 (``GB`` and ``GiB`` both mean 2**30), as for RAM.

    Raises:
        InputError: Not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise InputError(f"memory size '{text}' is not a size such as 4GB, 512MB or 1000000")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise InputError(f"memory size must be positive, got '{text}'")
    return size


def format_size(size: float) -> str:
    """Formats a byte count for messages, e.g. ``1.5 GB`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def default_budget(meminfo: str | Path = "/proc/meminfo") -> int:
    """The default calibration budget: half the available memory, at most 16 GB.

    Half, because the rest of the compile (the IR model, the fidelity check) and other
    processes need room too; capped, because more rarely helps and shared machines have
    neighbours. Falls back to 4 GB when the available memory cannot be read.
    """
    available = available_memory(meminfo)
    if available is None:
        return FALLBACK_BUDGET
    return max(1, min(int(available * DEFAULT_SHARE), DEFAULT_CAP))


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """Bytes the OS reports available (``MemAvailable``); None where it cannot be read."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How calibration runs within its memory budget.

    Attributes:
        batch_size: Samples per model run.
        groups: Names of the tensors observed in each pass over the data (one pass per group).
        budget: Bytes calibration may use.
        estimated_peak: Estimated bytes of the largest pass.
    """

    batch_size: int
    groups: tuple[tuple[str, ...], ...]
    budget: int
    estimated_peak: int

    @property
    def passes(self) -> int:
        """Number of passes over the calibration data."""
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        """The plan for reports (without the tensor names)."""
        return {
            "budget_bytes": self.budget,
            "batch_size": self.batch_size,
            "passes": self.passes,
            "estimated_peak_bytes": self.estimated_peak,
        }


def plan_memory(
    sizes: Mapping[str, int],
    budget: int,
    *,
    max_batch: int,
    min_batch: int = 1,
    fixed: int = 0,
    workspace: float = 3.0,
) -> MemoryPlan:
    """Chooses the batch size and the tensors observed per pass to fit a memory budget.

    A pass observing tensors ``G`` at batch ``b`` is estimated to need
    ``fixed + b * (sum(sizes[G]) + workspace * max(sizes))``: ONNX Runtime holds every
    observed tensor until the run returns, and besides them the tensors being computed and
    the statistics' temporaries, counted as ``workspace`` copies of the largest tensor.

    One pass is preferred, at the largest batch (up to ``max_batch``) that fits: another
    pass runs the whole model over all the data again, while a smaller batch only costs
    some throughput. When one pass does not fit even at ``min_batch``, the tensors are
    packed, in the order given, into as few groups at ``min_batch`` as fit.

    Args:
        sizes: Bytes per sample of each tensor to observe, in graph order.
        budget: Bytes calibration may use.
        max_batch: Largest batch size (the data's).
        min_batch: Smallest batch size (the model's static batch size, or 1).
        fixed: Bytes needed whatever the plan (weights, kept outputs, the data's batch).
        workspace: Largest-tensor copies needed besides the observed tensors.

    Returns:
        The plan.

    Raises:
        InputError: The budget cannot hold even one tensor of one batch of ``min_batch``;
            the message says how much would.
    """
    names = list(sizes)
    largest = max(sizes.values(), default=0)
    extra = workspace * largest

    def peak(batch: int, total: int) -> int:
        return int(fixed + batch * (total + extra))

    total = sum(sizes.values())
    per_batch = total + extra
    batch = max_batch if per_batch <= 0 else min(max_batch, int((budget - fixed) // per_batch))
    if batch >= min_batch:
        return MemoryPlan(batch, (tuple(names),), budget, peak(batch, total))
    batch = min_batch
    capacity = (budget - fixed) / batch - extra
    if largest > capacity:
        biggest = max(names, key=lambda n: sizes[n])
        raise InputError(
            f"a memory budget of {format_size(budget)} cannot hold calibration of tensor "
            f"'{biggest}' ({format_size(sizes[biggest])} per sample) at batch {batch}: it needs "
            f"at least {format_size(peak(batch, largest))} (--max-memory)"
        )
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > capacity:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    heaviest = max(sum(sizes[n] for n in g) for g in groups)
    return MemoryPlan(batch, tuple(map(tuple, groups)), budget, peak(batch, heaviest))


def activation_sizes(
    model: ir.Model, names: Iterable[str], feeds: Mapping[str, np.ndarray], samples: int
) -> dict[str, int]:
    """Estimates the bytes per sample of tensors when the model runs on these feeds.

    Shapes come from ONNX shape inference on a copy of the model whose inputs take the
    feeds' concrete shapes (exported models often leave spatial dims symbolic, which says
    nothing about size). A tensor whose size stays unknown is counted as large as the
    largest known one (inputs included): too much rather than too little.

    Args:
        model: The model; it is not modified.
        names: The tensors to size.
        feeds: One run's inputs, by name.
        samples: Samples in ``feeds``.

    Returns:
        Bytes per sample, by name, in the order of ``names``.
    """
    copy = infer_concrete_shapes(model, feeds)
    values: dict[str, ir.Value] = {v.name: v for v in copy.graph.inputs if v.name}
    for node in copy.graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    known: dict[str, int] = {}
    names = list(names)
    for name in names:
        value = values.get(name)
        if value is not None and value.shape is not None and value.shape.is_static():
            itemsize = value.dtype.itemsize if value.dtype is not None else 4
            known[name] = math.ceil(math.prod(value.shape.numpy()) * itemsize)
    floor = max([*known.values(), *(np.asarray(a).nbytes for a in feeds.values())], default=0)
    unknown = [n for n in names if n not in known]
    if unknown:
        logger.debug("sizes unknown for %d tensor(s), counted as the largest", len(unknown))
    rows = max(samples, 1)
    return {name: -(-known.get(name, floor) // rows) for name in names}
