"""CUDA execution provider checks; skipped where onnxruntime has no CUDA provider."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_builders import build_model, seeded

from onnxq.bench import benchmark
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.runtime import available_providers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif("cuda" not in available_providers(), reason="no CUDAExecutionProvider"),
]


def test_cuda_bench_reports_int8_placement(tmp_path):
    normal = seeded(0)
    model = build_model(
        """
        net (float[1,3,16,16] x) => (float[1,8,16,16] y) {
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            [relu] y = Relu (c)
        }
        """,
        {"w": normal(8, 3, 3, 3, scale=0.3), "b": normal(8, scale=0.1)},
    )
    src, out = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", x=normal(8, 3, 16, 16))
    config = CompileConfig(calibration=str(tmp_path / "c.npz"), target="cuda", check_latency=False)
    compile_model(src, out, config)
    result = benchmark([src, out], provider="cuda", max_time=0.5).to_dict()
    assert {r["provider"] for r in result["results"]} == {"cuda"}
    assert result["model_info"][1]["placement"]  # per-node provider placement is reported
