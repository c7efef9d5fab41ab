"""Calibration data sources: formats, batching and validation errors."""

from __future__ import annotations

import logging
import pickle
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from PIL import Image

from onnxq.calibration import data as data_module
from onnxq.calibration.data import ImagePreprocess, open_calibration_data
from onnxq.errors import InputError


def _rows(n: int, width: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _collect(data) -> dict[str, np.ndarray]:
    batches = list(data.batches())
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def test_npz_batches_cover_all_samples(tmp_path, mlp):
    x = _rows(21)
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=8)
    assert data.num_samples == 21 and data.num_batches == 3
    assert [len(b["x"]) for b in data.batches()] == [8, 8, 5]
    np.testing.assert_array_equal(_collect(data)["x"], x)


def test_compressed_npz_with_max_samples(tmp_path, two_inputs):
    a, ids = _rows(10, 3), np.arange(20).reshape(10, 2)
    np.savez_compressed(tmp_path / "c.npz", a=a, ids=ids)
    data = open_calibration_data(tmp_path / "c.npz", two_inputs, batch_size=4, max_samples=6)
    assert data.num_samples == 6
    got = _collect(data)
    np.testing.assert_array_equal(got["a"], a[:6])
    np.testing.assert_array_equal(got["ids"], ids[:6])


def test_npy_folder_mixes_single_samples_and_stacks(tmp_path, mlp):
    x = _rows(7)
    np.save(tmp_path / "0.npy", x[0])  # one sample, no sample axis
    np.save(tmp_path / "1.npy", x[1:5])  # a stack
    np.save(tmp_path / "2.npy", x[5:])
    data = open_calibration_data(tmp_path, mlp, batch_size=3)
    assert data.num_samples == 7
    assert [len(b["x"]) for b in data.batches()] == [3, 3, 1]
    np.testing.assert_array_equal(_collect(data)["x"], x)


def test_npz_folder(tmp_path, mlp):
    x = _rows(6)
    np.savez(tmp_path / "a.npz", x=x[:2])
    np.savez(tmp_path / "b.npz", x=x[2:])
    np.testing.assert_array_equal(_collect(open_calibration_data(tmp_path, mlp))["x"], x)


def _write_images(folder, count: int, size=(12, 10)) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    pixels = []
    for i in range(count):
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i}.png")
        pixels.append(array)
    return pixels


def test_image_folder_preprocessing(tmp_path, image_model):
    pixels = _write_images(tmp_path, 3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pre = ImagePreprocess(crop=8, mean=mean, std=std, channel_order="BGR")
    got = _collect(open_calibration_data(tmp_path, image_model, batch_size=2, preprocess=pre))["x"]
    assert got.shape == (3, 3, 8, 8) and got.dtype == np.float32
    # 12x10 image, 8x8 center crop: rows 1..9, columns 2..10.
    crop = pixels[0][1:9, 2:10].astype(np.float32) / 255
    expected = ((crop - mean) / std)[..., ::-1].transpose(2, 0, 1)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)


def test_image_resize_and_nhwc(tmp_path, text_model):
    _write_images(tmp_path, 2, size=(20, 16))
    model = text_model("g (float[N, 8, 8, 3] x) => (float[N, 8, 8, 3] y) { y = Relu(x) }")
    pre = ImagePreprocess(resize=10, crop=(8, 8), layout="NHWC")
    got = _collect(open_calibration_data(tmp_path, model, preprocess=pre))["x"]
    assert got.shape == (2, 8, 8, 3) and 0 <= got.min() and got.max() <= 1


