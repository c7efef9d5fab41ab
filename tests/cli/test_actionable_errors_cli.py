"""Errors a user can act on: one line naming the file, key, input or flag; no raw ORT text."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from classifier_fixtures import dataset, write_pair
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import EXIT_USAGE

VOCAB = 10


def _one_error_line(result) -> str:
    assert result.exit_code == EXIT_USAGE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture
def files(tmp_path) -> Path:
    write_pair(tmp_path)
    np.savez(tmp_path / "calib.npz", x=dataset()[0])
    return tmp_path


# ------------------------------------------------------------------ unwritable output folder

# sysfs refuses new files even to root (for whom os.access says every folder is writable).
UNWRITABLE = Path("/sys")


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs /sys")
@pytest.mark.parametrize(
    ("flag", "command"),
    [
        ("-o", ("compile", "{f}/ref.onnx", "--no-quantize")),
        ("--report", ("compile", "{f}/ref.onnx", "--no-quantize", "-o", "{f}/o.onnx")),
        ("--save-ranges", ("compile", "{f}/ref.onnx", "--calibration-data", "{f}/calib.npz",
                           "-o", "{f}/o.onnx")),
        ("--json", ("bench", "{f}/ref.onnx")),
        ("--junit", ("gate", "{f}/ref.onnx", "{f}/cand.onnx", "--data", "{f}/data.npz",
                     "--min-sqnr", "1")),
    ],
)  # fmt: skip
def test_unwritable_output_folder_names_the_output_before_any_work(cli, files, flag, command):
    out = UNWRITABLE / "onnxq-out.file"
    result = cli(*(part.format(f=files) for part in command), flag, out)
    line = _one_error_line(result)
    assert f"{flag} {out}" in line and "cannot write" in line
    assert ".tmp" not in line  # not the hidden temporary file
    assert not (files / "o.onnx").exists()  # refused before compiling


def test_a_failed_write_names_the_output_not_its_temporary_file(cli, files, monkeypatch):
    import onnx_ir as ir

    def disk_full(model, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ir, "save", disk_full)
    result = cli("compile", files / "ref.onnx", "--no-quantize", "-o", files / "o.onnx")
    line = _one_error_line(result)
    assert f"{files / 'o.onnx'}: cannot write: No space left on device" in line
    assert ".tmp" not in line
    assert not [p.name for p in files.iterdir() if p.name.startswith(".")]


def test_save_ranges_into_a_missing_folder_is_refused_before_compiling(cli, files):
    ranges = files / "missing" / "r.json"
    result = cli(
        "compile", files / "ref.onnx", "--calibration-data", files / "calib.npz",
        "-o", files / "o.onnx", "--save-ranges", ranges,
    )  # fmt: skip
    line = _one_error_line(result)
    assert f"--save-ranges {ranges}" in line and "does not exist" in line
    assert not (files / "o.onnx").exists()


# ------------------------------------------------------------------ files that are not .npz


@pytest.mark.parametrize("content", ["random", "zip-magic"])
@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (("gate", "{f}/ref.onnx", "{f}/cand.onnx", "--min-sqnr", "1", "--data"), "--data"),
        (("eval", "{f}/ref.onnx", "{f}/cand.onnx", "--data"), "--data"),
        (("bench", "{f}/ref.onnx", "--data"), "--data"),
        (("compile", "{f}/ref.onnx", "-o", "{f}/o.onnx", "--calibration-data"), "calibration"),
        (("compile", "{f}/ref.onnx", "-o", "{f}/o.onnx", "--no-quantize", "--prune"), "mask:"),
    ],
)
def test_a_random_bytes_npz_is_not_a_valid_npz(cli, files, command, flag, content):
    junk = files / "junk.npz"
    rng = np.random.default_rng(0)
    head = b"PK\x03\x04" if content == "zip-magic" else b""
    junk.write_bytes(head + rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
    value = f"mask:{junk}" if flag == "mask:" else junk
    line = _one_error_line(cli(*(part.format(f=files) for part in command), value))
    assert str(junk) in line and "not a valid .npz" in line
    assert "pickle" not in line  # never advise loading untrusted data unsafely


# ------------------------------------------------------------------ [tool.onnxq] value types


@pytest.mark.parametrize(
    ("table", "entry", "command"),
    [
        ("tool.onnxq", 'max-samples = "100"', ("compile", "{f}/ref.onnx", "-o", "{f}/o.onnx")),
        ("tool.onnxq", 'percentile = "99.9"', ("compile", "{f}/ref.onnx", "-o", "{f}/o.onnx")),
        ("tool.onnxq", "tune-budget = [1]", ("compile", "{f}/ref.onnx", "-o", "{f}/o.onnx")),
        ("tool.onnxq", 'check-samples = "8"', ("compile", "{f}/ref.onnx", "-o", "{f}/o.onnx")),
        ("tool.onnxq.gate", 'min-sqnr = "20"',
         ("gate", "{f}/ref.onnx", "{f}/cand.onnx", "--data", "{f}/data.npz")),
    ],
)  # fmt: skip
def test_a_wrongly_typed_config_value_names_its_key(cli, files, table, entry, command):
    config = files / "cfg.toml"
    config.write_text(f"[{table}]\n{entry}\n")
    args = [part.format(f=files) for part in command]
    line = _one_error_line(cli(args[0], "--config", config, *args[1:]))
    assert entry.split(" =")[0] in line and str(config) in line
    assert "not supported between" not in line


# ------------------------------------------------------------------ feeds that do not fit


@pytest.fixture
def embedding(tmp_path) -> tuple[Path, Path]:
    """ids[N, 3] (int64) -> Gather from a VOCAB x 4 table -> mean; data with id 30."""
    table = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((VOCAB, 4)).astype(np.float32), "E"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
            helper.make_node("ReduceMean", ["h"], ["y"], keepdims=0),
        ],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "emb.onnx")
    ids = np.array([[1, 2, 30]] * 4, np.int64)
    np.savez(tmp_path / "ids.npz", ids=ids)
    return tmp_path / "emb.onnx", tmp_path / "ids.npz"


@pytest.mark.parametrize("command", ["compile", "eval", "bench"])
def test_token_ids_outside_the_vocabulary_are_one_line_naming_the_input(
    cli, embedding, capfd, tmp_path, command
):
    model, data = embedding
    args = {
        "compile": ("compile", model, "--calibration-data", data, "-o", tmp_path / "o.onnx"),
        "eval": ("eval", model, model, "--data", data),
        "bench": ("bench", model, "--data", data, "--time-budget", "0.05"),
    }[command]
    line = _one_error_line(cli(*args))
    assert "input 'ids'" in line and "30" in line and f"below {VOCAB}" in line
    assert "ONNXRuntimeError" not in line
    # ORT writes its own log to file descriptor 2: nothing of it may show.
    assert "onnxruntime" not in capfd.readouterr().err


def test_bench_shape_contradicting_a_fixed_dimension_is_one_line(cli, files, capfd):
    line = _one_error_line(cli("bench", files / "ref.onnx", "--shape", "x=1,5"))
    assert "input 'x'" in line and "axis 1" in line and "fixed at 8" in line
    assert "ONNXRuntimeError" not in line
    assert "onnxruntime" not in capfd.readouterr().err


def test_ort_feed_errors_are_re_said_naming_the_input():
    from onnxq.runtime import feed_error

    feeds = {"x": np.zeros((1, 5), np.float32), "ids": np.zeros((1, 3), np.int64)}
    dims = (
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for "
        "the following indices\n index: 1 Got: 5 Expected: 8\n Please fix either the inputs/"
        "outputs or the model."
    )
    assert (
        feed_error(dims, feeds)
        == "input 'x' does not fit the model: axis 1 is 5, the model expects 8"
    )
    rank = "Invalid rank for input: ids Got: 1 Expected: 2 Please fix either"
    assert feed_error(rank, feeds) == "input 'ids' has rank 1, the model expects rank 2"
    wrong = "Unexpected input data type. Actual: (tensor(int64)) , expected: (tensor(float))"
    types = {"x": "tensor(float)", "ids": "tensor(float)"}
    assert feed_error(wrong, feeds, types).startswith("input 'ids' is tensor(int64)")
    assert feed_error("some other failure", feeds) is None  # left as ORT said it


def test_onnxq_sessions_do_not_log_to_stderr(embedding, capfd):
    from onnxq import runtime
    from onnxq.errors import InputError

    model, _ = embedding
    session = runtime.create_session(model)
    with pytest.raises(InputError, match="input 'ids'"):
        session.run(None, {"ids": np.array([[0, 1, 99]], np.int64)})
    assert capfd.readouterr().err == ""
    assert os.path.exists(model)
