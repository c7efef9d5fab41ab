"""``onnxq compile --mode auto``: per unit static, dynamic, weight-only or fp32, and why.

Most tests replace the timer (``onnxq.compiler.model_timer``) with one returning set
latencies, so that which mode wins is the test's choice and the assignment logic is checked
without the machine's noise; one test times for real where dynamic int8's margin is large.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_builders import build_model, seeded
from test_compile_int8_cli import _one_line_error

from onnxq.evaluate import sqnr_db
from onnxq.runtime import create_session, run

# One encoder layer: weight MatMuls (q, k, v, o, ff1, ff2) and the two attention MatMuls
# whose operands are both activations (scores, ctx).
ENCODER = """
enc (float[N,S,64] x) => (float[N,S,64] y) {
    [q] qq = MatMul (x, wq)
    [k] kk = MatMul (x, wk)
    [v] vv = MatMul (x, wv)
    [kt] kt = Transpose <perm = [0, 2, 1]> (kk)
    [scores] s = MatMul (qq, kt)
    [softmax] p = Softmax <axis = -1> (s)
    [ctx] c = MatMul (p, vv)
    [o] o = MatMul (c, wo)
    [res] h = Add (o, x)
    [ff1] f = MatMul (h, w1)
    [act] g = Relu (f)
    [ff2] y = MatMul (g, w2)
}
"""
WEIGHT_MATMULS = {"q", "k", "v", "o", "ff1", "ff2"}
# Measured ~27 dB for dynamic int8 on this graph; broken scales give < 5 dB.
SQNR_FLOOR_DB = 20.0
# The output is no class score: top-1 agreement over its 64 features is not a criterion here.
LOOSE = ("--min-agreement", "0.01")


@pytest.fixture
def encoder_file(tmp_path):
    normal = seeded(0)
    weights = {name: normal(64, 64, scale=0.12) for name in ("wq", "wk", "wv", "wo")}
    weights |= {"w1": normal(64, 128, scale=0.12), "w2": normal(128, 64, scale=0.09)}
    path = tmp_path / "enc.onnx"
    onnx.save(build_model(ENCODER, weights), path)
    return path


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=seeded(1)(8, 16, 64))
    return path


def fake_timer(medians: dict[str, float]):
    """A ``model_timer`` stand-in: each label's rounds near its median (ms), seeded noise."""

    def make(feeds, **_):
        def time_models(models):
            rng = np.random.default_rng(0)
            return {
                label: medians[label] * (1 + 0.005 * rng.standard_normal(40)) for label in models
            }

        return time_models

    return make


def _compile(cli, monkeypatch, src, out, medians, *flags):
    monkeypatch.setattr("onnxq.compiler.model_timer", fake_timer(medians))
    report = out.with_suffix(".json")
    result = cli("compile", src, "-o", out, "--mode", "auto", "--report", report, *flags)
    assert result.exit_code == 0, result.output
    return result, json.loads(report.read_text())


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def test_auto_without_data_takes_dynamic_for_weight_matmuls(
    cli, monkeypatch, encoder_file, tmp_path
):
    out = tmp_path / "auto.onnx"
    medians = {"fp32": 10.0, "dynamic": 4.0, "weight-only": 12.0}
    result, report = _compile(cli, monkeypatch, encoder_file, out, medians, "--shape", "x=1,16,64")
    auto = report["auto"]
    assert auto["emitted"] == "dynamic"
    assert {u for u, c in auto["units"].items() if c["mode"] == "dynamic"} == WEIGHT_MATMULS
    # Both operands activations: no mode without calibration data takes them.
    assert "scores" not in auto["units"] and "ctx" not in auto["units"]
    assert not auto["modes"]["static"]["considered"]
    assert "calibration data" in auto["modes"]["static"]["reason"]
    assert "not faster" in auto["modes"]["weight-only"]["reason"]
    assert auto["fidelity"] == {"checked": False, "reason": "no calibration data"}
    assert "auto: wrote dynamic" in result.output
    ops = _ops(out)
    assert ops.count("MatMulInteger") == 6 and ops.count("MatMul") == 2
    x = {"x": seeded(2)(2, 16, 64)}
    ref = run(create_session(str(encoder_file)), x)["y"]
    assert sqnr_db(ref, run(create_session(str(out)), x)["y"]) > SQNR_FLOOR_DB


def test_auto_writes_fp32_when_no_mode_pays(cli, monkeypatch, encoder_file, tmp_path):
    out = tmp_path / "auto.onnx"
    medians = {"fp32": 10.0, "dynamic": 10.5, "weight-only": 12.0}
    _, report = _compile(cli, monkeypatch, encoder_file, out, medians, "--shape", "x=1,16,64")
    auto = report["auto"]
    assert auto["emitted"] == "fp32"
    assert set(auto["counts"]) == {"fp32"}
    assert all("not faster" in c["reason"] for c in auto["units"].values())
    ops = _ops(out)
    assert "MatMulInteger" not in ops and "MatMulNBits" not in ops


