"""``onnxq compile`` to int8 from the command line: success, ranges, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_builders import build_model, fusing_model, seeded

NET = """
net (float[N,3,8,8] x) => (float[N,4,8,8] y) {
    [conv1] c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    [relu] r = Relu (c)
    [conv2] y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


@pytest.fixture
def net_file(tmp_path):
    normal = seeded(0)
    weights = {
        "w1": normal(4, 3, 3, 3, scale=0.3),
        "b1": normal(4, scale=0.1),
        "w2": normal(4, 4, 3, 3, scale=0.3),
        "b2": normal(4, scale=0.1),
    }
    path = tmp_path / "net.onnx"
    onnx.save(build_model(NET, weights), path)
    return path


def _npz(tmp_path, name="calib.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_int8_compile_reports_and_saves_ranges(cli, net_file, tmp_path):
    calib = _npz(tmp_path, x=seeded(1)(24, 3, 8, 8))
    out, report, ranges = tmp_path / "int8.onnx", tmp_path / "r.json", tmp_path / "ranges.json"
    result = cli(
        "compile",
        net_file,
        "-o",
        out,
        "--calibration-data",
        calib,
        "--method",
        "percentile",
        "--report",
        report,
        "--save-ranges",
        ranges,
        "--no-latency-check",
    )
    assert result.exit_code == 0, result.output
    assert "min SQNR" in result.output and "int8: 3 nodes quantized" in result.output
    data = json.loads(report.read_text())
    assert data["calibration"]["method"] == "percentile"
    assert data["calibration"]["num_samples"] == 24
    assert data["fidelity"]["min_sqnr_db"] > 25
    assert "x" in json.loads(ranges.read_text())["ranges"]

    # A re-compile with the saved ranges gives the same model without calibration data.
    again = tmp_path / "again.onnx"
    result = cli("compile", net_file, "-o", again, "--ranges", ranges, "--no-latency-check")
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == out.read_bytes()


def test_missing_calibration_data_says_how_to_give_it(cli, net_file, tmp_path):
    result = cli("compile", net_file, "-o", tmp_path / "o.onnx")
    _one_line_error(result, "needs calibration data", "--calibration-data", "--no-quantize")


def test_dynamic_mode_says_static_needs_data(cli, net_file, tmp_path):
    result = cli("compile", net_file, "-o", tmp_path / "o.onnx", "--dynamic")
    _one_line_error(result, "dynamic", "calibration data")


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"image": np.zeros((4, 3, 8, 8), np.float32)}, ("missing x", "unexpected image")),
        ({"x": np.zeros((4, 3, 9, 8), np.float32)}, ("'x'", "9")),
        ({"x": np.zeros((4, 8, 8), np.float32)}, ("'x'",)),
        ({"x": np.full((4, 3, 8, 8), "a")}, ("'x'", "<U1")),
        ({"x": np.zeros((0, 3, 8, 8), np.float32)}, ("no samples",)),
    ],
    ids=["wrong-key", "wrong-shape", "wrong-rank", "wrong-dtype", "empty"],
)
def test_bad_calibration_data(cli, net_file, tmp_path, arrays, fragments):
    calib = _npz(tmp_path, **arrays)
    out = tmp_path / "o.onnx"
    result = cli("compile", net_file, "-o", out, "--calibration-data", calib)
    _one_line_error(result, *fragments)
    assert not out.exists()


def test_nan_in_calibration_data_names_input_and_sample(cli, net_file, tmp_path):
    x = seeded(2)(8, 3, 8, 8)
    x[5, 0, 0, 0] = np.nan
    result = cli(
        "compile", net_file, "-o", tmp_path / "o.onnx", "--calibration-data", _npz(tmp_path, x=x)
    )
    _one_line_error(result, "'x'", "5")


def _compile(cli, model, tmp_path, *extra, shape=(3, 8, 8)):
    """Compiles ``model`` on 8 seeded samples; returns the result and the JSON report."""
    report = tmp_path / "r.json"
    calib = _npz(tmp_path, x=seeded(3)(8, *shape))
    args = ["compile", model, "-o", tmp_path / "o.onnx", "--calibration-data", calib]
    result = cli(*args, "--report", report, *extra)
    return result, json.loads(report.read_text()) if report.exists() else None


def test_fidelity_below_floor_fails_and_writes_nothing(cli, net_file, tmp_path):
    result, report = _compile(
        cli, net_file, tmp_path, "--min-sqnr", "200", "--require-int8", "--no-latency-check"
    )
    assert result.exit_code == 1, result.output
    assert "below the floor" in result.stderr
    assert report is None
    assert not (tmp_path / "o.onnx").exists() and list(tmp_path.glob(".o.onnx*")) == []