def test_callable_spec(tmp_path, monkeypatch, two_inputs):
    (tmp_path / "calib_src.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def samples():
                for i in range(5):
                    yield {"a": np.full(3, i, np.float32), "ids": np.array([i, i])}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = open_calibration_data("calib_src:samples", two_inputs, batch_size=2)
    assert data.num_samples is None  # a callable cannot tell in advance
    got = _collect(data)
    np.testing.assert_array_equal(got["a"][:, 0], np.arange(5))
    # A second pass calls the function again.
    assert sum(len(b["a"]) for b in data.batches()) == 5
    sys.modules.pop("calib_src", None)


def test_callable_object_with_varying_dynamic_dims(text_model):
    model = text_model("g (float[N, T] x) => (float[N, T] y) { y = Relu(x) }")
    items = [{"x": np.zeros((1, 4), np.float32)}] * 3 + [{"x": np.zeros((2, 6), np.float32)}]
    data = open_calibration_data(lambda: items, model, batch_size=8)
    assert data.num_samples is None  # items may be stacks: unknown until read
    assert [b["x"].shape for b in data.batches()] == [(3, 4), (2, 6)]
    assert data.samples_read == 5


def test_static_batch_dimension_forces_batch_size(tmp_path, text_model):
    model = text_model("g (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }")
    np.savez(tmp_path / "c.npz", x=_rows(3))
    data = open_calibration_data(tmp_path / "c.npz", model, batch_size=8)
    assert data.batch_size == 1 and [len(b["x"]) for b in data.batches()] == [1, 1, 1]


@pytest.mark.parametrize("batch_dim", [-1, 0])
def test_batch_dimension_written_as_minus_1_or_0_is_dynamic(tmp_path, batch_dim):
    # Older exporters write a dynamic batch as -1 ([-1, 3, ?, ?]): not a static size.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch_dim, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch_dim, 3, 4, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = ir.from_proto(onnx.helper.make_model(graph))
    np.savez(tmp_path / "c.npz", x=_rows(5, 48).reshape(5, 3, 4, 4))
    data = open_calibration_data(tmp_path / "c.npz", model, batch_size=2)
    assert data.num_samples == 5 and [len(b["x"]) for b in data.batches()] == [2, 2, 1]


def test_float64_is_cast_with_debug_log(tmp_path, mlp, caplog):
    np.savez(tmp_path / "c.npz", x=_rows(2).astype(np.float64))
    with caplog.at_level(logging.DEBUG, logger="onnxq.calibration.data"):
        batch = next(open_calibration_data(tmp_path / "c.npz", mlp).batches())
    assert batch["x"].dtype == np.float32
    assert "casting input 'x' from float64 to float32" in caplog.text


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"y": _rows(2)}, ["missing x", "unexpected y", "expected: x"]),
        ({"x": _rows(2), "z": _rows(2)}, ["unexpected z", "expected: x"]),
        ({"x": _rows(2)[None]}, ["input 'x'", "[N, 4]", "(1, 2, 4)"]),
        ({"x": _rows(2, width=5)}, ["input 'x'", "[N, 4]", "(2, 5)", "axis 1 must be 4"]),
        ({"x": np.zeros((0, 4), np.float32)}, ["no samples"]),
        ({"x": np.array([[1, 2, 3, 4]], dtype=object)}, ["Python objects"]),
    ],
    ids=["missing", "extra", "rank", "static-dim", "empty", "object"],
)
def test_bad_npz(tmp_path, mlp, arrays, words):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(InputError) as info:
        open_calibration_data(tmp_path / "c.npz", mlp)
    for word in words:
        assert word in str(info.value)


def test_float_for_int_input_is_an_error(tmp_path, two_inputs):
    np.savez(tmp_path / "c.npz", a=_rows(2, 3), ids=np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match="input 'ids' expects int64 data, given float32"):
        open_calibration_data(tmp_path / "c.npz", two_inputs)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_values_name_input_and_sample(tmp_path, mlp, bad):
    x = _rows(10)
    x[6, 2] = bad
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=4)
    word = "NaN" if np.isnan(bad) else "Inf"
    with pytest.raises(InputError, match=f"input 'x' has {word} in sample 6"):
        list(data.batches())


def test_empty_and_mixed_folders(tmp_path, mlp):
    with pytest.raises(InputError, match=r"no \.npy, \.npz or image"):
        open_calibration_data(tmp_path, mlp)
    np.save(tmp_path / "a.npy", _rows(1))
    np.savez(tmp_path / "b.npz", x=_rows(1))
    with pytest.raises(InputError, match="mixes npy and npz"):
        open_calibration_data(tmp_path, mlp)


def test_image_folder_needs_preprocess(tmp_path, image_model):
    _write_images(tmp_path, 1)
    with pytest.raises(InputError, match="needs preprocessing settings"):
        open_calibration_data(tmp_path, image_model)


def test_npy_folder_needs_single_input(tmp_path, two_inputs):
    np.save(tmp_path / "a.npy", _rows(1, 3))
    with pytest.raises(InputError, match="single-input models"):
        open_calibration_data(tmp_path, two_inputs)


