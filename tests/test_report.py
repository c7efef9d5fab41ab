from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest

from onnxq import report

GATE = {
    "kind": "gate",
    "status": "fail",
    "summary": "1 of 2 checks pass; not passing: min_speedup",
    "checks": [
        {
            "name": "min_sqnr",
            "status": "pass",
            "value": math.inf,
            "threshold": 20.0,
            "message": "ok",
        },
        {
            "name": "min_speedup",
            "status": "inconclusive",
            "value": 1.4,
            "threshold": 1.5,
            "message": "inconclusive | CI straddles",
            "ci95": [1.2, 1.6],
            "probability": 0.4,
        },
    ],
    "eval": {
        "fidelity": {
            "probs": {
                "sqnr_db": 31.5,
                "cosine": 0.999,
                "max_abs_error": 0.01,
                "top1_agreement": 0.95,
            }
        },
        "per_layer": [
            {"tensor": "conv1", "sqnr_db": 18.0, "cosine": 0.99, "max_abs_error": 0.2},
            {"tensor": "relu1", "sqnr_db": math.inf, "cosine": 1.0, "max_abs_error": 0.0},
        ],
    },
    "bench": {
        "results": [
            {
                "provider": "cpu",
                "model": f"/m/{name}.onnx",
                "batch": 1,
                "runs": 3,
                "p50_ms": p50,
                "p50_ci95_ms": [p50 - 0.1, p50 + 0.1],
                "p90_ms": p50 + 0.2,
                "p99_ms": p50 + 0.3,
                "throughput_per_s": 1000 / p50,
                "speedup_vs_first": s,
                "speedup_ci95": [s - 0.1, s + 0.1],
                "ratio_vs_first": 1 / s,
                "ratio_ci95": [0.9 / s, 1.1 / s],
                "samples_ms": [p50, p50 + 0.1, p50 - 0.1],
            }
            for name, p50, s in (("fp32", 2.0, 1.0), ("int8", 1.4, 1.43))
        ],
    },
}
COMPILE = {
    "kind": "compile",
    "passes": [
        {
            "name": "cleanup",
            "modified": True,
            "seconds": 0.01,
            "nodes_before": 10,
            "nodes_after": 8,
        },
        {
            "name": "quantize",
            "modified": False,
            "seconds": 0.2,
            "nodes_before": 8,
            "nodes_after": 8,
        },
    ],
    "coverage": {"Conv": {"quantized": 3, "total": 4}, "MatMul": {"quantized": 0, "total": 1}},
}


