"""Tests for passes/awq.py: reading ORT's block packing back, and the scale search."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_builders import seeded
from onnx import TensorProto, helper
from ort_helpers import ort_outputs

from onnxq.passes.awq import dequantize_blocks, fake_quantize, quantizer, search_scales


def _matmul_nbits(packed, scales, zero_points, k, n, bits, block_size) -> onnx.ModelProto:
    """A one-node MatMulNBits model (ONNX Runtime's own reading of the packing)."""
    inits = [
        onnx.numpy_helper.from_array(packed, "B"),
        onnx.numpy_helper.from_array(scales, "scales"),
    ]
    inputs = ["A", "B", "scales"]
    if zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(zero_points, "zp"))
        inputs.append("zp")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
        block_size=block_size,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize(
    ("bits", "symmetric", "k"), [(4, False, 96), (4, True, 80), (8, False, 64), (8, True, 72)]
)
def test_dequantized_blocks_are_what_matmulnbits_multiplies_by(bits, symmetric, k):
    # K not a multiple of the block in three cases: the padded tail must be cut.
    w = seeded(0)(k, 24)
    quant = quantizer(bits, 32, symmetric)
    packed, scales, zero_points = quant.qbits_block_quant(w)
    zp = None if symmetric else zero_points
    ours = dequantize_blocks(packed, scales, zp, k, bits, 32)
    # Identity input: ONNX Runtime's output is the weight it dequantized.
    model = _matmul_nbits(packed, scales, zp, k, 24, bits, 32)
    theirs = ort_outputs(model, {"A": np.eye(k, dtype=np.float32)})["Y"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.abs(ours - w).max() > 0  # it is quantized (a no-op reader would pass above)
    np.testing.assert_allclose(fake_quantize(w, quant), ours)


def _outlier_activations(rows: int = 512, k: int = 128) -> np.ndarray:
    x = seeded(1)(rows, k)
    x[:, :4] *= 30.0  # a few channels carry large activations (what AWQ exploits)
    return x


def test_scales_fire_on_outlier_channels_and_beat_plain_rounding():
    x, w = _outlier_activations(), seeded(2)(128, 64, scale=0.1)
    choice = search_scales(x, w, quantizer(4, 32, False))
    assert choice.alpha > 0 and choice.scales is not None
    # Measured ~+3 dB here; scales that do not compensate exactly would lose many dB.
    assert choice.sqnr_db > choice.rtn_sqnr_db + 1.0
    approx = (x / choice.scales) @ fake_quantize(
        w * choice.scales[:, None], quantizer(4, 32, False)
    )
    error = np.sum((x @ w - approx) ** 2)
    assert 10 * np.log10(np.sum((x @ w) ** 2) / error) == pytest.approx(choice.sqnr_db, abs=1e-3)


def test_scales_do_not_fire_when_channels_are_alike():
    # Every channel has the same mean magnitude: every alpha gives s = 1, plain rounding.
    x = np.where(seeded(3)(256, 128) > 0, 1.0, -1.0).astype(np.float32)
    choice = search_scales(x, seeded(4)(128, 64), quantizer(4, 32, False))
    assert choice.alpha == 0 and choice.scales is None
    assert choice.sqnr_db == choice.rtn_sqnr_db
