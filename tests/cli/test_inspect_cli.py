"""``onnxq inspect`` on models with named dimensions and without Conv."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_builders import build_model


@pytest.fixture
def matmul_file(tmp_path):
    model = build_model(
        """
        net (float[batch,4] x) => (float[batch,2] y) {
            [mm] y = MatMul (x, w)
        }
        """,
        {"w": np.ones((4, 2), np.float32)},
    )
    path = tmp_path / "matmul.onnx"
    onnx.save(model, path)
    return path


def test_json_gives_name_dtype_and_shape_fields(cli, matmul_file):
    result = cli("inspect", "--json", matmul_file)

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": ["batch", 4]}]
    assert info["outputs"] == [{"name": "y", "dtype": "FLOAT", "shape": ["batch", 2]}]


def test_text_shows_dimension_names(cli, matmul_file):
    result = cli("inspect", matmul_file)

    assert result.exit_code == 0, result.output
    assert "x: FLOAT [batch, 4]" in result.output
    assert "SymbolicDim" not in result.output


def test_no_conv_units_without_conv(cli, matmul_file, conv_bn_relu_model, save_onnx):
    fusion = json.loads(cli("inspect", "--json", matmul_file).stdout)["fusion"]
    assert "conv_activation_units" not in fusion
    assert fusion["matmul_bias_units"] == 0

    conv = json.loads(cli("inspect", "--json", save_onnx(conv_bn_relu_model)).stdout)["fusion"]
    assert conv["conv_activation_units"] == 2