def test_bad_preprocess_and_options(mlp):
    with pytest.raises(InputError, match="layout"):
        ImagePreprocess(layout="CHW")
    with pytest.raises(InputError, match="std must not contain 0"):
        ImagePreprocess(std=(1, 0, 1))
    with pytest.raises(InputError, match="batch size"):
        open_calibration_data(lambda: [], mlp, batch_size=0)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no_such_module_xyz:fn", "cannot import module"),
        ("json:no_such_fn", "has no 'no_such_fn'"),
        ("missing/file.npz", "no such file"),
    ],
)
def test_bad_callable_specs(mlp, spec, words):
    with pytest.raises(InputError, match=words):
        open_calibration_data(spec, mlp)


def test_callable_errors(mlp):
    with pytest.raises(InputError, match="returned no calibration samples"):
        open_calibration_data(lambda: iter([]), mlp)
    with pytest.raises(InputError, match="expected a dict"):
        open_calibration_data(lambda: [np.zeros(4)], mlp)
    with pytest.raises(InputError, match="missing x"):
        open_calibration_data(lambda: [{"q": np.zeros(4)}], mlp)


def test_ir_model_is_accepted_unchanged(tmp_path, mlp):
    np.savez(tmp_path / "c.npz", x=_rows(2))
    before = ir.serde.serialize_model(mlp).SerializeToString()
    list(open_calibration_data(tmp_path / "c.npz", mlp).batches())
    assert ir.serde.serialize_model(mlp).SerializeToString() == before


def test_folder_of_samples_with_different_sizes_batches_equal_shapes(tmp_path, text_model):
    model = text_model("g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu(x) }")
    sizes = [(4, 4), (4, 4), (6, 5), (4, 4), (6, 5), (6, 5)]
    for i, (h, w) in enumerate(sizes):
        np.save(tmp_path / f"{i}.npy", np.full((1, 3, h, w), i, np.float32))
    data = open_calibration_data(tmp_path, model, batch_size=8)
    shapes = [(b["x"].shape, b.samples) for b in data.batches()]
    # A batch holds only samples of one shape; the order of the files is kept.
    assert shapes == [((2, 3, 4, 4), 2), ((1, 3, 6, 5), 1), ((1, 3, 4, 4), 1), ((2, 3, 6, 5), 2)]
    assert data.samples_read == 6


def test_model_without_a_dynamic_axis0_runs_one_sample_at_a_time(tmp_path, text_model):
    model = text_model(
        "g (float[N, 8] x, float[2, N, 8] h) => (float[N, 8] y) {"
        " s = ReduceSum <keepdims = 0> (h) y = Add(x, s) }"
    )
    x, h = _rows(5, 8), np.random.default_rng(1).standard_normal((5, 2, 1, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, h=h)
    data = open_calibration_data(tmp_path / "c.npz", model, batch_size=4)
    batches = list(data.batches())
    assert data.batch_size == 1 and data.num_samples == 5 and len(batches) == 5
    np.testing.assert_array_equal(batches[3]["x"], x[3:4])
    np.testing.assert_array_equal(batches[3]["h"], h[3])


def test_labels_travel_with_their_samples(tmp_path, mlp):
    x, y = _rows(10), np.arange(10)
    np.savez(tmp_path / "c.npz", x=x, label=y, extra=np.zeros(3))
    data = open_calibration_data(
        tmp_path / "c.npz", mlp, batch_size=4, labels_key="label", ignore_extra=True
    )
    batches = list(data.batches())
    assert [b.labels.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert "label" not in batches[0]


def test_integers_for_a_float_input_are_an_error(tmp_path, mlp):
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4), np.int32))
    with pytest.raises(InputError, match="converts only within its kind"):
        open_calibration_data(tmp_path / "c.npz", mlp)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (np.zeros((6, 4), np.float32), "calibration input 'x' is constant (every value is 0"),
        (_rows(6) * np.float32(1e30), "calibration input 'x' has values up to"),
        (_rows(6).astype(np.float64), "calibration input 'x': float64 data is cast to float32"),
    ],
    ids=["zeros", "1e30", "float64"],
)
def test_data_that_cannot_stand_for_real_inputs_is_said_once(tmp_path, mlp, caplog, x, fragment):
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="onnxq.calibration.data"):
        data.take(2)
        for _ in range(2):  # calibration, then the fidelity check
            list(data.batches())
    said = _warnings(caplog)
    assert len(said) == 1 and said[0].startswith(fragment), said


