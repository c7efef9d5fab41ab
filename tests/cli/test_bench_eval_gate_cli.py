from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from classifier_fixtures import dataset, softmax, weights, write_pair

from onnxq import runtime
from onnxq.evaluate import sqnr_db

FAST = ("--time-budget", "0.05")


@pytest.fixture
def pair(tmp_path):
    return write_pair(tmp_path)


def test_eval_reproduces_numpy_accuracy_and_sqnr(cli, pair, tmp_path):
    ref, cand, data = pair
    out = tmp_path / "eval.json"
    result = cli("eval", ref, cand, "--data", data, "--labels", "y", "--json", out)
    assert result.exit_code == 0, result.output
    x, y = dataset()
    p_ref = softmax(x @ weights()[0] + weights()[1])
    p_cand = softmax(x @ weights(noise=0.05)[0] + weights(noise=0.05)[1])
    report = json.loads(out.read_text())
    assert report["accuracy"]["reference"]["top1"] == pytest.approx(np.mean(p_ref.argmax(1) == y))
    assert report["accuracy"]["candidate"]["top1"] == pytest.approx(np.mean(p_cand.argmax(1) == y))
    expected = sqnr_db(p_ref, p_cand)
    assert report["fidelity"]["probs"]["sqnr_db"] == pytest.approx(expected, rel=1e-3)
    assert f"{expected:.2f}" in result.stdout
    assert "Accuracy" in result.stdout and "Fidelity" in result.stdout


def test_eval_per_layer(cli, pair):
    ref, cand, data = pair
    result = cli("eval", ref, cand, "--data", data, "--per-layer")
    assert result.exit_code == 0, result.output
    assert "Per-layer error" in result.stdout and "logits" in result.stdout


def _gate(cli, pair, tmp_path, *thresholds):
    ref, cand, data = pair
    outs = {
        fmt: tmp_path / f"gate.{ext}"
        for fmt, ext in (("json", "json"), ("markdown", "md"), ("junit", "xml"))
    }
    args = [a for fmt, path in outs.items() for a in (f"--{fmt}", path)]
    result = cli("gate", ref, cand, "--data", data, "--labels", "y", *FAST, *thresholds, *args)
    return result, outs


def test_gate_passes_with_loose_thresholds(cli, pair, tmp_path):
    result, outs = _gate(
        cli, pair, tmp_path, "--max-accuracy-drop", "50", "--min-sqnr", "5", "--min-speedup", "0.01"
    )
    assert result.exit_code == 0, result.output
    assert "gate PASS" in result.stdout
    report = json.loads(outs["json"].read_text())
    assert report["status"] == "pass"
    assert {"checks", "thresholds", "eval", "bench", "summary"} <= report.keys()
    assert report["thresholds"]["min_sqnr"] == 5.0
    suite = ET.parse(outs["junit"]).getroot().find("testsuite")
    assert [c.get("name") for c in suite.findall("testcase")] == [
        "max_accuracy_drop",
        "min_sqnr",
        "min_speedup",
    ]
    assert suite.get("failures") == "0" and not suite.findall("testcase/failure")
    md = outs["markdown"].read_text()
    assert md.startswith("# onnxq gate report: PASS")
    assert any(line.startswith("| min_sqnr | PASS |") for line in md.splitlines())


def test_gate_fails_with_impossible_thresholds(cli, pair, tmp_path):
    result, outs = _gate(cli, pair, tmp_path, "--min-sqnr", "200", "--max-latency-ms", "1e-9")
    assert result.exit_code == 1, result.output
    assert "gate FAIL" in result.stdout and "error:" in result.stderr
    report = json.loads(outs["json"].read_text())
    assert [c["status"] for c in report["checks"]] == ["fail", "fail"]
    failures = ET.parse(outs["junit"]).getroot().findall("testsuite/testcase/failure")
    assert len(failures) == 2 and "SQNR" in failures[0].get("message")
    rows = [line for line in outs["markdown"].read_text().splitlines() if "| FAIL |" in line]
    assert len(rows) == 2


