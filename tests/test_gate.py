from __future__ import annotations

import pytest
from classifier_fixtures import write_pair

from onnxq.errors import InputError
from onnxq.gate import Thresholds, judge_interval, load_config, resolve_thresholds, run_gate

FAST = {"time_budget": 0.05}


@pytest.mark.parametrize(
    ("lo", "hi", "higher", "expected"),
    [
        (1.6, 1.9, True, "pass"),
        (1.5, 1.9, True, "pass"),
        (1.1, 1.4, True, "fail"),
        (1.4, 1.6, True, "inconclusive"),
        (10.0, 14.0, False, "pass"),
        (21.0, 30.0, False, "fail"),
        (18.0, 22.0, False, "inconclusive"),
    ],
)
def test_judge_interval(lo, hi, higher, expected):
    threshold = 1.5 if higher else 20.0
    assert judge_interval(lo, hi, threshold, higher_is_better=higher) == expected


def test_config_keys_and_override(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.onnxq.gate]\nmin-sqnr = 30\nmax_latency_ms = 5\n")
    assert load_config(pyproject) == {"min_sqnr": 30.0, "max_latency_ms": 5.0}
    merged = resolve_thresholds({"min_sqnr": 10.0, "min_speedup": None}, pyproject)
    assert merged == Thresholds(min_sqnr=10.0, max_latency_ms=5.0)
    assert load_config(tmp_path / "absent.toml") == {}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("min_speedup", -2.0),
        ("min_speedup", 0.0),
        ("max_accuracy_drop", -1.0),
        ("max_accuracy_drop", 101.0),
        ("max_latency_ms", float("nan")),
        ("max_latency_ms", float("inf")),
        ("min_sqnr", float("nan")),
    ],
)
def test_thresholds_out_of_domain_are_refused(name, value, tmp_path):
    with pytest.raises(InputError, match=f"gate threshold {name.replace('_', '-')} must be"):
        Thresholds(**{name: value})
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f"[tool.onnxq.gate]\n{name} = {value!r}\n".replace("'", ""))
    with pytest.raises(InputError, match=f"gate threshold {name.replace('_', '-')} must be"):
        resolve_thresholds({}, pyproject)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tool.onnxq.gate]\nmin-sqrn = 3\n", "unknown key 'min-sqrn'"),
        ("[tool.onnxq.gate]\nmin-sqnr = 'high'\n", "must be a number"),
        ("[tool.onnxq.gate\n", "not valid TOML"),
    ],
)
def test_bad_config(tmp_path, text, message):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(pyproject)


def test_no_thresholds_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no gate thresholds"):
        resolve_thresholds({"min_sqnr": None}, tmp_path / "absent.toml")


def test_gate_passes_loose_and_fails_strict(tmp_path):
    ref, cand, data = write_pair(tmp_path)
    loose = Thresholds(max_accuracy_drop=50.0, min_sqnr=5.0, min_speedup=0.01, max_latency_ms=1e4)
    result = run_gate(ref, cand, data, loose, labels_key="y", **FAST)
    assert result["status"] == "pass"
    assert [c["name"] for c in result["checks"]] == [
        "max_accuracy_drop",
        "min_sqnr",
        "min_speedup",
        "max_latency_ms",
    ]
    speed = result["checks"][2]
    assert speed["probability"] == 1.0 and speed["ci95"][0] >= 0.01
    assert result["bench"]["results"][1]["model"] == str(cand)

    strict = Thresholds(min_sqnr=200.0, min_speedup=100.0)
    result = run_gate(ref, cand, data, strict, **FAST)
    assert result["status"] == "fail"
    assert [c["status"] for c in result["checks"]] == ["fail", "fail"]
    assert "min_sqnr" in result["summary"] and "min_speedup" in result["summary"]
    assert result["eval"]["accuracy"] is None


def test_gate_skips_bench_without_latency_thresholds(tmp_path):
    ref, cand, data = write_pair(tmp_path)
    result = run_gate(ref, cand, data, Thresholds(min_sqnr=5.0))
    assert result["bench"] is None and result["status"] == "pass"


def test_accuracy_threshold_needs_labels(tmp_path):
    ref, cand, data = write_pair(tmp_path)
    with pytest.raises(InputError, match="--labels"):
        run_gate(ref, cand, data, Thresholds(max_accuracy_drop=1.0))
