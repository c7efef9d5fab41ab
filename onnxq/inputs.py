"""Model input specifications and synthetic inputs generated from them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.errors import InputError

__all__ = [
    "FeedBatches",
    "InputSpec",
    "SampleLayout",
    "check_names",
    "conform",
    "has_batch_axis",
    "infer_concrete_shapes",
    "input_specs",
    "random_inputs",
    "sample_layout",
    "sample_layouts",
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
            for axis, (given, fixed) in enumerate(zip(shape, self.shape, strict=True)):
                if isinstance(fixed, int) and given != fixed:
                    raise InputError(
                        f"input '{self.name}': shape {shape} has {given} on axis {axis}, "
                        f"where the model's size is fixed at {fixed}"
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


@dataclasses.dataclass(frozen=True)
class SampleLayout:
    """How one array holds samples of one model input (see `sample_layout`).

    Attributes:
        kind: ``rows``: axis 0 lists samples, ``group`` rows each; ``stack``: axis 0 lists
            whole inputs; ``one``: the array is one sample.
        count: The number of samples the array holds.
        group: For ``rows``: rows per sample (1 for a batch axis, D for a fixed axis 0 of D).
        lead: For ``one``: axes added in front to make a stack of one sample (2 when the
            array lacks the input's batch axis).
    """

    kind: str
    count: int
    group: int = 1
    lead: int = 1

    def rows(self, samples: int) -> int | None:
        """Rows of axis 0 holding ``samples`` samples; None: only the whole array is read."""
        if self.kind == "one":
            return None
        return samples * self.group if self.kind == "rows" else samples

    def sample_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one sample, as the model takes it, in an array of ``shape``."""
        if self.kind == "rows":
            return (self.group, *shape[1:])
        if self.kind == "stack":
            return tuple(shape[1:])
        return (1,) * (self.lead - 1) + tuple(shape)

    def samples(self, array: np.ndarray) -> np.ndarray:
        """The array as a stack of samples: axis 0 = samples, then each one's input shape."""
        if self.kind == "rows":
            return array.reshape(len(array) // self.group, self.group, *array.shape[1:])
        if self.kind == "stack":
            return array
        return array.reshape((1,) * self.lead + array.shape)


def has_batch_axis(spec: InputSpec) -> bool:
    """Whether the input's axis 0 can list samples: it is dynamic or 1."""
    return bool(spec.shape) and not (isinstance(spec.shape[0], int) and spec.shape[0] != 1)


def sample_layout(
    spec: InputSpec,
    shape: tuple[int, ...],
    dtype: np.dtype,
    where: str,
    *,
    whole: bool = False,
) -> SampleLayout:
    """Reads an array of ``shape`` as samples of one input, and checks them against it.

    The rule: when the input's axis 0 is dynamic or 1 (a batch axis), an array of the
    input's rank lists samples along axis 0, one row each, and an array of one axis less
    is one sample. Otherwise an array of one more axis than the input is a stack of whole
    inputs along axis 0; an array of the input's rank with a fixed axis 0 of D (a
    recurrent state's ``[2, batch, 128]``, a static batch) holds samples of D rows each
    (so exactly D rows are one sample); a scalar input's sample is a scalar. With
    ``whole``, the array is one sample exactly as the model takes it.

    Dtypes follow one casting rule: a dtype converts only within its kind (float to float,
    integer to integer), which loses nothing the user meant; across kinds the data is
    rejected.

    Raises:
        InputError: The rank, a static dimension, or the dtype's kind does not fit.
    """
    rank, given = len(spec.shape), len(shape)
    if whole:
        layout = SampleLayout("one", 1) if given == rank else None
    elif has_batch_axis(spec):
        layout = (
            SampleLayout("rows", shape[0])
            if given == rank
            else SampleLayout("one", 1, lead=2)
            if given == rank - 1
            else None
        )
    elif given == rank + 1:
        layout = SampleLayout("stack", shape[0])
    elif given == rank == 0:
        layout = SampleLayout("one", 1)
    elif given == rank:
        fixed = spec.shape[0]
        if shape[0] % fixed:
            raise InputError(
                f"{where}: input '{spec.name}' expects shape {shape_text(spec)}, given "
                f"{tuple(shape)}: axis 0 must hold whole samples of {fixed} rows (or give a "
                f"stack of inputs with one more axis, axis 0 = samples)"
            )
        layout = SampleLayout("rows", shape[0] // fixed, group=fixed)
    else:
        layout = None
    if layout is None:
        what = "axis 0 = samples" if has_batch_axis(spec) else "one sample, or a stack on axis 0"
        raise InputError(
            f"{where}: input '{spec.name}' expects shape {shape_text(spec)} ({what}), "
            f"given {tuple(shape)} of rank {given}"
        )
    sample = layout.sample_shape(tuple(shape))
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim != sample[axis]:
            raise InputError(
                f"{where}: input '{spec.name}' expects shape {shape_text(spec)}, "
                f"given {tuple(shape)}: axis {axis} differs (axis {axis} must be {dim})"
            )
    if _kind(np.dtype(dtype)) != _kind(spec.dtype):
        raise InputError(
            f"{where}: input '{spec.name}' expects {spec.dtype} data, given {dtype} "
            "(a dtype converts only within its kind: float to float, integer to integer)"
        )
    return layout


def sample_layouts(
    specs: list[InputSpec],
    arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    where: str,
) -> dict[str, SampleLayout]:
    """Reads one file's (or item's) arrays as samples of the inputs: `sample_layout` each.

    Every array must hold the same number of samples; but when the counts differ and an
    array holds one sample by its rank (a scalar, say), the whole file is one sample, each
    array exactly as the model takes it (e.g. a batch of audio with its sample rate).

    Args:
        specs: The inputs (and labels) the arrays are for.
        arrays: Shape and dtype by input name.
        where: Where the arrays come from, for messages.

    Raises:
        InputError: See `sample_layout`; or the counts differ and cannot be one sample.
    """
    layouts = {s.name: sample_layout(s, *arrays[s.name], where) for s in specs}
    counts = {name: layout.count for name, layout in layouts.items()}
    if len(set(counts.values())) <= 1:
        return layouts
    kinds = {layout.kind for layout in layouts.values()}
    if "one" in kinds and "stack" not in kinds:
        return {
            s.name: layouts[s.name]
            if layouts[s.name].kind == "one"
            else sample_layout(s, *arrays[s.name], where, whole=True)
            for s in specs
        }
    detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
    raise InputError(f"{where}: arrays have different numbers of rows (samples): {detail}")


def conform(spec: InputSpec, array: np.ndarray, log: logging.Logger = logger) -> np.ndarray:
    """Casts a checked array to the input's dtype (within its kind, see `sample_layout`).

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
            feeds[spec.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            raise InputError(f"input '{spec.name}': cannot generate data of type {spec.dtype}")
    return feeds


def infer_concrete_shapes(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> ir.Model:
    """A copy of the model whose values carry the shapes inferred for these feeds.

    The copy's inputs take the feeds' concrete shapes, then ONNX shape inference runs with
    data propagation (exported models often leave spatial dims symbolic, which says nothing
    about sizes or work). The model is not modified.
    """
    copy = model.clone()
    for value in copy.graph.inputs:
        if value.name in feeds:
            value.shape = ir.Shape(np.shape(feeds[value.name]))
    for node in copy.graph:
        for value in node.outputs:
            # Shapes inferred earlier from symbolic inputs would win over concrete ones.
            value.shape = None
    return common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(
        copy
    ).model