def test_input_model_is_never_modified(cli, net_file, tmp_path):
    before = net_file.read_bytes()
    result, _ = _compile(cli, net_file, tmp_path, "--no-latency-check")
    assert result.exit_code == 0, result.output
    assert net_file.read_bytes() == before


def test_unsupported_op_is_listed_not_fatal(cli, tmp_path):
    model = build_model(
        """
        net (float[1,4,8,8] x) => (float[1,4,8,8] y) {
            [hs] y = HardSwish (x)
        }
        """
    )
    src = tmp_path / "hs.onnx"
    onnx.save(model, src)
    result, report = _compile(cli, src, tmp_path, "--no-latency-check", shape=(4, 8, 8))
    assert result.exit_code == 0, result.output
    assert "no int8 kernel" in report["not_quantized"]["hs"]


def test_latency_check_is_reported(cli, net_file, tmp_path):
    result, report = _compile(cli, net_file, tmp_path)
    assert result.exit_code == 0, result.output
    assert report["latency"]["fp32_p50_ms"] > 0 and report["latency"]["int8_p50_ms"] > 0
    assert "latency batch 1" in result.output


def test_skipped_fidelity_check_is_reported_not_silent(cli, net_file, tmp_path):
    result, report = _compile(cli, net_file, tmp_path, "--check-samples", "0", "--no-latency-check")
    assert result.exit_code == 0, result.output
    assert "NOT CHECKED (--check-samples 0)" in result.output
    assert report["fidelity"] == {"checked": False, "reason": "--check-samples 0"}


def test_markdown_and_html_reports(cli, net_file, tmp_path):
    md, html = tmp_path / "r.md", tmp_path / "r.html"
    result, _ = _compile(
        cli, net_file, tmp_path, "--markdown", md, "--html", html, "--no-latency-check"
    )
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert text.startswith("# onnxq compile report")
    assert "## Passes" in text and "InsertQDQPass" in text and "## Fidelity" in text
    assert "<html" in html.read_text().lower()


def test_report_folder_missing_fails_before_compiling(cli, net_file, tmp_path):
    result, _ = _compile(cli, net_file, tmp_path, "--html", tmp_path / "no" / "r.html")
    _one_line_error(result, "--html", "does not exist")
    assert not (tmp_path / "o.onnx").exists()


def _compile_with(cli, tmp_path, model, calib, method):
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    out, report = tmp_path / f"{method}.onnx", tmp_path / "r.json"
    args = ["compile", src, "-o", out, "--calibration-data", calib, "--method", method]
    # What is tested is calibrating at all: a floor below entropy's clipping of 192 values.
    result = cli(*args, "--no-latency-check", "--min-sqnr", "10", "--report", report)
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(report.read_text())


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_take_a_first_sample_of_zeros(cli, tmp_path, method):
    # The first batch is all 0 (one sample: the batch is static): a very fine histogram
    # width, which later samples widen by more than 2**63.
    model = build_model("net (float[1,4] x) => (float[1,4] y) { y = Relu (x) }")
    x = np.concatenate([np.zeros((1, 4), np.float32), seeded(2)(15, 4)])
    report = _compile_with(cli, tmp_path, model, _npz(tmp_path, x=x), method)
    assert report["calibration"]["method"] == method


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clip_at_zero_in_the_first_sample_calibrates(cli, tmp_path, method):
    # Transpose -> MatMul -> Clip(0, 6) -> Add (a fuzzer's graph): the first sample's MatMul
    # output is negative, so the Clip output starts as a constant 0.
    n = seeded(3)
    model = build_model(
        """
        net (float[1,3] x) => (float[1,3] t11, float[1,3] t1) {
            [transpose] t1 = Transpose <perm = [0, 1]> (x)
            [matmul] t4 = MatMul (x, w)
            [clip] t8 = Clip (t4, lo, hi)
            [add] t11 = Add (c, t8)
        }
        """,
        {
            "w": n(3, 3), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
            "c": np.array(-0.1, np.float32),
        },
        opset=19,
    )  # fmt: skip
    w = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    x = n(64, 3)
    x[0] = np.linalg.solve(w.T, -np.ones(3, np.float32))  # x[0] @ w == -1: Clip gives 0
    report = _compile_with(cli, tmp_path, model, _npz(tmp_path, x=x), method)
    assert report["calibration"]["method"] == method
    assert report["calibration"]["num_samples"] == 64