def test_ordinary_data_is_not_warned_about(tmp_path, two_inputs, caplog):
    np.savez(tmp_path / "c.npz", a=_rows(6, 3) * 1000, ids=np.ones((6, 2), np.int64))
    with caplog.at_level(logging.WARNING, logger="onnxq.calibration.data"):
        list(open_calibration_data(tmp_path / "c.npz", two_inputs).batches())
    assert _warnings(caplog) == []  # (a constant integer input, e.g. a mask, is ordinary)


def test_int_data_for_a_float_input_is_an_error(tmp_path, mlp):
    np.savez(tmp_path / "c.npz", x=np.ones((2, 4), np.int32))
    with pytest.raises(InputError, match="input 'x' expects float32 data, given int32"):
        open_calibration_data(tmp_path / "c.npz", mlp)


def test_integers_that_do_not_fit_the_input_type_are_an_error(tmp_path, caplog):
    model = ir.from_proto(
        onnx.parser.parse_model(
            '<ir_version: 8, opset_import: ["" : 17]>\n'
            "net (int32[N, 2] ids) => (int32[N, 2] y) { y = Identity (ids) }"
        )
    )
    np.savez(tmp_path / "c.npz", ids=np.array([[1, 2**40]], np.int64))
    data = open_calibration_data(tmp_path / "c.npz", model)
    with pytest.raises(InputError, match=r"input 'ids': values 1\.\.1099511627776 do not fit"):
        list(data.batches())


@pytest.mark.parametrize("layout", ["npz", "npy", "compressed", "folder"])
def test_batches_from_a_start_batch_are_the_whole_pass_tail(tmp_path, mlp, layout, monkeypatch):
    x = np.random.default_rng(0).standard_normal((23, 4)).astype(np.float32)
    if layout == "npz":
        np.savez(tmp_path / "d.npz", x=x)
    elif layout == "compressed":
        np.savez_compressed(tmp_path / "d.npz", x=x)
    elif layout == "npy":
        (tmp_path / "d").mkdir()
        np.save(tmp_path / "d" / "x.npy", x)
    else:  # two files: the start lies in the first, the second starts at its first row
        (tmp_path / "d").mkdir()
        np.savez(tmp_path / "d" / "a.npz", x=x[:10])
        np.savez(tmp_path / "d" / "b.npz", x=x[10:])
    spec = tmp_path / ("d.npz" if layout in ("npz", "compressed") else "d")
    data = open_calibration_data(spec, mlp, batch_size=4, max_samples=21)
    whole = list(data.batches())
    assert data._source.sample_runs() is not None  # every layout starts at its batch
    tail = list(data.batches(start=2))
    assert [b.first for b in tail] == [b.first for b in whole[2:]] == [8, 12, 16, 20]
    for got, want in zip(tail, whole[2:], strict=True):
        np.testing.assert_array_equal(got["x"], want["x"])


@pytest.mark.parametrize("source", ["folder of sizes", "callable"])
def test_batches_between_two_batches_are_the_whole_pass_slice(tmp_path, text_model, source):
    # Sizes change mid-batch: batches end early there, so batch k is not sample 2k.
    sizes = [(8, 8), (8, 8), (8, 8), (6, 10), (8, 8), (8, 8), (8, 8), (8, 8)]
    model = text_model(
        "g (float[N, 3, H, W] x) => (float[N, 3] y) "
        "{ y = ReduceMean <axes = [2, 3], keepdims = 0> (x) }"
    )
    if source == "callable":  # its items tell nothing before they are read
        rng = np.random.default_rng(4)
        items = [{"x": rng.random((1, 3, h, w), np.float32)} for w, h in sizes]
        data = open_calibration_data(lambda: items, model, batch_size=2)
        assert data._source.sample_runs() is None
    else:
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
        data = open_calibration_data(tmp_path, model, batch_size=2, preprocess=ImagePreprocess())
    whole = list(data.batches())
    assert [b.first for b in whole] == [0, 2, 3, 4, 6]
    for start, stop in [(1, 3), (2, None), (0, 1), (4, 9), (5, None), (3, 2)]:
        part = list(data.batches(start, stop))
        assert [b.first for b in part] == [b.first for b in whole[start:stop]], (start, stop)
        for got, want in zip(part, whole[start:stop], strict=True):
            np.testing.assert_array_equal(got["x"], want["x"])


