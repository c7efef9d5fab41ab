"""Compile configuration from ``[tool.onnxq]`` and flags."""

from __future__ import annotations

import pytest

from onnxq.config import CompileConfig, read_pyproject_section
from onnxq.errors import InputError


@pytest.fixture
def pyproject(tmp_path):
    """``write(text)``: writes a pyproject.toml in tmp_path and returns its path."""

    def write(text: str):
        path = tmp_path / "pyproject.toml"
        path.write_text(text)
        return path

    return write


def test_defaults_without_a_file(tmp_path):
    config = CompileConfig.from_sources({}, tmp_path / "missing.toml")
    assert config == CompileConfig()


def test_section_is_read(pyproject):
    path = pyproject(
        """
        [project]
        name = "someone-elses"

        [tool.onnxq]
        calibration-method = "percentile"
        percentile = 99.9
        exclude = ["head.*", "classifier"]
        verify = true

        [tool.onnxq.gate]
        min-sqnr = 30
        """
    )

    config = CompileConfig.from_sources({}, path)

    assert config.calibration_method == "percentile"
    assert config.percentile == 99.9
    assert config.exclude == ("head.*", "classifier")
    assert config.verify is True
    assert config.target == "auto"  # untouched default


def test_flags_override_the_file_and_none_keeps_it(pyproject):
    path = pyproject('[tool.onnxq]\ntarget = "avx2"\nbatch_size = 4\n')

    config = CompileConfig.from_sources({"target": "vnni", "batch_size": None}, path)

    assert config.target == "vnni"
    assert config.batch_size == 4


def test_unknown_key_is_an_input_error(pyproject):
    path = pyproject("[tool.onnxq]\ncalibration_methd = 'minmax'\n")
    with pytest.raises(InputError, match="unknown key 'calibration_methd'"):
        CompileConfig.from_sources({}, path)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('method = "x"', "unknown key 'method'"),
        ('calibration-method = "median"', "unknown calibration method 'median'"),
        ('target = "tpu"', "unknown target 'tpu'"),
        ("percentile = 0", "percentile must be in"),
        ("tolerance = -1.0", "tolerance must be >= 0"),
        ("batch-size = 0", "batch size must be >= 1"),
        ("max-samples = 0", "max samples must be >= 1"),
        ('percentile = "high"', "bad compile configuration"),
    ],
)
def test_bad_values_are_input_errors(pyproject, section, message):
    path = pyproject(f"[tool.onnxq]\n{section}\n")
    with pytest.raises(InputError, match=message):
        CompileConfig.from_sources({}, path)


def test_bad_flag_value_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown target 'gpu'"):
        CompileConfig.from_sources({"target": "gpu"}, tmp_path / "none.toml")


def test_invalid_toml_is_an_input_error(pyproject):
    path = pyproject("[tool.onnxq\n")
    with pytest.raises(InputError, match="invalid TOML"):
        CompileConfig.from_sources({}, path)


def test_read_section_of_other_tables(pyproject):
    path = pyproject("[tool.onnxq.gate]\nmin-sqnr = 30\n[tool.other]\nx = 1\n")
    assert read_pyproject_section(path, ("tool", "onnxq", "gate")) == {"min-sqnr": 30}
    assert read_pyproject_section(path, ("tool", "absent")) == {}
    assert read_pyproject_section(None, ("tool",)) == {}


def test_to_dict_is_json_ready():
    data = CompileConfig(exclude=("a", "b")).to_dict()
    assert data["exclude"] == ["a", "b"]
    assert data["quantize"] is True


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("min_agreement", 1.5, "min agreement"), ("tune_budget", -1.0, "tune budget")],
)
def test_mixed_precision_settings_are_checked(field, value, fragment):
    with pytest.raises(InputError, match=fragment):
        CompileConfig(**{field: value})


def test_mixed_precision_settings_from_the_file(pyproject):
    path = pyproject('[tool.onnxq]\ntune-budget = 30\nrequire-int8 = true\nmetric = "m:f"\n')
    config = CompileConfig.from_sources({}, path)
    assert (config.tune_budget, config.require_int8, config.metric) == (30, True, "m:f")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_sqnr", float("nan")),  # "floor nan" switched the fidelity check off
        ("min_sqnr", float("inf")),
        ("min_agreement", 0.0),
        ("min_agreement", float("nan")),
        ("tune_budget", float("nan")),
        ("tune_budget", -1.0),
        ("tolerance", float("nan")),
        ("percentile", float("nan")),
    ],
)
def test_non_finite_or_out_of_domain_thresholds_are_refused(field, value):
    with pytest.raises(InputError, match=f"must be .*got {value!r}"):
        CompileConfig(**{field: value})


def test_thresholds_from_the_file_are_checked_too(pyproject):
    path = pyproject("[tool.onnxq]\nmin-sqnr = nan\n")  # TOML has nan and inf
    with pytest.raises(InputError, match="min SQNR"):
        CompileConfig.from_sources({}, path)


def test_threshold_domains_keep_their_edges():
    config = CompileConfig(min_agreement=1.0, tune_budget=0.0, min_sqnr=-5.0, tolerance=0.0)
    assert (config.min_agreement, config.tune_budget) == (1.0, 0.0)


def test_op_type_that_is_no_onnx_operator_is_refused():
    with pytest.raises(InputError, match="'Conv2d' is no ONNX operator"):
        CompileConfig(op_types=("Conv", "Conv2d"))
    assert CompileConfig(op_types=("Conv", "Gemm")).op_types == ("Conv", "Gemm")
