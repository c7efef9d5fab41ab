"""``onnxq compile --mode weight-only`` as a user runs it: zoo decoder, report, bad flags."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_builders import tied_lm_model
from ort_helpers import ort_outputs
from test_compile_cli import assert_one_line_error


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    """The zoo decoder exported through the CLI (once: export takes seconds)."""
    from click.testing import CliRunner

    from onnxq.cli import main

    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    result = CliRunner().invoke(main, ["export", "decoder", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_decoder_exports_with_dynamic_batch_and_sequence(decoder_file):
    model = onnx.load(str(decoder_file), load_external_data=False)
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_weight_only_decoder_end_to_end(cli, decoder_file, tmp_path):
    out, report = tmp_path / "w4.onnx", tmp_path / "report.json"
    result = cli(
        "compile", decoder_file, "-o", out, "--mode", "weight-only", "--bits", "4",
        "--block-size", "32", "--shape", "input=1,1", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    section = json.loads(report.read_text())["weight_only"]
    assert section["tied"]  # the LM head shares the embedding's packed weight
    assert section["weight_bytes"]["ratio"] > 6
    latency = section["latency"]
    assert latency["shape"] == {"input": [1, 1]}
    assert section["emitted"] == latency["emitted"]
    written = _ops(out)
    if section["emitted"] == "weight-only":
        assert written.count("MatMulNBits") == len(section["quantized_nodes"])
        assert "GatherBlockQuantized" in written
        # Seeded random weights: int4 blocks of 32 keep the logits within ~25% (L2).
        ids = np.random.default_rng(0).integers(0, 8192, size=(2, 12), dtype=np.int64)
        expected = ort_outputs(decoder_file, {"input": ids})["output"]
        got = ort_outputs(out, {"input": ids})["output"]
        assert got.shape == (2, 12, 8192)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.35
    else:  # slower on this machine at that shape: the optimised fp32 model, and why
        assert "MatMulNBits" not in written
        assert "slower" in section["reason"]
    assert "weight-only int4 block 32" in result.output


def test_weight_only_without_latency_check_writes_int8_blocks(cli, save_onnx, tmp_path):
    src, out = save_onnx(tied_lm_model()), tmp_path / "w8.onnx"
    result = cli(
        "compile", src, "-o", out, "--mode", "weight-only", "--bits", "8",
        "--block-size", "64", "--symmetric", "--no-latency-check",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"]) == (8, 64)
        assert len(node.input) == 3  # symmetric: no zero points


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--bits", "3"], "bits must be 4 or 8"),
        (["--block-size", "0"], "power of two >= 16"),
        (["--block-size", "48"], "power of two >= 16"),
        (["--accuracy-level", "7"], "accuracy level"),
        (["--no-quantize"], "contradicts --no-quantize"),
    ],
)
def test_bad_weight_only_settings_are_usage_errors(cli, save_onnx, tmp_path, flags, fragment):
    src = save_onnx(tied_lm_model())
    result = cli("compile", src, "-o", tmp_path / "o.onnx", "--mode", "weight-only", *flags)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_weight_only_on_a_model_without_matmul_weights_says_so(cli, save_onnx, tmp_path):
    src = save_onnx(
        onnx.parser.parse_model(
            '<ir_version: 8, opset_import: ["" : 17]>\n'
            "mm (float[2,64,64] a, float[2,64,64] b) => (float[2,64,64] y) "
            "{ y = MatMul (a, b) }"
        )
    )
    result = cli("compile", src, "-o", tmp_path / "o.onnx", "--mode", "weight-only")
    assert_one_line_error(result, "no MatMul or Gemm", "constant weight")
    assert not (tmp_path / "o.onnx").exists()


def test_weight_only_with_data_reports_scales_and_bits_per_layer(cli, save_onnx, tmp_path):
    proto = tied_lm_model()
    w1 = next(t for t in proto.graph.initializer if t.name == "w1")
    array = onnx.numpy_helper.to_array(w1).copy()
    array[:, :4] *= 30.0  # outlier channels in fc2's and the head's input
    w1.CopyFrom(onnx.numpy_helper.from_array(array, "w1"))
    src, calib = save_onnx(proto), tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(
        calib,
        ids=rng.integers(0, 512, size=(8, 8), dtype=np.int64),
        k=rng.standard_normal((8, 8, 256)).astype(np.float32),
    )
    base = ("--mode", "weight-only", "--calibration-data", calib, "--no-latency-check")
    out, report = tmp_path / "w.onnx", tmp_path / "r.json"
    result = cli("compile", src, "-o", out, *base, "--report", report)
    assert result.exit_code == 0, result.output
    section = json.loads(report.read_text())["weight_only"]
    assert set(section["activation_aware"]) == {"fc1", "fc2", "head"}
    assert section["activation_aware"]["fc2"]["alpha"] > 0
    assert "scaled" in result.output
    # A floor no 4- or 8-bit layer meets: every weight stays fp32, each with its SQNR.
    result = cli("compile", src, "-o", out, *base, "--min-sqnr", "90", "--report", report)
    assert result.exit_code == 0, result.output
    section = json.loads(report.read_text())["weight_only"]
    assert section["quantized_nodes"] == [] and section["emitted"] == "fp32"
    for node in ("fc1", "fc2", "head"):
        assert "< 90 dB" in section["not_quantized"][node]


def test_tied_block_size_applies_to_the_tied_head_and_its_lookups_only(cli, save_onnx, tmp_path):
    proto = tied_lm_model()
    src, out = save_onnx(proto), tmp_path / "w.onnx"
    result = cli(
        "compile", src, "-o", out, "--mode", "weight-only", "--block-size", "128",
        "--tied-block-size", "32", "--no-latency-check",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    blocks = {
        n.name: onnx.helper.get_attribute_value(
            next(a for a in n.attribute if a.name == "block_size")
        )
        for n in model.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert blocks == {"fc1_Q4": 128, "fc2_Q4": 128, "head_Q4": 32, "embed_Q4": 32}
    rng = np.random.default_rng(0)
    feeds = {
        "ids": rng.integers(0, 512, size=(1, 8), dtype=np.int64),
        "k": rng.standard_normal((1, 8, 256)).astype(np.float32),
    }
    expected = ort_outputs(proto, feeds)["logits"]
    got = ort_outputs(model, feeds)["logits"]
    # 4-bit blocks through two layers: ~16% relative error (tests/passes/test_weight_only.py).
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.25


def test_a_bad_tied_block_size_is_a_usage_error(cli, save_onnx, tmp_path):
    src = save_onnx(tied_lm_model())
    flags = ("--mode", "weight-only", "--tied-block-size", "24")
    result = cli("compile", src, "-o", tmp_path / "o.onnx", *flags)
    assert_one_line_error(result, "tied block size", "power of two >= 16")
    assert not (tmp_path / "o.onnx").exists()


def test_weight_only_with_enough_data_says_what_gptq_and_the_end_to_end_check_did(
    cli, save_onnx, tmp_path
):
    # 64 samples of 8 tokens: 512 rows per MatMul, at least K = 256, so GPTQ competes.
    src, calib = save_onnx(tied_lm_model()), tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(
        calib,
        ids=rng.integers(0, 512, size=(64, 8), dtype=np.int64),
        k=rng.standard_normal((64, 8, 256)).astype(np.float32),
    )
    out, report = tmp_path / "w.onnx", tmp_path / "r.json"
    result = cli(
        "compile", src, "-o", out, "--mode", "weight-only", "--calibration-data", calib,
        "--no-latency-check", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    section = json.loads(report.read_text())["weight_only"]
    gptq = [n for n, a in section["activation_aware"].items() if a["method"] == "gptq"]
    assert f"{len(gptq)} rounded by GPTQ" in result.output
    e2e = section["end_to_end"]
    assert e2e["chosen"] in e2e["sqnr_db"]
    assert ("end to end" in result.output) == (e2e["chosen"] != "aware")
    # The tied head takes GPTQ's codes unless the whole model did better without them.
    assert ("head" in gptq) == (e2e["chosen"] == "aware")