class _Decoded:
    """Counts the samples the array files of a source decode."""

    def __init__(self, monkeypatch):
        self.samples = 0
        chunks = data_module._ArraySource.chunks

        def counting(source, rows, start=0):
            for arrays, where in chunks(source, rows, start):
                self.samples += len(next(iter(arrays.values())))
                yield arrays, where

        monkeypatch.setattr(data_module._ArraySource, "chunks", counting)


def test_held_data_is_decoded_once_and_every_read_gets_fresh_arrays(tmp_path, mlp, monkeypatch):
    x = _rows(20)
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=8)
    data.hold(1 << 20)
    assert data.resident_bytes == x.nbytes  # known from the header, before any read
    decoded = _Decoded(monkeypatch)
    first = list(data.batches())
    first[0]["x"][:] = 0  # a reader's arrays are its own: the held samples stay as read
    second, head = list(data.batches()), data.head(5)
    assert decoded.samples == 20
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in second]), x)
    assert [b.first for b in second] == [0, 8, 16]
    assert len(head) == 5 and all(b.samples == 1 for b in head)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in head]), x[:5])


def test_data_over_its_cap_stays_streamed(tmp_path, mlp, monkeypatch):
    np.savez(tmp_path / "c.npz", x=_rows(20))
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=8)
    data.hold(100)  # 20 x 4 float32 is 320 bytes: never held, nothing counted as held
    assert data.resident_bytes == 0
    decoded = _Decoded(monkeypatch)
    list(data.batches())
    list(data.batches())
    assert decoded.samples == 40


def test_a_read_cut_short_is_held_and_the_rest_is_read_once(tmp_path, mlp, monkeypatch):
    x = _rows(20)
    np.savez(tmp_path / "c.npz", x=x)
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=8)
    data.hold(1 << 20)
    decoded = _Decoded(monkeypatch)
    assert data.take(3).samples == 3  # the first samples only (e.g. --verify's)
    whole = list(data.batches())
    list(data.batches())
    assert decoded.samples == 20
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in whole]), x)


def test_a_held_callable_is_called_once(mlp):
    calls = []

    def samples():
        calls.append(1)
        return [{"x": _rows(3, seed=i)} for i in range(4)]

    held = open_calibration_data(samples, mlp, batch_size=2)
    held.hold(1 << 20)
    streamed = open_calibration_data(samples, mlp, batch_size=2)
    calls.clear()
    for _ in range(2):
        list(held.batches())
    assert len(calls) == 0  # the opening call's items serve the first pass, then memory
    for _ in range(2):
        list(streamed.batches())
    assert len(calls) == 1  # the second pass calls again


def test_held_samples_do_not_travel_to_workers(tmp_path, mlp):
    np.savez(tmp_path / "c.npz", x=_rows(20))
    data = open_calibration_data(tmp_path / "c.npz", mlp, batch_size=8)
    data.hold(1 << 20)
    list(data.batches())
    copy = pickle.loads(pickle.dumps(data))
    assert data._source._held is not None and copy._source._held is None
    assert copy.resident_bytes == 0 and len(list(copy.batches())) == 3


@pytest.mark.parametrize("cap", [1 << 20, 3000])
def test_cropped_images_are_held_when_they_fit_else_decoded_per_read(
    tmp_path, image_model, monkeypatch, cap
):
    _write_images(tmp_path, 5)
    data = open_calibration_data(
        tmp_path, image_model, batch_size=2, preprocess=ImagePreprocess(crop=8)
    )
    data.hold(cap)
    size = 5 * 8 * 8 * 3 * 4  # float32 crops: 3840 bytes, known before decoding any
    assert data.resident_bytes == (size if cap > size else 0)
    decoded = []
    apply = ImagePreprocess.apply
    monkeypatch.setattr(
        ImagePreprocess, "apply", lambda self, path: decoded.append(path) or apply(self, path)
    )
    first, second = _collect(data)["x"], _collect(data)["x"]
    np.testing.assert_array_equal(first, second)
    assert len(decoded) == (5 if cap > size else 10)
