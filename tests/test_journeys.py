"""End-to-end user journeys: Torch model -> export -> compile -> bench -> gate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.export import export_torch
from onnxq.models import ZOO


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def convnet_ts(tmp_path_factory):
    """The zoo conv-bn-relu net exported with the TorchScript exporter (keeps BN)."""
    path = tmp_path_factory.mktemp("ts") / "convnet.onnx"
    export_torch(ZOO["convnet"].factory(), (1, 3, 32, 32), path, exporter="torchscript")
    return path


def test_torchscript_export_compiles_without_batchnorm(cli, convnet_ts, tmp_path):
    assert "BatchNormalization" in _ops(convnet_ts)
    out = tmp_path / "fp32.onnx"
    result = cli("compile", convnet_ts, "-o", out, "--no-quantize", "--verify")
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in _ops(out)
    assert "folded" in result.output
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref, got = _run(convnet_ts, x), _run(out, x)
    assert np.max(np.abs(ref - got)) <= 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def test_dynamo_optimized_export_reports_batchnorm_already_fused(cli, tmp_path):
    src = tmp_path / "dynamo.onnx"
    export_torch(ZOO["convnet"].factory(), (1, 3, 32, 32), src, optimize=True)
    assert "BatchNormalization" not in _ops(src)
    result = cli("compile", src, "-o", tmp_path / "out.onnx", "--no-quantize")
    assert result.exit_code == 0, result.output
    assert "already fused by the exporter" in result.output


def test_export_compile_bench_gate_through_the_cli(cli, tmp_path):
    fp32, int8 = tmp_path / "convnet.onnx", tmp_path / "convnet.int8.onnx"
    assert cli("export", "convnet", "-o", fp32).exit_code == 0
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", input=rng.standard_normal((32, 3, 32, 32), np.float32))
    np.savez(tmp_path / "test.npz", input=rng.standard_normal((16, 3, 32, 32), np.float32))
    result = cli(
        "compile",
        fp32,
        "-o",
        int8,
        "--calibration-data",
        tmp_path / "calib.npz",
        "--no-latency-check",
    )
    assert result.exit_code == 0, result.output
    bench = tmp_path / "bench.json"
    result = cli("bench", fp32, int8, "--batch-size", "1", "--time-budget", "0.5", "--json", bench)
    assert result.exit_code == 0, result.output
    assert len(json.loads(bench.read_text())["results"]) == 2
    gate = ["gate", fp32, int8, "--data", tmp_path / "test.npz", "--json", tmp_path / "g.json"]
    assert cli(*gate, "--min-sqnr", "20").exit_code == 0
    assert cli(*gate, "--min-sqnr", "200").exit_code == 1


def test_journey_as_a_subprocess(convnet_ts, tmp_path):
    np.savez(
        tmp_path / "calib.npz",
        **{
            onnx.load(convnet_ts).graph.input[0].name: np.random.default_rng(2).standard_normal(
                (16, 3, 32, 32), np.float32
            )
        },
    )
    out = tmp_path / "int8.onnx"
    command = [
        sys.executable,
        "-m",
        "onnxq",
        "compile",
        str(convnet_ts),
        "-o",
        str(out),
        "--calibration-data",
        str(tmp_path / "calib.npz"),
        "--no-latency-check",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "QuantizeLinear" in _ops(out) and "BatchNormalization" not in _ops(out)
