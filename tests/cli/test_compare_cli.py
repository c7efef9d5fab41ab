from __future__ import annotations

import importlib.util
import json
import math

import onnx
import pytest
from compare_fixtures import MACS, PARAMETERS, tiny_net, write_models

FAST = ("--time-budget", "0", "--batch-size", "1,2")


@pytest.fixture
def models(tmp_path):
    return write_models(tmp_path)


def test_compare_writes_table_and_reports(cli, models, tmp_path):
    ref, noisy, data = models
    outs = {"json": tmp_path / "c.json", "markdown": tmp_path / "c.md", "html": tmp_path / "c.html"}
    args = [a for fmt, path in outs.items() for a in (f"--{fmt}", path)]
    result = cli("compare", ref, noisy, "--data", data, "--labels", "y", *FAST, *args)
    assert result.exit_code == 0, result.output
    assert "Compression evaluation" in result.stdout
    assert "p50 ms b2 [95% CI]" in result.stdout and "noisy.onnx" in result.stdout
    report = json.loads(outs["json"].read_text())
    assert [r["macs"] for r in report["comparison"]] == [MACS, MACS]
    assert report["comparison"][0]["parameters"] == PARAMETERS
    assert f"| ref.onnx | {ref.stat().st_size / 1e3:.1f} KB |" in outs["markdown"].read_text()
    page = outs["html"].read_text()
    if importlib.util.find_spec("matplotlib"):
        assert page.count("<img") == 2 and "Accuracy vs size" in page
    else:
        assert "onnxq[plot]" in page


def test_equal_candidate_reads_inf(cli, models, tmp_path):
    ref, _, data = models
    same = tmp_path / "same.onnx"
    onnx.save(tiny_net(), same)
    out = tmp_path / "c.json"
    result = cli("compare", ref, same, "--data", data, *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    fidelity = json.loads(out.read_text())["comparison"][1]["fidelity"]
    assert fidelity == {"sqnr_db": "inf", "top1_agreement": 1.0}
    assert math.isinf(float(fidelity["sqnr_db"]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--labels", "nope"), "no labels array 'nope'"),
        (("--json", "{ref}"), "output path is the reference model"),
        (("--batch-size", "0"), "bad --batch-size '0'"),
    ],
)
def test_bad_input_is_one_line(cli, models, extra, message):
    ref, noisy, data = models
    extra = [e.format(ref=ref) for e in extra]
    result = cli("compare", ref, noisy, "--data", data, "--time-budget", "0", *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_mismatched_inputs_are_one_line(cli, models, tmp_path):
    ref, _, data = models
    other = tiny_net()
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    onnx.save(other, tmp_path / "other.onnx")
    result = cli("compare", ref, tmp_path / "other.onnx", "--data", data, "--time-budget", "0")
    assert result.exit_code == 2, result.output
    assert "different inputs" in result.stderr and len(result.stderr.strip().splitlines()) == 1
