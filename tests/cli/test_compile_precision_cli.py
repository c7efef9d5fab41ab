"""``onnxq compile`` when all-int8 misses the fidelity criteria: mixed precision, fp32, --metric."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_builders import WIDE_RANGE, build_model, chain_model, seeded, wide_range_samples


def _compile(cli, tmp_path, proto, samples, *extra):
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(proto, src)
    np.savez(calib, x=samples)
    args = ["compile", src, "-o", out, "--calibration-data", calib, "--report", report]
    result = cli(*args, "--no-latency-check", *extra)
    data = json.loads(report.read_text()) if report.exists() else None
    return result, data, out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def _fp32_convs(path) -> set[str]:
    """Conv nodes whose weight is a plain initializer (not behind a DequantizeLinear)."""
    model = onnx.load(path)
    inits = {i.name for i in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits}


def test_one_bad_layer_is_kept_fp32_and_reported(cli, tmp_path):
    samples = seeded(4)(64, 4, 8, 8)
    result, report, out = _compile(cli, tmp_path, chain_model(outlier=True), samples)
    assert result.exit_code == 0, result.output
    precision = report["precision"]
    assert precision["status"] == "mixed"
    assert [i["unit"] for i in precision["fp32_islands"]] == ["r2"]
    assert precision["fp32_islands"][0]["gain_sqnr_db"] > 0
    assert report["fidelity"]["passed"] and report["fidelity"]["min_sqnr_db"] >= 20
    assert _fp32_convs(out) == {"conv2", "conv3"}
    assert "kept fp32 for accuracy" in report["not_quantized"]["conv2"]
    assert "1 of" in result.stdout and "int8 ranges kept fp32" in result.stdout
    assert result.stderr.count("mixed precision: ") >= 2  # progress, one line per trial


def test_a_well_behaved_net_is_int8_after_one_check(cli, tmp_path):
    samples = seeded(4)(64, 4, 8, 8)
    result, report, out = _compile(cli, tmp_path, chain_model(outlier=False), samples)
    assert result.exit_code == 0, result.output
    assert report["precision"]["status"] == "int8"
    assert report["precision"]["fp32_islands"] == [] and len(report["precision"]["trials"]) == 1
    assert _fp32_convs(out) == set()


def _wide():
    return build_model(WIDE_RANGE, {"w": seeded(5)(64, 16)})


def test_int8_that_cannot_serve_writes_fp32_with_a_warning(cli, tmp_path):
    result, report, out = _compile(cli, tmp_path, _wide(), wide_range_samples(64))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "fp32" in warnings[0]
    assert report["precision"]["status"] == "fp32" and report["precision"]["reason"]
    assert not report["fidelity"]["passed"]  # the all-int8 checks, as measured
    assert "QuantizeLinear" not in _ops(out) and "MatMul" in _ops(out)


def test_require_int8_refuses_the_fp32_fallback(cli, tmp_path):
    result, report, out = _compile(cli, tmp_path, _wide(), wide_range_samples(64), "--require-int8")
    assert result.exit_code == 1, result.output
    assert "below the floor" in result.stderr and "--require-int8" in result.stderr
    assert report is None and not out.exists()


METRIC = """
import numpy as np

CALLS = []


def strict(reference, candidate):
    CALLS.append({name: len(runs) for name, runs in reference.items()})
    worst = max(
        float(np.max(np.abs(r - c)))
        for name in reference
        for r, c in zip(reference[name], candidate[name])
    )
    return worst < 1e-6, worst
