"""``onnxq compile --mode dynamic``: no calibration data, fidelity when data is given, bad flags."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded
from test_compile_int8_cli import _one_line_error

from onnxq.evaluate import sqnr_db
from onnxq.passes.dynamic import integer_derived
from onnxq.runtime import create_session, run

NET = """
mlp (float[N,64] x) => (float[N,16] y) {
    [mm] a = MatMul (x, w1)
    [relu] r = Relu (a)
    [gemm] y = Gemm <transB = 1> (r, w2, b2)
}
"""
# See tests/passes/test_dynamic.py: ~40 dB measured, wrong scales give < 5 dB.
SQNR_FLOOR_DB = 30.0


@pytest.fixture
def net_file(tmp_path):
    normal = seeded(0)
    weights = {"w1": normal(64, 32, scale=0.2), "w2": normal(16, 32, scale=0.2), "b2": normal(16)}
    path = tmp_path / "net.onnx"
    onnx.save(build_model(NET, weights), path)
    return path


def test_dynamic_compile_needs_no_calibration_data(cli, net_file, tmp_path):
    out, report = tmp_path / "dyn.onnx", tmp_path / "r.json"
    given = net_file.read_bytes()
    flags = ("--mode", "dynamic", "--no-latency-check", "--report", report)
    result = cli("compile", net_file, "-o", out, *flags)
    assert result.exit_code == 0, result.output
    assert "int8 (dynamic): 2 nodes quantized" in result.output
    assert "NOT CHECKED (no calibration data)" in result.output
    assert net_file.read_bytes() == given
    data = json.loads(report.read_text())
    assert data["config"]["mode"] == "dynamic"
    assert data["quantized_nodes"] == ["gemm", "mm"]
    quantize = [r["name"] for r in data["passes"] if r["stage"] == "quantize"]
    assert quantize[0] == "QuantizeDynamicPass"
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    x = {"x": seeded(1)(8, 64)}
    ref = run(create_session(str(net_file)), x)["y"]
    assert sqnr_db(ref, run(create_session(str(out)), x)["y"]) > SQNR_FLOOR_DB


def test_dynamic_compile_checks_fidelity_on_data_given(cli, net_file, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=seeded(2)(8, 64))
    out, report = tmp_path / "dyn.onnx", tmp_path / "r.json"
    result = cli(
        "compile",
        net_file,
        "-o",
        out,
        "--mode",
        "dynamic",
        "--calibration-data",
        calib,
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["fidelity"]["samples"] == 8
    assert data["fidelity"]["min_sqnr_db"] > SQNR_FLOOR_DB
    # The latency step decides; the file written is what the report says.
    emitted = data["placement"]["emitted"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ("MatMulInteger" in ops) == (emitted == "int8"), data["placement"]
    assert data["latency"]["emitted"] == emitted


def test_dynamic_below_the_floor_writes_fp32_or_fails_with_require_int8(cli, net_file, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=seeded(2)(8, 64))
    out = tmp_path / "dyn.onnx"
    args = ("compile", net_file, "-o", out, "--mode", "dynamic", "--calibration-data", calib)
    result = cli(*args, "--min-sqnr", "200", "--no-latency-check")
    assert result.exit_code == 0, result.output
    assert "wrote the optimised fp32 model, not int8" in result.stderr
    assert "MatMulInteger" not in [n.op_type for n in onnx.load(out).graph.node]
    out.unlink()
    result = cli(*args, "--min-sqnr", "200", "--require-int8")
    assert result.exit_code == 1, result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (("--mode", "dynamic", "--no-quantize"), ("--mode dynamic", "--no-quantize")),
        (("--mode", "dynamic", "--ranges", "r.json"), ("--ranges", "--mode static")),
        (("--mode", "dynamic", "--target", "cuda"), ("--mode dynamic", "CPU")),
        (("--mode", "sometimes"), ("sometimes",)),
    ],
    ids=["no-quantize", "ranges", "cuda", "unknown"],
)
def test_bad_dynamic_combinations_are_one_line_errors(cli, net_file, tmp_path, flags, fragments):
    (tmp_path / "r.json").write_text("{}")
    flags = tuple(str(tmp_path / f) if f.endswith(".json") else f for f in flags)
    out = tmp_path / "o.onnx"
    result = cli("compile", net_file, "-o", out, *flags)
    if "sometimes" in flags:  # click refuses the choice itself
        assert result.exit_code == 2 and "sometimes" in result.stderr
        return
    _one_line_error(result, *fragments)
    assert not out.exists()


def test_zoo_bert_weight_matmuls_go_int8_attention_and_mask_stay_fp32(cli, tmp_path):
    torch = pytest.importorskip("torch")
    from onnxq.export import export_torch
    from onnxq.models import ZOO

    info = ZOO["bert"]
    model = tmp_path / "bert.onnx"
    export_torch(
        info.factory(),
        (1, 32),
        model,
        input_dtype=torch.int64,
        input_names=info.input_names,
        sequence_axis=info.sequence_axis,
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, (4, 32))
    mask = np.ones_like(ids)
    mask[::2, 24:] = 0
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=ids, attention_mask=mask)
    out, report = tmp_path / "dyn.onnx", tmp_path / "r.json"
    result = cli(
        "compile", model, "-o", out, "--mode", "dynamic", "--calibration-data", calib,
        "--no-latency-check", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    # 4 layers x (q, k, v, out, up, down) + pooler and classifier: int8 weights.
    assert data["coverage"]["MatMul"]["quantized"] + data["coverage"]["Gemm"]["quantized"] == 26
    # Q.K^T and P.V in each layer: both operands are activations.
    kept = data["not_quantized"].values()
    assert len(kept) == 8 and all("both inputs are activations" in r for r in kept)
    assert data["fidelity"]["min_sqnr_db"] > SQNR_FLOOR_DB
    # The mask arithmetic (Cast, Sub, Mul) reaches the scores' Add in fp32, unquantized.
    graph = ir.load(out).graph
    derived = integer_derived(graph)
    mask_bias = [v for v in derived if v.dtype == ir.DataType.FLOAT]
    assert any(u.op_type == "Add" for v in mask_bias for u, _ in v.uses())
    assert not any(n.op_type == "DynamicQuantizeLinear" and n.inputs[0] in derived for n in graph)


def test_dynamic_latency_needs_a_shape_for_dynamic_dimensions(cli, tmp_path):
    normal = seeded(0)
    model = tmp_path / "seq.onnx"
    onnx.save(
        build_model(
            "seq (float[N,S,64] x) => (float[N,S,32] y) { [mm] y = MatMul (x, w) }",
            {"w": normal(64, 32, scale=0.2)},
        ),
        model,
    )
    out, report = tmp_path / "dyn.onnx", tmp_path / "r.json"
    result = cli("compile", model, "-o", out, "--mode", "dynamic", "--report", report)
    assert result.exit_code == 0, result.output
    placement = json.loads(report.read_text())["placement"]
    assert placement["emitted"] == "int8" and "not timed" in placement["reason"]
    assert "--shape" in placement["reason"]
    flags = ("--mode", "dynamic", "--shape", "x=1,4,64", "--report", report)
    result = cli("compile", model, "-o", out, *flags)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["latency"]["runs"] > 0
    assert data["placement"]["emitted"] == data["latency"]["emitted"]


CONV_NET = """
c (float[N,8,16,16] x) => (float[N,16] y) {
    [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    [relu] r = Relu (c)
    [pool] p = GlobalAveragePool (r)
    [flat] f = Flatten (p)
    [fc] y = MatMul (f, wf)
}
"""


def _fake_latency(medians):
    """``measure_latency`` stand-in: label -> rounds near its median (seeded noise)."""

    def measure(models, feeds=None, **_):
        rng = np.random.default_rng(0)
        return {k: medians[k] * (1 + 0.005 * rng.standard_normal(30)) for k in models}

    return measure


@pytest.mark.parametrize(
    ("conv_int8_ms", "emitted"), [(5.0, "int8"), (12.0, "fp32")], ids=["pays", "slower"]
)
def test_dynamic_conv_follows_its_measured_speed(cli, monkeypatch, tmp_path, conv_int8_ms, emitted):
    normal = seeded(4)
    weights = {"w": normal(16, 8, 3, 3, scale=0.2), "b": normal(16), "wf": normal(16, 16)}
    src, out, report = tmp_path / "c.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(build_model(CONV_NET, weights), src)
    medians = {"conv fp32": 10.0, "conv int8": conv_int8_ms, "input": 12.0, "fp32": 12.0}
    medians["int8"] = 6.0
    monkeypatch.setattr("onnxq.placement.measure_latency", _fake_latency(medians))
    result = cli("compile", src, "-o", out, "--mode", "dynamic", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    conv = data["placement"]["conv"]
    assert conv["decision"] == emitted and "ConvInteger measured" in conv["reason"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    if emitted == "int8":
        assert "ConvInteger" in ops and "conv" in data["quantized_nodes"]
    else:
        assert "Conv" in ops and "ConvInteger" not in ops
        assert "Conv stays fp32" in data["not_quantized"]["conv"]
