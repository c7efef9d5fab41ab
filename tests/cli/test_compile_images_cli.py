"""``onnxq compile`` with a folder of images as calibration data: the preprocessing flags."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import build_model, seeded
from PIL import Image

from onnxq.calibration.data import open_calibration_data
from onnxq.config import CompileConfig
from onnxq.io import load_model

# The conv sees NCHW; the NHWC model transposes its input first.
NETS = {
    "NCHW": """
        net (float[N,3,8,8] x) => (float[N,4,8,8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            r = Relu (c)
            y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        }
        """,
    "NHWC": """
        net (float[N,8,8,3] x) => (float[N,4,8,8] y) {
            t = Transpose <perm = [0, 3, 1, 2]> (x)
            c = Conv <pads = [1, 1, 1, 1]> (t, w1, b1)
            r = Relu (c)
            y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        }
        """,
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(params=["NCHW", "NHWC"])
def layout(request) -> str:
    return request.param


@pytest.fixture
def net_file(tmp_path, layout):
    path = tmp_path / f"net_{layout}.onnx"
    onnx.save(build_model(NETS[layout], _weights()), path)
    return path


def _write_images(folder, size: tuple[int, int], count: int = 4) -> list[np.ndarray]:
    """PNGs and JPEGs of random pixels (``size`` is width, height); returns them as decoded."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    decoded = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / (f"img{i}.png" if i % 2 else f"img{i}.jpg")
        Image.fromarray(pixels).save(path)
        # JPEG is lossy: the reference starts from the pixels as stored.
        with Image.open(path) as img:
            decoded.append(img.convert("RGB"))
    return decoded


def _reference(
    images, resized: tuple[int, int], top: int, left: int, layout: str, bgr: bool
) -> np.ndarray:
    """The documented steps in numpy: resize to ``resized`` (PIL bilinear), crop 8x8, ...."""
    arrays = []
    for img in images:
        pixels = np.asarray(img.resize(resized, Image.BILINEAR) if img.size != resized else img)
        crop = pixels[top : top + 8, left : left + 8].astype(np.float64)
        values = (crop / 255 - np.array(MEAN)) / np.array(STD)
        if bgr:
            values = values[..., ::-1]
        arrays.append(values.transpose(2, 0, 1) if layout == "NCHW" else values)
    return np.stack(arrays).astype(np.float32)


def _preprocessed(folder, model_path, **settings) -> np.ndarray:
    config = CompileConfig(mean=MEAN, std=STD, **settings)
    data = open_calibration_data(
        folder, load_model(model_path), batch_size=16, preprocess=config.image_preprocess
    )
    return np.concatenate([batch["x"] for batch in data.batches()])


def test_default_size_and_layout_come_from_the_model(tmp_path, net_file, layout):
    # 12x10 images, an 8x8 input: resized by 0.8 to 10x8 (covering 8x8), cropped at column 1.
    images = _write_images(tmp_path / "images", (12, 10))
    got = _preprocessed(tmp_path / "images", net_file)
    expected = _reference(images, (10, 8), top=0, left=1, layout=layout, bgr=False)
    assert got.shape == ((4, 3, 8, 8) if layout == "NCHW" else (4, 8, 8, 3))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_resize_shorter_then_center_crop_bgr(tmp_path, net_file, layout):
    # 24x16 images, short side to 10: 15x10, then the 8x8 center crop at row 1, column 3.
    images = _write_images(tmp_path / "images", (24, 16))
    got = _preprocessed(
        tmp_path / "images", net_file, resize_shorter=10, image_size=(8, 8), channel_order="BGR"
    )
    expected = _reference(images, (15, 10), top=1, left=3, layout=layout, bgr=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_images_of_the_input_size_are_not_resized(tmp_path, net_file, layout):
    images = _write_images(tmp_path / "images", (8, 8))
    got = _preprocessed(tmp_path / "images", net_file, layout=layout)
    expected = _reference(images, (8, 8), top=0, left=0, layout=layout, bgr=False)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_compile_int8_from_an_image_folder(cli, tmp_path, net_file, layout):
    images = _write_images(tmp_path / "images", (24, 16))
    out, ranges = tmp_path / "int8.onnx", tmp_path / "ranges.json"
    result = cli(
        "compile", net_file, "-o", out, "--calibration-data", tmp_path / "images",
        "--resize-shorter", "10", "--mean", ",".join(map(str, MEAN)),
        "--std", ",".join(map(str, STD)), "--scale", "1/255", "--channel-order", "bgr",
        "--no-latency-check", "--save-ranges", ranges,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The input's calibrated range is that of the flags' preprocessing, done in numpy.
    expected = _reference(images, (15, 10), top=1, left=3, layout=layout, bgr=True)
    lo, hi = json.loads(ranges.read_text())["ranges"]["x"]
    np.testing.assert_allclose([lo, hi], [expected.min(), expected.max()], rtol=0, atol=1e-5)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": expected})
    assert y.shape == (4, 4, 8, 8) and np.isfinite(y).all()


def test_image_settings_from_the_config_file(cli, tmp_path, net_file, layout):
    _write_images(tmp_path / "images", (8, 8), count=2)
    config = tmp_path / "settings.toml"
    config.write_text(
        "[tool.onnxq]\n"
        f'layout = "{layout}"\n'
        "image-size = [8, 8]\n"
        'scale = "1/255"\n'
        "mean = [0.5, 0.5, 0.5]\n"
        "std = 0.25\n"
        'channel-order = "BGR"\n'
    )
    report = tmp_path / "report.json"
    result = cli(
        "compile", net_file, "-o", tmp_path / "o.onnx", "--config", config, "--report", report,
        "--calibration-data", tmp_path / "images", "--no-latency-check", "--check-samples", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads(report.read_text())["config"]
    assert settings["layout"] == layout and settings["image_size"] == [8, 8]
    assert settings["mean"] == [0.5] * 3 and settings["std"] == [0.25] * 3
    assert settings["scale"] == pytest.approx(1 / 255) and settings["channel_order"] == "BGR"


def _one_line_error(result, *fragments, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_bad_image_file_is_one_line_naming_it(cli, tmp_path, content):
    _write_images(tmp_path / "images", (8, 8), count=2)
    bad = tmp_path / "images" / "zz_bad.png"
    if content == "truncated":
        content = (tmp_path / "images" / "img1.png").read_bytes()[:60]
    bad.write_bytes(content)
    model = tmp_path / "m.onnx"
    onnx.save(build_model(NETS["NCHW"], _weights()), model)
    result = cli("compile", model, "-o", tmp_path / "o.onnx", "--calibration-data", bad.parent)
    _one_line_error(result, "zz_bad.png", "cannot read image")
    assert not (tmp_path / "o.onnx").exists()


def _weights() -> dict[str, np.ndarray]:
    """Seeded weights of `NETS`: two 3x3 convs, 3 -> 4 -> 4 channels, with biases."""
    normal = seeded(0)
    shapes = {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3), "b2": (4,)}
    return {k: normal(*shape, scale=0.3 if k[0] == "w" else 0.1) for k, shape in shapes.items()}


@pytest.mark.parametrize(
    ("shape", "flags", "fragments"),
    [
        ("N,3,8,3", (), ("cannot tell the image layout", "--layout")),
        ("N,1,8,8", (), ("3 channels", "no axis of 3")),
        ("N,1,8,8", ("--layout", "NCHW"), ("3 channels", "takes 1 channels as NCHW")),
        ("N,3,8,8", ("--image-size", "6,6"), ("image size 6x6", "'x'", "8x8")),
    ],
)
def test_images_that_cannot_fit_the_input(cli, tmp_path, shape, flags, fragments):
    _write_images(tmp_path / "images", (8, 8), count=2)
    model = tmp_path / "m.onnx"
    onnx.save(build_model(f"g (float[{shape}] x) => (float[{shape}] y) {{ y = Relu (x) }}"), model)
    result = cli(
        "compile", model, "-o", tmp_path / "o.onnx", "--calibration-data", tmp_path / "images",
        *flags,
    )  # fmt: skip
    _one_line_error(result, *fragments)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--mean", "0.5,0.5"), ("--std", "a,b,c"), ("--scale", "1/0"), ("--image-size", "8.5")],
)
def test_bad_image_flag_values_are_usage_errors(cli, tmp_path, flag, value):
    model = tmp_path / "m.onnx"
    onnx.save(build_model(NETS["NCHW"], _weights()), model)
    result = cli("compile", model, "-o", tmp_path / "o.onnx", flag, value)
    assert result.exit_code == 2 and flag in result.output, result.output
    assert "Traceback" not in result.output


def test_zero_std_is_rejected(cli, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build_model(NETS["NCHW"], _weights()), model)
    result = cli("compile", model, "-o", tmp_path / "o.onnx", "--std", "0.2,0,0.2")
    _one_line_error(result, "std must not contain 0")