def test_json_is_strict_and_atomic(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    report.write_json(GATE, out)
    text = out.read_text()
    assert "Infinity" not in text
    data = json.loads(text)
    assert data["checks"][0]["value"] == "inf"
    assert data["checks"][1]["ci95"] == [1.2, 1.6]
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_markdown_has_tables(tmp_path):
    md = report.render_markdown(GATE)
    assert md.startswith("# onnxq gate report: FAIL")
    assert "## Gate checks" in md and "## Latency" in md and "## Per-layer error" in md
    row = next(line for line in md.splitlines() if line.startswith("| min_speedup"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[1] == "INCONCLUSIVE" and cells[4] == "[1.200, 1.600]"
    assert "inconclusive \\| CI straddles" in row  # pipes in text are escaped
    report.write_markdown(COMPILE, tmp_path / "c.md")
    compiled = (tmp_path / "c.md").read_text()
    assert "| cleanup | yes | 0.0100 | 10 | 8 |" in compiled
    assert "| Conv | 3 | 4 | 75.00% |" in compiled


def test_junit_one_testcase_per_check(tmp_path):
    out = tmp_path / "r.xml"
    report.write_junit(GATE, out)
    root = ET.parse(out).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["min_sqnr", "min_speedup"]
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure.get("type") == "inconclusive"
    assert "straddles" in failure.get("message")


def _fleet_entry(name: str, status: str, reason: str | None) -> dict:
    return {
        "name": name,
        "model": f"/m/{name}.onnx",
        "output": f"/out/{name}.int8.onnx",
        "status": status,
        "reason": reason,
        "written": status == "pass",
        "seconds": 1.5,
        "worker": "host:7",
        "compile": {"size_before": 4000, "size_after": 1000} if status != "error" else None,
        "gate": {"summary": "1 of 1 checks pass"} if status != "error" else None,
    }


FLEET = {
    "kind": "fleet",
    "status": "fail",
    "summary": "1 of 3 models pass; not passing: b (fail), c (error)",
    "models": [
        _fleet_entry("a", "pass", None),
        _fleet_entry("b", "fail", "gate: SQNR 12 not >= 20"),
        _fleet_entry("c", "error", "c.npz: no array for input x"),
    ],
}


def test_fleet_junit_has_a_testcase_per_model_with_failures_and_errors():
    root = ET.fromstring(report.render_junit(FLEET))
    suite = root.find("testsuite")
    assert suite.get("name") == "onnxq.fleet"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    a, b, c = suite.findall("testcase")
    assert a.find("failure") is None and a.find("error") is None
    assert b.find("failure").get("message") == "gate: SQNR 12 not >= 20" and b.find("error") is None
    assert c.find("error").get("message") == "c.npz: no array for input x"
    assert json.loads(c.find("error").text)["output"] == "/out/c.int8.onnx"  # the details


def test_fleet_markdown_has_a_row_per_model():
    md = report.render_markdown(FLEET)
    assert md.startswith("# onnxq fleet report: FAIL\n\n1 of 3 models pass")
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| a | PASS | a.int8.onnx | 4.0 KB -> 1.0 KB | 1 of 1 checks pass |")
    assert rows[1].startswith("| b | FAIL | not written |")
    assert rows[2].startswith("| c | ERROR | not written | - | - |")


def test_a_bench_reports_models_are_no_fleet():
    assert report.sections({"kind": "bench", "models": ["a.onnx"]}).fleet is None


def test_html_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    page = report.render_html({**COMPILE, "bench": GATE["bench"], "eval": GATE["eval"]})
    for title in (
        "Pass timeline",
        "Quantized-node coverage",
        "Latency distributions",
        "Per-layer error",
    ):
        assert f"<h2>{title}</h2><img" in page
    assert page.count("data:image/png;base64,") == 4
    assert '<td class="cleanup">cleanup</td>' in page


def test_html_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_matplotlib_available", lambda: False)
    out = tmp_path / "r.html"
    report.write_html(GATE, out)
    page = out.read_text()
    assert "<img" not in page and "matplotlib is not installed" in page
    assert "<h2>Gate checks</h2>" in page


def test_text_tables_and_sections():
    text = report.render_text(GATE)
    assert "Gate checks" in text and "int8.onnx" in text
    assert report.find_section(GATE, "per_layer")[0]["tensor"] == "conv1"
    assert report.find_section(GATE, "passes") is None


def test_sections_are_read_where_each_report_keeps_them():
    found = report.sections(GATE)
    assert found.per_layer[0]["tensor"] == "conv1"  # nested in the gate's eval report
    assert [r["model"] for r in found.results] == ["/m/fp32.onnx", "/m/int8.onnx"]
    assert found.passes is None and found.coverage is None
    compiled = report.sections({**COMPILE, "fidelity": {"checked": False, "reason": "x"}})
    assert compiled.fidelity is None and compiled.coverage["Conv"]["total"] == 4


def test_model_table_says_how_many_ops_are_left_out():
    histogram = {f"Op{i}": 10 - i for i in range(10)}
    info = {"provider": "cpu", "path": "/m/a.onnx", "size_bytes": 1000, "op_histogram": histogram}
    (table,) = report.tables({"kind": "bench", "model_info": [info]})
    ops = table.rows[0][table.headers.index("optimized ops")]
    assert ops.startswith("Op0:10, Op1:9") and ops.endswith("Op7:3, +2 more")
    few = {**info, "op_histogram": {"Conv": 2}}
    (table,) = report.tables({"kind": "bench", "model_info": [few]})
    assert table.rows[0][table.headers.index("optimized ops")] == "Conv:2"


def test_passes_table_shows_why_each_pass_ran():
    passes = [{**COMPILE["passes"][0], "why": "drop dead code"}, COMPILE["passes"][1]]
    (table, _) = report.tables({**COMPILE, "passes": passes})
    assert table.headers[-1] == "why"
    assert [row[-1] for row in table.rows] == ["drop dead code", "-"]


def test_compile_latency_table_has_both_ratios_the_model_written_and_the_cpu():
    latency = {
        "input_p50_ms": 2.0,
        "fp32_p50_ms": 1.0,
        "int8_p50_ms": 1.25,
        "speedup": 1.6,
        "speedup_ci95": [1.5, 1.7],
        "speedup_vs_fp32": 0.8,
        "speedup_vs_fp32_ci95": [0.75, 0.85],
    }
    placement = {
        "emitted": "fp32",
        "reason": "int8 is not faster than optimised fp32",
        "reverted": {"conv9": "no fused int8 kernel"},
        "cpu": {"model": "Some Xeon", "isa": ["avx2", "avx512_vnni"]},
    }
    md = report.render_markdown({**COMPILE, "latency": latency, "placement": placement})
    assert "wrote fp32 (int8 is not faster than optimised fp32)" in md
    assert "kept fp32 for latency: conv9" in md and "Some Xeon (avx2 avx512_vnni)" in md
    assert "| int8 | 1.25 | 1.60x [1.50, 1.70] | 0.80x [0.75, 0.85] |" in md
    assert "Latency at batch 1" not in report.render_markdown(COMPILE)