def test_auto_mixes_modes_per_unit(cli, monkeypatch, encoder_file, calib, tmp_path):
    # Calibrated: static can take the attention MatMuls that dynamic cannot.
    out = tmp_path / "auto.onnx"
    medians = {"fp32": 10.0, "static": 6.0, "dynamic": 4.0, "weight-only": 12.0, "mixed": 3.0}
    _, report = _compile(
        cli, monkeypatch, encoder_file, out, medians, "--calibration-data", calib, *LOOSE
    )
    auto = report["auto"]
    assert auto["emitted"] == "mixed", auto["reason"]
    modes = {u: c["mode"] for u, c in auto["units"].items()}
    assert {u for u in WEIGHT_MATMULS if modes[u] == "dynamic"} == WEIGHT_MATMULS
    assert modes["scores"] == "static" and modes["ctx"] == "static"
    assert "ranked first" in auto["units"]["ff1"]["reason"]
    assert auto["fidelity"]["passed"] and auto["fidelity"]["min_sqnr_db"] > SQNR_FLOOR_DB
    ops = _ops(out)
    assert ops.count("MatMulInteger") == 6 and "QuantizeLinear" in ops


def test_auto_ships_one_mode_when_mixing_does_not_pay(
    cli, monkeypatch, encoder_file, calib, tmp_path
):
    out = tmp_path / "auto.onnx"
    medians = {"fp32": 10.0, "static": 6.0, "dynamic": 4.0, "weight-only": 12.0, "mixed": 4.0}
    _, report = _compile(
        cli, monkeypatch, encoder_file, out, medians, "--calibration-data", calib, *LOOSE
    )
    auto = report["auto"]
    assert auto["emitted"] == "dynamic"
    assert "not faster than dynamic alone" in auto["reason"]
    assert auto["units"]["scores"]["mode"] == "fp32"
    assert "QuantizeLinear" not in _ops(out)


def test_auto_leaves_out_a_mode_that_misses_fidelity(
    cli, monkeypatch, encoder_file, calib, tmp_path
):
    # int4 weights miss a 25 dB floor on this graph; dynamic int8 meets it. Weight-only is
    # timed fastest, so only the fidelity check keeps it out.
    out = tmp_path / "auto.onnx"
    medians = {"fp32": 10.0, "static": 11.0, "dynamic": 4.0, "weight-only": 2.0}
    _, report = _compile(
        cli,
        monkeypatch,
        encoder_file,
        out,
        medians,
        "--calibration-data",
        calib,
        "--min-sqnr",
        "25",
        *LOOSE,
    )
    auto = report["auto"]
    assert "misses the fidelity criteria" in auto["modes"]["weight-only"]["reason"]
    assert auto["modes"]["weight-only"]["speedup_vs_fp32"] is None  # never timed
    assert auto["emitted"] == "dynamic"
    assert "MatMulNBits" not in _ops(out)


def test_auto_times_for_real_and_takes_int8_for_large_matmuls(cli, tmp_path):
    # seq 128, d 256: dynamic int8 measured 2.3x optimised fp32 here (1.0x would fail).
    text = ENCODER.replace("64]", "256]")
    normal = seeded(3)
    weights = {name: normal(256, 256, scale=0.06) for name in ("wq", "wk", "wv", "wo")}
    weights |= {"w1": normal(256, 512, scale=0.06), "w2": normal(512, 256, scale=0.04)}
    src, out, report = tmp_path / "big.onnx", tmp_path / "auto.onnx", tmp_path / "r.json"
    onnx.save(build_model(text, weights), src)
    result = cli(
        "compile", src, "-o", out, "--mode", "auto", "--shape", "x=1,128,256", "--report", report
    )
    assert result.exit_code == 0, result.output
    auto = json.loads(report.read_text())["auto"]
    assert auto["emitted"] in ("dynamic", "weight-only"), auto["reason"]
    assert {u for u, c in auto["units"].items() if c["mode"] != "fp32"} == WEIGHT_MATMULS
    assert auto["modes"]["dynamic"]["speedup_vs_fp32"] is not None


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (("--no-quantize",), ("--mode auto", "--no-quantize")),
        (("--no-latency-check",), ("--mode auto", "--no-latency-check")),
        (("--ranges", "r.json"), ("--ranges", "--mode static")),
        (("--target", "cuda"), ("--mode auto", "CPU")),
    ],
    ids=["no-quantize", "no-latency-check", "ranges", "cuda"],
)
def test_bad_auto_combinations_are_one_line_errors(cli, encoder_file, tmp_path, flags, fragments):
    (tmp_path / "r.json").write_text("{}")
    flags = tuple(str(tmp_path / f) if f.endswith(".json") else f for f in flags)
    out = tmp_path / "o.onnx"
    result = cli("compile", encoder_file, "-o", out, "--mode", "auto", *flags)
    _one_line_error(result, *fragments)
    assert not out.exists()


def test_auto_needs_an_input_to_time_on(cli, encoder_file, tmp_path):
    # S is dynamic: no data and no --shape leave nothing to time the candidates on.
    out = tmp_path / "o.onnx"
    result = cli("compile", encoder_file, "-o", out, "--mode", "auto")
    _one_line_error(result, "--mode auto", "--shape", "dynamic dimension")
    assert not out.exists()


def test_auto_with_data_but_no_check_samples_says_why_static_is_out(
    cli, monkeypatch, encoder_file, calib, tmp_path
):
    out = tmp_path / "auto.onnx"
    medians = {"fp32": 10.0, "dynamic": 4.0, "weight-only": 12.0}
    flags = ("--calibration-data", calib, "--check-samples", "0")
    _, report = _compile(cli, monkeypatch, encoder_file, out, medians, *flags)
    auto = report["auto"]
    assert not auto["modes"]["static"]["considered"]
    assert "--check-samples 0" in auto["modes"]["static"]["reason"]
    assert auto["fidelity"] == {"checked": False, "reason": "--check-samples 0"}
    assert auto["emitted"] == "dynamic"
