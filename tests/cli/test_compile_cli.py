"""``onnxq compile``, ``passes`` and ``inspect`` as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.errors import EXIT_USAGE


def assert_one_line_error(result, *fragments: str) -> None:
    """A user error: non-zero exit, one ``error:`` line on stderr, no traceback."""
    assert result.exit_code == EXIT_USAGE, result.output
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture
def conv_bn_relu_file(conv_bn_relu_model, save_onnx) -> Path:
    return save_onnx(conv_bn_relu_model, "convnet.onnx")


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in ("compile", "inspect", "passes"):
        assert name in result.output


def test_passes_lists_the_builtin_passes(cli):
    result = cli("passes")

    assert result.exit_code == 0
    lines = {line.split()[1]: line.split()[0] for line in result.output.splitlines()}
    assert lines["FoldBatchNormPass"] == "fuse"
    assert lines["TopologicalSortPass"] == "cleanup"


def test_inspect_text(cli, conv_bn_relu_file):
    result = cli("inspect", conv_bn_relu_file)

    assert result.exit_code == 0, result.output
    out = result.output
    assert "x: FLOAT [1, 3, 8, 8]" in out
    assert "Conv x2" in out and "BatchNormalization x2" in out
    assert "parameters: 162 " in out  # 4*3*3*3 + 4 + 4*4 + 2 + 2 * 4 * 4 BN stats
    assert "batchnorm_folded=2" in out


def test_inspect_json(cli, conv_bn_relu_file):
    result = cli("inspect", "--json", conv_bn_relu_file)

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["ops"] == {"Conv": 2, "BatchNormalization": 2, "Relu": 1, "Clip": 1}
    assert info["opsets"] == {"": 17}
    assert info["parameters"] == 162
    assert info["parameter_bytes"] == 162 * 4
    assert info["fusion"] == {
        "batchnorm_folded": 2,
        "conv_activation_units": 2,
        "matmul_bias_units": 0,
    }


def test_inspect_does_not_change_the_file(cli, conv_bn_relu_file):
    digest = hashlib.sha256(conv_bn_relu_file.read_bytes()).hexdigest()
    assert cli("inspect", conv_bn_relu_file).exit_code == 0
    assert hashlib.sha256(conv_bn_relu_file.read_bytes()).hexdigest() == digest


def test_compile_folds_every_batchnorm(
    cli, conv_bn_relu_file, tmp_path, assert_same_outputs, op_types_of
):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    digest = hashlib.sha256(conv_bn_relu_file.read_bytes()).hexdigest()

    result = cli("compile", "--no-quantize", conv_bn_relu_file, "-o", out, "--report", report)

    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 6 -> 4 nodes" in result.output
    assert "batchnorm: folded 2 of 2" in result.output
    compiled = onnx.load(out)
    assert "BatchNormalization" not in op_types_of(compiled)
    onnx.checker.check_model(compiled, full_check=True)
    assert_same_outputs(conv_bn_relu_file, out, tol=1e-4)
    assert json.loads(report.read_text())["nodes_after"] == 4
    assert hashlib.sha256(conv_bn_relu_file.read_bytes()).hexdigest() == digest


def test_compile_with_verify(cli, conv_bn_relu_file, tmp_path):
    result = cli("compile", "--no-quantize", "--verify", conv_bn_relu_file, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output


def test_model_without_batchnorm_is_already_fused(cli, matmul_add_relu_model, save_onnx, tmp_path):
    result = cli("compile", "--no-quantize", save_onnx(matmul_add_relu_model), "-o", tmp_path / "o")

    assert result.exit_code == 0, result.output
    assert "already fused" in result.output


def test_opset_7_model_compiles_and_inspects(
    cli, build_onnx, save_onnx, tmp_path, assert_same_outputs, op_types_of
):
    rng = np.random.default_rng(12)
    weights = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "gamma": (1 + rng.random(4)).astype(np.float32),
        "beta": rng.standard_normal(4).astype(np.float32),
        "mean": rng.standard_normal(4).astype(np.float32),
        "var": (0.5 + rng.random(4)).astype(np.float32),
    }
    old = save_onnx(
        build_onnx(
            """
            net (float[1,3,8,8] x) => (float[1,4,6,6] y) {
                c = Conv (x, w)
                n = BatchNormalization (c, gamma, beta, mean, var)
                y = Relu (n)
            }
            """,
            weights,
            opset=7,
        ),
        "opset7.onnx",
    )

    inspected = cli("inspect", "--json", old)
    compiled = cli("compile", "--no-quantize", old, "-o", tmp_path / "out.onnx")

    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["opsets"] == {"": 7}
    assert compiled.exit_code == 0, compiled.output
    assert op_types_of(onnx.load(tmp_path / "out.onnx")) == ["Conv", "Relu"]
    assert_same_outputs(old, tmp_path / "out.onnx", tol=1e-4)


def _write_bad_input(kind: str, model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.onnx"
    data = model.SerializeToString()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("name,value\na,1\n")
    elif kind == "empty":
        path.write_bytes(b"")
    return path  # "missing": not written


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "no such file"),
        ("empty", "file is empty"),
        ("truncated", "not a valid ONNX model"),
        ("text", "not"),
    ],
)
@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_bad_model_file_is_one_line(cli, command, kind, fragment, conv_bn_relu_model, tmp_path):
    path = _write_bad_input(kind, conv_bn_relu_model, tmp_path)
    args = ["--no-quantize", path, "-o", tmp_path / "out.onnx"] if command == "compile" else [path]

    result = cli(command, *args)

    assert_one_line_error(result, str(path), fragment)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_value_produced_twice_is_one_line(cli, command, conv_bn_relu_model, save_onnx, tmp_path):
    conv_bn_relu_model.graph.node[1].output[0] = conv_bn_relu_model.graph.node[0].output[0]
    path = save_onnx(conv_bn_relu_model, "ssa.onnx")
    args = ["--no-quantize", path, "-o", tmp_path / "out.onnx"] if command == "compile" else [path]

    result = cli(command, *args)

    assert_one_line_error(result, str(path), "value 'c1' is produced twice")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("args", "pyproject", "fragment"),
    [
        (("--min-sqnr", "nan"), "", "--min-sqnr"),
        (("--min-agreement", "0"), "", "--min-agreement"),
        (("--tune-budget", "nan"), "", "tune budget"),
        ((), "[tool.onnxq]\nmin-sqnr = nan\n", "min-sqnr"),
        ((), "[tool.onnxq]\ntune-budget = -1\n", "tune-budget"),
    ],
)
def test_vacuous_fidelity_thresholds_are_usage_errors(
    cli, conv_bn_relu_file, tmp_path, monkeypatch, args, pyproject, fragment
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(pyproject)
    result = cli("compile", conv_bn_relu_file, "-o", tmp_path / "out.onnx", *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert fragment in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (np.zeros((4, 3, 8, 8), np.float32), "is constant"),
        (np.linspace(1e29, 1e30, 4 * 3 * 8 * 8, dtype=np.float32).reshape(4, 3, 8, 8), "up to"),
        (np.random.default_rng(0).standard_normal((4, 3, 8, 8)), "float64 data is cast"),
    ],
    ids=["zeros", "1e30", "float64"],
)
def test_degenerate_calibration_data_is_one_warning_line(
    cli, conv_bn_relu_file, tmp_path, x, fragment
):
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "out.onnx"

    result = cli(
        "compile", conv_bn_relu_file, "-o", out, "--calibration-data", tmp_path / "calib.npz"
    )

    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "calibration input 'x'" in line]
    assert len(said) == 1 and fragment in said[0], result.stderr


def test_op_types_that_match_nothing_are_named(cli, conv_bn_relu_file, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out.onnx"
    args = ("compile", conv_bn_relu_file, "-o", out, "--calibration-data", data)

    unknown = cli(*args, "--op-types", "Foo")
    absent = cli(*args, "--op-types", "Conv,Gemm", "--no-latency-check")

    assert_one_line_error(unknown, "'Foo' is no ONNX operator")
    assert absent.exit_code == 0, absent.output
    said = [line for line in absent.stderr.splitlines() if "--op-types" in line]
    assert len(said) == 1 and "Gemm: no such node in this model" in said[0], absent.stderr
    assert "nothing will be quantized" not in said[0]


def test_float16_model_says_why_nothing_is_quantized(cli, build_onnx, save_onnx, tmp_path):
    rng = np.random.default_rng(0)
    proto = build_onnx(
        """
        net (float16[N,3,8,8] x) => (float16[N,4,8,8] y) {
            [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
            [relu1] r1 = Relu (c1)
            [conv2] y = Conv <pads = [1, 1, 1, 1]> (r1, w2)
        }
        """,
        {
            "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float16),
            "w2": rng.standard_normal((4, 4, 3, 3)).astype(np.float16),
        },
    )
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((4, 3, 8, 8)).astype(np.float16))
    report = tmp_path / "report.json"

    result = cli(
        "compile", save_onnx(proto, "fp16.onnx"), "-o", tmp_path / "out.onnx",
        "--calibration-data", data, "--report", report,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "float16" in line]
    assert len(said) == 1 and "whatever --target" in said[0], result.stderr
    reasons = json.loads(report.read_text())["not_quantized"]
    assert {"conv1", "conv2"} <= set(reasons)
    assert all("float16 tensors are left as they are" in r for r in reasons.values())


def test_output_equal_to_input_is_refused(cli, conv_bn_relu_file):
    digest = hashlib.sha256(conv_bn_relu_file.read_bytes()).hexdigest()

    result = cli("compile", "--no-quantize", conv_bn_relu_file, "-o", conv_bn_relu_file)

    assert_one_line_error(result, "output path is the input model")
    assert hashlib.sha256(conv_bn_relu_file.read_bytes()).hexdigest() == digest


def test_output_folder_missing_is_refused(cli, conv_bn_relu_file, tmp_path):
    result = cli("compile", "--no-quantize", conv_bn_relu_file, "-o", tmp_path / "no" / "o.onnx")
    assert_one_line_error(result, "does not exist")


def test_bad_user_pass_spec_is_one_line(cli, conv_bn_relu_file, tmp_path):
    result = cli(
        "compile", "--no-quantize", conv_bn_relu_file, "-o", tmp_path / "o", "--pass", "nope:X"
    )
    assert_one_line_error(result, "cannot import 'nope'")


def test_user_pass_from_the_command_line(cli, conv_bn_relu_file, tmp_path, monkeypatch):
    (tmp_path / "cli_user_pass.py").write_text(
        textwrap.dedent(
            '''
            import onnx_ir as ir

            class NegateOutput(ir.passes.InPlacePass):
                """Appends a Neg to the graph output."""

                def call(self, model):
                    graph = model.graph
                    old = graph.outputs[0]
                    node = ir.node("Neg", [old], name="negate_output")
                    node.outputs[0].name = "negated"
                    node.outputs[0].shape, node.outputs[0].type = old.shape, old.type
                    graph.append(node)
                    graph.outputs[0] = node.outputs[0]
                    return ir.passes.PassResult(model, modified=True)
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.onnx"

    result = cli(
        "compile", "--no-quantize", conv_bn_relu_file, "-o", out, "--pass", "cli_user_pass:Negate"
    )
    assert_one_line_error(result, "'Negate' not found")

    result = cli(
        "compile",
        "--no-quantize",
        conv_bn_relu_file,
        "-o",
        out,
        "--pass",
        "cli_user_pass:NegateOutput",
    )
    assert result.exit_code == 0, result.output
    assert onnx.load(out).graph.node[-1].op_type == "Neg"


def test_unknown_option_is_a_usage_error(cli, conv_bn_relu_file):
    result = cli("compile", conv_bn_relu_file, "--no-such-flag")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


def test_debug_raises_the_original_exception(cli, tmp_path):
    result = cli("--debug", "inspect", tmp_path / "missing.onnx")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "InputError"


# ---------------------------------------------------------------------------- subprocess


def _run(*args: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_python_m_onnxq_help(tmp_path):
    result = _run(sys.executable, "-m", "onnxq", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compile" in result.stdout


@pytest.fixture
def onnxq_script() -> Path:
    found = shutil.which("onnxq", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the onnxq console script is not installed beside this Python")
    return Path(found)


def test_onnxq_compile_subprocess(onnxq_script, conv_bn_relu_file, tmp_path, op_types_of):
    result = _run(
        onnxq_script, "compile", "--no-quantize", conv_bn_relu_file, "-o", "out.onnx", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "BatchNormalization" not in op_types_of(onnx.load(tmp_path / "out.onnx"))


def test_errors_and_debug_traceback_subprocess(onnxq_script, tmp_path):
    plain = _run(onnxq_script, "inspect", "missing.onnx", cwd=tmp_path)
    debug = _run(onnxq_script, "--debug", "inspect", "missing.onnx", cwd=tmp_path)

    assert plain.returncode == EXIT_USAGE
    assert plain.stderr.strip().splitlines()[-1] == "error: missing.onnx: no such file"
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "InputError: missing.onnx: no such file" in debug.stderr