def test_max_memory_lowers_the_batch_and_is_reported(cli, net_file, tmp_path):
    calib = _npz(tmp_path, x=seeded(1)(24, 3, 8, 8))
    out, report = tmp_path / "int8.onnx", tmp_path / "r.json"
    args = ("--calibration-data", calib, "--no-latency-check", "--report", report)
    # 24 samples of 1 KB activations, batches of 16: 40 KB cannot hold one batch.
    result = cli("compile", net_file, "-o", out, *args, "--max-memory", "40KB")
    assert result.exit_code == 0, result.output
    memory = json.loads(report.read_text())["calibration"]["memory"]
    assert memory["budget_bytes"] == 40 << 10 and memory["passes"] == 1
    assert 1 <= memory["batch_size"] < 16
    assert memory["estimated_peak_bytes"] <= memory["budget_bytes"]
    assert json.loads(report.read_text())["fidelity"]["samples"] == 24


@pytest.mark.parametrize(
    ("size", "fragment"), [("lots", "memory size 'lots'"), ("1KB", "at least")]
)
def test_bad_max_memory_is_a_one_line_error(cli, net_file, tmp_path, size, fragment):
    calib = _npz(tmp_path, x=seeded(1)(4, 3, 8, 8))
    out = tmp_path / "o.onnx"
    result = cli("compile", net_file, "-o", out, "--calibration-data", calib, "--max-memory", size)
    _one_line_error(result, fragment)
    assert not out.exists()


def test_latency_report_has_both_ratios_and_the_cpu(cli, tmp_path):
    src = tmp_path / "fusing.onnx"
    onnx.save(fusing_model(), src)
    result, report = _compile(cli, src, tmp_path, shape=(4, 8, 8))
    assert result.exit_code == 0, result.output
    latency, placement = report["latency"], report["placement"]
    for key in ("speedup", "speedup_vs_fp32"):
        lo, hi = latency[f"{key}_ci95"]
        assert lo <= latency[key] <= hi
    assert latency["input_p50_ms"] > 0 and latency["fp32_p50_ms"] > 0
    assert "vs input" in result.output and "vs optimised fp32" in result.output
    assert placement["reverted"] == {} and placement["fusion"]["unfused"] == {}
    assert placement["cpu"]["model"] and "isa" in placement["cpu"]
    # Whichever model the timing chose is the one written.
    written = {n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node}
    assert ("QuantizeLinear" in written) == (placement["emitted"] == "int8")


def test_int8_that_ort_cannot_fuse_writes_optimised_fp32(cli, net_file, tmp_path):
    # conv2's output is the graph output: no output Q, so ONNX Runtime runs it in fp32
    # behind standalone DQs; without it conv1 alone would be isolated.
    result, report = _compile(cli, net_file, tmp_path)
    assert result.exit_code == 0, result.output
    placement = report["placement"]
    assert placement["emitted"] == "fp32"
    assert "no fused int8 kernel" in placement["reverted"]["conv2"]
    assert "no int8 unit fuses" in placement["reason"]
    assert report["latency"]["emitted"] == "fp32"
    assert "wrote optimised fp32" in result.output
    assert "emitting the optimised fp32 model" in result.stderr
    written = onnx.load(tmp_path / "o.onnx")
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in written.graph.node}


def test_no_latency_check_keeps_qdq_as_inserted(cli, net_file, tmp_path):
    result, report = _compile(cli, net_file, tmp_path, "--no-latency-check")
    assert result.exit_code == 0, result.output
    assert "placement" not in report and "latency" not in report
    assert "conv2" in report["quantized_nodes"]


def test_engine_errors_reach_the_user_in_flag_terms(cli, net_file, tmp_path):
    from onnxq.compiler import compile_model
    from onnxq.config import CompileConfig
    from onnxq.errors import FidelityError

    # The engine names no flags; the CLI says which ones change the outcome.
    calib = _npz(tmp_path, x=seeded(3)(8, 3, 8, 8))
    config = CompileConfig(
        calibration=str(calib), min_sqnr=200, require_int8=True, check_latency=False
    )
    with pytest.raises(FidelityError, match="below the floor") as engine:
        compile_model(net_file, tmp_path / "o.onnx", config)
    assert "--" not in str(engine.value)

    result, _ = _compile(
        cli, net_file, tmp_path, "--min-sqnr", "200", "--require-int8", "--no-latency-check"
    )
    assert "(--require-int8 refuses the fp32 fallback)" in result.stderr
