"""``--config`` and ``./pyproject.toml``: option defaults keyed like the flags."""

from __future__ import annotations

import json

import pytest

from onnxq.errors import EXIT_USAGE


@pytest.fixture
def compile_config(cli, conv_bn_relu_model, save_onnx, tmp_path):
    """``run(toml, *flags)``: compiles in fp32 with ``--config`` and returns (result, config)."""
    model = save_onnx(conv_bn_relu_model)

    def run(toml: str, *flags: str):
        path = tmp_path / "settings.toml"
        path.write_text(toml)
        report = tmp_path / "report.json"
        out = tmp_path / "out.onnx"
        result = cli("compile", model, "-o", out, "--report", report, "--config", path, *flags)
        config = json.loads(report.read_text())["config"] if result.exit_code == 0 else None
        return result, config

    return run


def test_keys_are_named_like_the_flags(compile_config):
    result, config = compile_config(
        "[tool.onnxq]\n"
        'method = "percentile"\n'
        "batch-size = 4\n"
        "check_samples = 0\n"
        'exclude = ["head.*", "classifier"]\n'
        "quantize = false\n"
        "latency-check = false\n"
        "[tool.onnxq.gate]\n"
        "min-sqnr = 30\n"
    )

    assert result.exit_code == 0, result.output
    assert config["calibration_method"] == "percentile"
    assert config["batch_size"] == 4
    assert config["verify_samples"] == 0
    assert config["exclude"] == ["head.*", "classifier"]
    assert config["quantize"] is False and config["check_latency"] is False
    assert result.stderr == ""


def test_flags_win_over_the_file(compile_config):
    result, config = compile_config(
        '[tool.onnxq]\ntarget = "avx2"\nquantize = false\n', "--target", "vnni"
    )
    assert result.exit_code == 0, result.output
    assert config["target"] == "vnni"


def test_old_key_names_work_with_one_warning(compile_config):
    result, config = compile_config(
        '[tool.onnxq]\ncalibration-method = "entropy"\nquantize = false\n'
    )

    assert result.exit_code == 0, result.output
    assert config["calibration_method"] == "entropy"
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1
    assert "'calibration-method' is deprecated" in warnings[0] and "'method'" in warnings[0]


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ("method-x = 1", ["unknown key 'method-x'", "[tool.onnxq]"]),
        ('batch-size = "four"', ["batch-size must be an integer", "'four'"]),
        ("min-sqnr = true", ["min-sqnr must be a number"]),
        ('method = "median"', ["[tool.onnxq] method", "'median' is not one of"]),
        ("verify = 1", ["verify must be true or false"]),
        ("exclude = 3", ["exclude must be a string or a list"]),
        ("percentile = [1, 2]", ["percentile must be a number"]),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(compile_config, toml, fragments):
    result, _ = compile_config(f"[tool.onnxq]\n{toml}\n")

    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "settings.toml" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_missing_config_file_is_a_usage_error(cli, tmp_path):
    result = cli("compile", "m.onnx", "-o", "o.onnx", "--config", tmp_path / "absent.toml")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith("error: ") and "absent.toml" in result.stderr


def test_gate_reads_its_table_from_config(cli, tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text("[tool.onnxq.gate]\nmin_sqnr = 'high'\n")

    result = cli("gate", "ref.onnx", "cand.onnx", "--data", "d.npz", "--config", path)

    assert result.exit_code == EXIT_USAGE
    assert "[tool.onnxq.gate] min_sqnr must be a number" in result.stderr


def test_mixed_precision_settings_come_from_the_file(compile_config):
    result, config = compile_config("[tool.onnxq]\nquantize = false\ntune-budget = 30\n")

    assert result.exit_code == 0, result.output
    assert config["tune_budget"] == 30


def test_every_compile_setting_has_a_flag_and_so_a_key():
    # [tool.onnxq] keys are the flags: a CompileConfig field without one could not be set.
    import dataclasses

    from onnxq.cli.compile import compile_command
    from onnxq.config import CompileConfig

    params = {p.name for p in compile_command.params}
    assert [f.name for f in dataclasses.fields(CompileConfig) if f.name not in params] == []