"""


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    (tmp_path / "user_metric.py").write_text(METRIC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_metric:strict"
    import sys

    sys.modules.pop("user_metric", None)


def test_user_metric_decides_through_the_cli(cli, tmp_path, metric_module):
    samples = seeded(4)(64, 4, 8, 8)
    result, report, _ = _compile(
        cli, tmp_path, chain_model(outlier=False), samples, "--metric", metric_module
    )
    assert result.exit_code == 0, result.output
    import user_metric

    # Called with lists per run: the check runs one sample per run, so 32 check samples
    # are 32 runs.
    assert user_metric.CALLS[0] == {"y": 32}
    # No int8 model is exact, so the search ends on fp32, naming the metric.
    assert report["precision"]["status"] == "fp32"
    failed = [c for c in report["fidelity"]["checks"] if not c["passed"]]
    assert [c["view"] for c in failed] == [metric_module]


def test_a_bad_metric_spec_is_a_usage_error(cli, tmp_path):
    result, _, out = _compile(
        cli, tmp_path, chain_model(outlier=False), seeded(4)(8, 4, 8, 8), "--metric", "nocolon"
    )
    assert result.exit_code == 2, result.output
    assert "--metric" in result.stderr and not out.exists()


def test_reports_and_inspect_show_the_islands(cli, tmp_path):
    md, html = tmp_path / "r.md", tmp_path / "r.html"
    result, _, _ = _compile(
        cli,
        tmp_path,
        chain_model(outlier=True),
        seeded(4)(64, 4, 8, 8),
        "--markdown",
        md,
        "--html",
        html,
    )
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "## Mixed precision: 1 of" in text and "| r2 | conv2, conv3 |" in text
    assert "## Fidelity criteria" in text and "| y | sqnr_db |" in text
    assert "Mixed precision: 1 of" in html.read_text()
    shown = cli("inspect", tmp_path / "r.json")
    assert shown.exit_code == 0, shown.output
    assert "Mixed precision: 1 of" in shown.output and "conv2, conv3" in shown.output


def test_fp32_fallback_reason_is_in_the_report_tables(cli, tmp_path):
    result, _, _ = _compile(cli, tmp_path, _wide(), wide_range_samples(64))
    assert result.exit_code == 0, result.output
    shown = cli("inspect", tmp_path / "r.json")
    assert "Precision: fp32 written, not int8" in shown.output
    assert "FAIL" in shown.output  # the all-int8 criteria that failed


def test_inspect_of_a_file_that_is_no_report_is_a_usage_error(cli, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    result = cli("inspect", path)
    assert result.exit_code == 2 and "not an onnxq report" in result.stderr


def test_tune_trials_bounds_the_search_and_the_report_says_it_stopped_it(cli, tmp_path):
    samples = seeded(4)(64, 4, 8, 8)
    extra = ("--tune-trials", "1")  # all-int8 only: no room to keep r2 fp32
    result, report, _ = _compile(cli, tmp_path, chain_model(outlier=True), samples, *extra)
    assert result.exit_code == 0, result.output
    precision = report["precision"]
    assert precision["status"] == "fp32" and precision["stopped_by"] == "trials"
    assert len(precision["trials"]) == 1 and "--tune-trials" in precision["reason"]


def test_a_negative_trial_bound_is_a_usage_error(cli, tmp_path):
    result, _, out = _compile(
        cli, tmp_path, chain_model(outlier=True), seeded(4)(8, 4, 8, 8), "--tune-trials", "-1"
    )
    assert result.exit_code == 2 and "--tune-trials" in result.output and not out.exists()


PRELU_CHAIN = """
prelus (float[N,4,8,8] x) => (float[N,4,8,8] y) {
    [c1] a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    [p1] b = PRelu (a, s)
    [c2] c = Conv <pads = [1, 1, 1, 1]> (b, w2)
    [p2] y = PRelu (c, s)
}
"""


def test_nothing_quantized_says_fp32_was_written_and_why(cli, tmp_path):
    # Each Conv sits between PRelus, which ONNX Runtime has no int8 kernel for.
    normal = seeded(7)
    weights = {"w1": normal(4, 4, 3, 3), "w2": normal(4, 4, 3, 3), "s": normal(4, 1, 1)}
    proto = build_model(PRELU_CHAIN, weights)
    result, report, _ = _compile(cli, tmp_path, proto, normal(16, 4, 8, 8))
    assert result.exit_code == 0, result.output
    assert report["quantized_nodes"] == []
    line = next(x for x in result.stdout.splitlines() if x.startswith("int8:"))
    assert "nothing quantized, the optimised fp32 model was written" in line
    assert "2 PRelu: no int8 kernel" in line, line