def test_gate_reads_pyproject(cli, pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.onnxq.gate]\nmin-sqnr = 200\n")
    ref, cand, data = pair
    assert cli("gate", ref, cand, "--data", data).exit_code == 1
    # A flag overrides the file.
    assert cli("gate", ref, cand, "--data", data, "--min-sqnr", "5").exit_code == 0
    (tmp_path / "pyproject.toml").write_text("[tool.onnxq.gate]\nmin-snr = 5\n")
    result = cli("gate", ref, cand, "--data", data)
    assert result.exit_code == 2 and "unknown key 'min-snr'" in result.stderr


@pytest.mark.parametrize("line", ["min-speedup = -2", "max-latency-ms = nan", "min-sqnr = inf"])
def test_gate_refuses_vacuous_thresholds_from_pyproject(cli, pair, tmp_path, monkeypatch, line):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(f"[tool.onnxq.gate]\n{line}\n")
    ref, cand, data = pair
    result = cli("gate", ref, cand, "--data", data)
    assert result.exit_code == 2, result.output
    assert "must be" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--data", "{data}"),  # no thresholds
        ("--data", "{tmp}/missing.npz", "--min-sqnr", "5"),
        ("--data", "{data}", "--min-sqnr", "5", "--batch-size", "one"),
        ("--data", "{data}", "--max-accuracy-drop", "1"),  # no labels
        ("--data", "{data}", "--min-sqnr", "5", "--json", "{tmp}/nodir/out.json"),
        # Thresholds that would be judged as given (or switch their check off):
        ("--data", "{data}", "--min-speedup", "-2"),
        ("--data", "{data}", "--labels", "y", "--max-accuracy-drop", "-1"),
        ("--data", "{data}", "--max-latency-ms", "nan"),
        ("--data", "{data}", "--min-sqnr", "nan"),
        ("--data", "{data}", "--min-sqnr", "5", "--time-budget", "nan"),
    ],
)
def test_gate_usage_errors_exit_2(cli, pair, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml thresholds
    ref, cand, data = pair
    filled = [a.format(data=data, tmp=tmp_path) for a in args]
    result = cli("gate", ref, cand, *filled)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "nodir").exists()


def test_bench_json_has_medians_cis_and_ratio(cli, pair, tmp_path):
    ref, cand, _ = pair
    out = tmp_path / "bench.json"
    html = tmp_path / "bench.html"
    result = cli("bench", ref, cand, "--batch-size", "1,2", *FAST, "--json", out, "--html", html)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["models"] == [str(ref), str(cand)]
    by_key = {(r["model"], r["batch"]): r for r in report["results"]}
    assert set(by_key) == {(str(m), b) for m in (ref, cand) for b in (1, 2)}
    for r in by_key.values():
        assert r["p50_ms"] > 0 and len(r["p50_ci95_ms"]) == 2
        assert len(r["ratio_ci95"]) == 2 and r["ratio_vs_first"] > 0
    assert by_key[(str(ref), 1)]["ratio_vs_first"] == 1.0
    assert "ratio vs first" in result.stdout and "cand.onnx" in result.stdout
    assert "<html>" in html.read_text()


@pytest.mark.parametrize("batch", ["1,x", "0", "", "1,,2"])
def test_bench_bad_batch_size_exits_2(cli, pair, batch):
    result = cli("bench", pair[0], "--batch-size", batch)
    assert result.exit_code == 2 and "--batch-size" in result.stderr


@pytest.mark.skipif("cuda" in runtime.available_providers(), reason="CUDA is available")
def test_bench_cuda_unavailable_exits_2(cli, pair):
    result = cli("bench", pair[0], "--provider", "cuda", *FAST)
    assert result.exit_code == 2
    assert "CUDA is unavailable" in result.stderr


def test_bench_missing_model_exits_2(cli, tmp_path):
    result = cli("bench", tmp_path / "missing.onnx")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_bench_shape_for_no_input_is_a_usage_error(cli, pair):
    ref, cand, _ = pair
    result = cli("bench", ref, cand, *FAST, "--shape", "nosuch=1,4")
    assert result.exit_code == 2, result.output
    assert "shape given for 'nosuch', which is no input" in result.stderr
