"""Model input specifications and synthetic inputs generated from them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError

__all__ = [
    "FeedBatches",
    "InputSpec",
    "check_array",
    "check_names",
    "conform",
    "input_specs",
    "random_inputs",
    "shape_text",
]

# What passes that run a model on data take: feed dicts (input name -> array), one per run.
# `onnxq.calibration.data.CalibrationData` is one; so is any list of dicts, or a generator
# over an ONNX Runtime ``CalibrationDataReader``'s ``get_next()``.
FeedBatches: TypeAlias = Iterable[Mapping[str, np.ndarray]]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Name, element type and shape of one graph input.

    Attributes:
        name: The input's name.
        dtype: Its numpy element type.
        shape: One entry per axis: an int, or a string/None for a dynamic dimension.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def resolve(
        self, overrides: Mapping[str, tuple[int, ...]], batch: int | None
    ) -> tuple[int, ...]:
        """Returns a concrete shape: the override, else static dims and ``batch`` on axis 0.

        Raises:
            InputError: A dynamic dimension other than the batch axis has no value.
        """
        if self.name in overrides:
            shape = tuple(overrides[self.name])
            if len(shape) != len(self.shape):
                raise InputError(
                    f"input '{self.name}': shape {shape} has rank {len(shape)}, "
                    f"the model expects rank {len(self.shape)} {self.shape}"
                )
            return shape
        dims = []
        for axis, dim in enumerate(self.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0 and batch is not None:
                dims.append(batch)
            else:
                raise InputError(
                    f"input '{self.name}' has dynamic dimension '{dim}' on axis {axis}; "
                    f"give its shape with --shape {self.name}=..."
                )
        return tuple(dims)


def _kind(dtype: np.dtype) -> str:
    """The kind a dtype converts within: float, integer (signed or not), bool, or other."""
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "integer"
    return "bool" if dtype == np.bool_ else str(dtype)


def shape_text(spec: InputSpec) -> str:
    """The spec's shape as users read it: ``[N, 3, 224, 224]``, ``?`` for unnamed dims."""
    dims = [str(d) if d is not None else "?" for d in spec.shape]
    return "[" + ", ".join(dims) + "]"


def check_names(
    specs: list[InputSpec], names: Iterable[str], where: str, *, ignore_extra: bool = False
) -> None:
    """Checks that data holds an array for every model input (and, by default, nothing else).

    Args:
        specs: The model inputs.
        names: The keys the data has.
        where: Where the data comes from, for messages.
        ignore_extra: Keys that name no input are logged and ignored (a data set may carry
            labels or other columns) instead of being an error.

    Raises:
        InputError: An input has no array, or (unless ignored) a key names no input.
    """
    expected = [s.name for s in specs]
    given = set(names)
    missing = [n for n in expected if n not in given]
    extra = sorted(given - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)} (no array for model input)")
    if extra and not ignore_extra:
        problems.append(f"unexpected {', '.join(extra)}")
    elif extra:
        logger.info("%s: ignoring keys that are not model inputs: %s", where, extra)
    if problems:
        raise InputError(
            f"{where}: the data does not match the model inputs: "
            f"{'; '.join(problems)} (expected: {', '.join(expected)})"
        )


def check_array(spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Checks a stack of samples (axis 0 = samples) against one input's rank, dims and dtype.

    The one casting rule: a dtype converts only within its kind (float to float, integer
    to integer), which loses nothing the user meant; across kinds the data is rejected.

    Raises:
        InputError: The rank, a static dimension after axis 0, or the dtype's kind differs.
    """
    if len(shape) != len(spec.shape):
        raise InputError(
            f"{where}: input '{spec.name}' expects shape {shape_text(spec)} "
            f"(axis 0 = samples), given {tuple(shape)} of rank {len(shape)}"
        )
    for axis in range(1, len(shape)):
        dim = spec.shape[axis]
        if isinstance(dim, int) and dim != shape[axis]:
            raise InputError(
                f"{where}: input '{spec.name}' expects shape {shape_text(spec)}, "
                f"given {tuple(shape)}: axis {axis} differs (axis {axis} must be {dim})"
            )
    if _kind(np.dtype(dtype)) != _kind(spec.dtype):
        raise InputError(
            f"{where}: input '{spec.name}' expects {spec.dtype} data, given {dtype} "
            "(a dtype converts only within its kind: float to float, integer to integer)"
        )


def conform(spec: InputSpec, array: np.ndarray, log: logging.Logger = logger) -> np.ndarray:
    """Casts a checked array to the input's dtype (within its kind, see `check_array`).

    The cast is logged at debug level on ``log`` (the caller's logger, by default this
    module's).
    """
    if array.dtype == spec.dtype:
        return array
    log.debug("casting input '%s' from %s to %s", spec.name, array.dtype, spec.dtype)
    return array.astype(spec.dtype)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Lists the graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputError(f"input '{value.name}' has no element type")
        shape = tuple(_dim(d) for d in (value.shape or ()))
        specs.append(InputSpec(value.name, value.dtype.numpy(), shape))
    return specs


def _dim(dim: int | ir.SymbolicDim) -> int | str | None:
    """A static size, or the name (None: unnamed) of a dynamic dimension.

    Older exporters write a dynamic dimension (the batch, mostly) as ``-1``, some as ``0``:
    both mean "any size" here, never a static size.
    """
    if isinstance(dim, int):
        return dim if dim > 0 else None
    return dim.value if isinstance(dim, ir.SymbolicDim) else None


def random_inputs(
    specs: list[InputSpec],
    *,
    batch: int | None = 1,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Generates reproducible random inputs that fit the specs.

    Floats are standard normal; integers are small non-negative values (valid token ids or
    indices for most models); booleans are random.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.resolve(overrides or {}, batch)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 8, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            raise InputError(f"input '{spec.name}': cannot generate data of type {spec.dtype}")
    return feeds
