"""Model input specifications and synthetic inputs generated from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import numpy as np
import onnx_ir as ir

from onnxq.errors import InputError

__all__ = ["FeedBatches", "InputSpec", "input_specs", "parse_shape_overrides", "random_inputs"]

# What passes that run a model on data take: feed dicts (input name -> array), one per run.
# `onnxq.calibration.data.CalibrationData` is one; so is any list of dicts, or a generator
# over an ONNX Runtime ``CalibrationDataReader``'s ``get_next()``.
FeedBatches: TypeAlias = Iterable[Mapping[str, np.ndarray]]


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


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Lists the graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputError(f"input '{value.name}' has no element type")
        shape = tuple(
            d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
            for d in (value.shape or ())
        )
        specs.append(InputSpec(value.name, value.dtype.numpy(), shape))
    return specs


def parse_shape_overrides(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parses ``name=1,3,224,224`` items into a mapping.

    Raises:
        InputError: An item is not of that form.
    """
    overrides = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(
                f"bad --shape '{item}': expected NAME=D0,D1,... with positive integers"
            ) from None
        overrides[name] = shape
    return overrides


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
