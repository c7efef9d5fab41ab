"""The one rule for how arrays hold samples of model inputs, and the one casting rule."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.errors import InputError
from onnxq.inputs import InputSpec, conform, sample_layout, sample_layouts

F32, I64 = np.dtype(np.float32), np.dtype(np.int64)


def _spec(shape, dtype=F32, name="x"):
    return InputSpec(name, dtype, tuple(shape))


@pytest.mark.parametrize(
    ("model", "given", "kind", "count", "sample"),
    [
        (("N", 4), (6, 4), "rows", 6, (1, 4)),  # batch axis: one row per sample
        ((1, 4), (6, 4), "rows", 6, (1, 4)),  # axis 0 of 1 is a batch axis too
        (("N", 4), (4,), "one", 1, (1, 4)),  # one sample without its batch axis
        ((2, "N", 8), (2, 1, 8), "rows", 1, (2, 1, 8)),  # fixed axis 0: D rows a sample
        ((2, "N", 8), (6, 1, 8), "rows", 3, (2, 1, 8)),
        ((2, "N", 8), (5, 2, 1, 8), "stack", 5, (2, 1, 8)),  # one more axis: a stack
        ((), (), "one", 1, ()),  # a scalar input's sample is a scalar
        ((), (7,), "stack", 7, ()),
    ],
)
def test_sample_layout(model, given, kind, count, sample):
    layout = sample_layout(_spec(model), given, F32, "d")
    assert (layout.kind, layout.count) == (kind, count)
    stack = layout.samples(np.zeros(given, np.float32))
    assert stack.shape == (count, *sample)


@pytest.mark.parametrize(
    ("model", "given", "words"),
    [
        (("N", 4), (1, 2, 4), ["rank 3"]),  # a batch axis takes no stack of inputs
        (("N", 4), (2, 5), ["axis 1 must be 4"]),
        ((2, "N", 8), (3, 1, 8), ["whole samples of 2 rows"]),
        ((), (2, 3), ["rank 2"]),
    ],
)
def test_sample_layout_rejects(model, given, words):
    with pytest.raises(InputError) as info:
        sample_layout(_spec(model), given, F32, "d")
    assert all(w in str(info.value) for w in words)


@pytest.mark.parametrize(
    ("data", "model", "ok"),
    [
        (np.float64, F32, True),
        (np.int32, I64, True),
        (np.uint8, I64, True),
        (np.int32, F32, False),  # integers are not converted to floats
        (np.float32, I64, False),
        (np.bool_, F32, False),
    ],
)
def test_dtypes_convert_only_within_a_kind(data, model, ok):
    spec = _spec(("N", 2), model)
    if not ok:
        with pytest.raises(InputError, match="converts only within its kind"):
            sample_layout(spec, (3, 2), np.dtype(data), "d")
        return
    sample_layout(spec, (3, 2), np.dtype(data), "d")
    assert conform(spec, np.zeros((3, 2), data)).dtype == model


def test_a_scalar_makes_the_file_one_sample():
    specs = [_spec(("N", 8)), _spec((), name="sr")]
    layouts = sample_layouts(specs, {"x": ((5, 8), F32), "sr": ((), F32)}, "d")
    assert {n: (lay.kind, lay.count) for n, lay in layouts.items()} == {
        "x": ("one", 1),
        "sr": ("one", 1),
    }
    assert layouts["x"].samples(np.zeros((5, 8))).shape == (1, 5, 8)


def test_different_sample_counts_are_an_error():
    specs = [_spec(("N", 8)), _spec(("N", 2), name="m")]
    with pytest.raises(InputError, match=r"different numbers of rows \(samples\): x: 5, m: 4"):
        sample_layouts(specs, {"x": ((5, 8), F32), "m": ((4, 2), F32)}, "d")
