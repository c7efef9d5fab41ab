"""Pruning: magnitude/2:4/mask sparsity, and structured channel removal."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded

# Plain imports (tests/ is on sys.path for conftest): work with `pytest` and `python -m pytest`.
from ort_helpers import max_rel_diff, sample_inputs, to_ir

from onnxq.errors import InputError
from onnxq.passes.prune import (
    TWO_FOUR_NOTE,
    ApplyMasksPass,
    PruneChannelsPass,
    PruneWeightsPass,
    RemovedSlice,
)
from onnxq.passes.results import ChannelPruneResult

# ---------------------------------------------------------------------------- models


def _residual() -> onnx.ModelProto:
    """Conv -> Conv + 1x1 shortcut (residual Add) -> Conv -> GAP -> Flatten -> Gemm."""
    n = seeded(10)
    return build_model(
        """
        net (float[1,4,8,8] x) => (float[1,2] y) {
            [c1] a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            [r1] ra = Relu (a)
            [c2] b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)
            [c3] s = Conv (x, w3)
            [add] t = Add (b, s)
            [r2] u = Relu (t)
            [c4] v = Conv (u, w4, b4)
            [gap] g = GlobalAveragePool (v)
            [flat] f = Flatten (g)
            [fc] y = Gemm <transB = 1> (f, wf, bf)
        }
        """,
        {
            "w1": n(8, 4, 3, 3), "b1": n(8), "w2": n(8, 8, 3, 3), "b2": n(8),
            "w3": n(8, 4, 1, 1), "w4": n(6, 8, 1, 1), "b4": n(6), "wf": n(2, 6), "bf": n(2),
        },
    )  # fmt: skip


def _concat() -> onnx.ModelProto:
    """Two convs concatenated around the (unprunable) input, then a consumer conv."""
    n = seeded(11)
    return build_model(
        """
        net (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            [c1] a = Conv (x, w1)
            [c2] b = Conv (x, w2, b2)
            [cat] c = Concat <axis = 1> (a, x, b)
            [r] r = Relu (c)
            [c3] y = Conv (r, w3)
        }
        """,
        {"w1": n(6, 3, 1, 1), "w2": n(4, 3, 1, 1), "b2": n(4), "w3": n(5, 13, 1, 1)},
    )


def _depthwise() -> onnx.ModelProto:
    """Conv -> ReLU6 -> depthwise Conv -> HardSwish -> pointwise Conv."""
    n = seeded(12)
    return build_model(
        """
        net (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            [c1] a = Conv (x, w1, b1)
            [relu6] r = Clip (a, lo, hi)
            [dw] d = Conv <group = 8, pads = [1, 1, 1, 1]> (r, wd, bd)
            [hs] h = HardSwish (d)
            [pw] y = Conv (h, w3)
        }
        """,
        {
            "w1": n(8, 3, 1, 1), "b1": n(8), "lo": np.array(0, np.float32),
            "hi": np.array(6, np.float32), "wd": n(8, 1, 3, 3), "bd": n(8), "w3": n(4, 8, 1, 1),
        },
    )  # fmt: skip


def _gemm_head() -> onnx.ModelProto:
    """Conv -> MaxPool -> Reshape to (N, C*H*W) -> Gemm -> Relu -> MatMul."""
    n = seeded(13)
    return build_model(
        """
        net (float[1,3,4,4] x) => (float[1,3] y) {
            [c1] a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            [r] r = Relu (a)
            [pool] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
            [rs] f = Reshape (p, shape)
            [fc] h = Gemm (f, wf, bf)
            [r2] hr = Relu (h)
            [fc2] y = MatMul (hr, w2)
        }
        """,
        {
            "w1": n(6, 3, 3, 3), "b1": n(6), "shape": np.array([1, 24], np.int64),
            "wf": n(24, 5), "bf": n(5), "w2": n(5, 3),
        },
    )  # fmt: skip


def _inferred(proto: onnx.ModelProto) -> ir.Model:
    """The IR with inferred intermediate shapes (the pipeline's cleanup provides them)."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _zeroed(proto: onnx.ModelProto, removed: list[RemovedSlice]) -> ir.Model:
    """The unpruned model with every removed slice set to 0 (each node gets its own copy)."""
    model = to_ir(proto)
    nodes = {node.name: node for node in model.graph}
    for i, piece in enumerate(removed):
        node = nodes[piece.node]
        array = node.inputs[piece.input_index].const_value.numpy().copy()
        index = [slice(None)] * array.ndim
        index[piece.axis] = list(piece.indices)
        array[tuple(index)] = 0
        value = ir.Value(name=f"zeroed{i}", const_value=ir.tensor(array, name=f"zeroed{i}"))
        model.graph.register_initializer(value)
        node.replace_input_with(piece.input_index, value)
    return model


def _prune_channels(proto: onnx.ModelProto, sparsity: float = 0.3, **kwargs) -> ChannelPruneResult:
    model = _inferred(proto)
    result = PruneChannelsPass(sparsity, **kwargs)(model)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    feeds = sample_inputs(proto)
    diff = max_rel_diff(_zeroed(proto, result.removed), result.model, feeds)
    assert diff <= 1e-4, diff
    return result


def _shape(model: ir.Model, name: str) -> tuple[int, ...]:
    return tuple(model.graph.initializers[name].const_value.shape)


def _weights(model: ir.Model, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].const_value.numpy()


# ---------------------------------------------------------------------------- weights


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}


def test_unstructured_hits_sparsity_and_leaves_the_rest_bit_identical():
    model = to_ir(_residual())
    before = _initializers(model)
    pass_ = PruneWeightsPass(0.5, exclude=["c4"])(model)
    assert pass_.modified
    after = _initializers(model)
    targets = {"w1", "w2", "w3", "wf"}
    for name in targets:
        assert abs(np.mean(after[name] == 0) - 0.5) <= 0.01, name
        kept = after[name] != 0
        np.testing.assert_array_equal(after[name][kept], before[name][kept])
    for name in before.keys() - targets:  # biases and the excluded c4
        assert after[name].tobytes() == before[name].tobytes(), name
    summary = pass_.details
    assert summary["layers"]["c1"] == [0.0, 0.5] and "c4" not in summary["layers"]
    assert summary["zipped_bytes_after"] < summary["zipped_bytes_before"]


def test_global_magnitude_meets_the_total():
    model = to_ir(_residual())
    pass_ = PruneWeightsPass(0.5, method="global")(model)
    assert abs(pass_.details["sparsity"] - 0.5) <= 0.01
    # One threshold: layer sparsities differ, unlike the per-layer method.
    assert len({after for _, after in pass_.details["layers"].values()}) > 1


def test_two_four_keeps_two_of_every_four_input_channels():
    model = to_ir(_residual())
    pass_ = PruneWeightsPass(method="2:4")(model)
    w2 = _weights(model, "c2")  # Cin 8: groups of 4 along axis 1
    groups = np.moveaxis(w2, 1, -1).reshape(-1, 4)
    assert np.all(np.count_nonzero(groups, axis=1) == 2)
    assert pass_.details["note"] == TWO_FOUR_NOTE
    assert pass_.details["layers"]["fc"] == [0.0, 0.0]  # Cin 6: not a multiple of 4


def test_nothing_to_prune():
    model = to_ir(build_model("net (float[2,5] x) => (float[2,5] y) { y = Relu (x) }"))
    with pytest.raises(InputError, match="nothing to prune"):
        PruneWeightsPass(0.5)(model)
    with pytest.raises(InputError, match="nothing to prune"):
        PruneChannelsPass(0.5)(model)


def test_masks_apply_and_are_checked():
    model = to_ir(_residual())
    mask = np.zeros((8, 4, 3, 3), np.float32)
    mask[:4] = 1
    ApplyMasksPass({"w1": mask})(model)
    w1 = model.graph.initializers["w1"].const_value.numpy()
    assert np.all(w1[4:] == 0) and np.all(w1[:4] != 0)
    with pytest.raises(
        InputError, match=r"'w1' has shape \(8, 4\), its initializer \(8, 4, 3, 3\)"
    ):
        ApplyMasksPass({"w1": np.ones((8, 4))})(model)
    with pytest.raises(InputError, match="'nope' names no initializer"):
        ApplyMasksPass({"nope": np.ones(3)})(model)
    with pytest.raises(InputError, match="only 0 and 1"):
        ApplyMasksPass({"w1": mask * 2})


# ---------------------------------------------------------------------------- channels


def test_residual_add_prunes_the_group_with_one_index_set():
    result = pass_ = _prune_channels(_residual())
    model = result.model
    assert _shape(model, "w1") == (6, 4, 3, 3)
    assert _shape(model, "w2") == (6, 6, 3, 3)
    assert _shape(model, "w3") == (6, 4, 1, 1)
    assert _shape(model, "w4") == (4, 6, 1, 1)
    assert _shape(model, "wf") == (2, 4)  # the Gemm head loses rows, keeps its 2 outputs
    cuts = {(p.node, p.input_index, p.axis): p.indices for p in pass_.removed}
    assert cuts[("c2", 1, 0)] == cuts[("c3", 1, 0)] == cuts[("c4", 1, 1)]
    assert pass_.details["left_unpruned"] == {"fc": "reaches graph output 'y'"}
    add_out = next(n for n in model.graph if n.name == "add").outputs[0]
    assert list(add_out.shape) == [1, 6, 8, 8]


def test_concat_offsets_channels():
    result = pass_ = _prune_channels(_concat())
    assert _shape(result.model, "w3") == (5, 10, 1, 1)  # 13 - 2 (of c1) - 1 (of c2)
    c2_cut = next(p for p in pass_.removed if (p.node, p.axis) == ("c2", 0))
    rows = next(p for p in pass_.removed if p.node == "c3").indices
    assert {6 + 3 + i for i in c2_cut.indices} <= set(rows)  # offset past c1 and x


def test_depthwise_conv_follows_its_input():
    result = _prune_channels(_depthwise())
    dw = next(n for n in result.model.graph if n.name == "dw")
    assert dw.attributes["group"].as_int() == 6
    assert _shape(result.model, "wd") == (6, 1, 3, 3)
    assert _shape(result.model, "w3") == (4, 6, 1, 1)


def test_gemm_head_after_reshape():
    result = _prune_channels(_gemm_head())
    model = result.model
    assert _shape(model, "wf") == (16, 4)  # 2 of 6 channels x 2x2 rows, 1 of 5 columns
    assert _shape(model, "w2") == (4, 3)
    assert "Flatten" in [n.op_type for n in model.graph]


def test_unknown_consumer_leaves_the_producer_whole():
    n = seeded(14)
    proto = build_model(
        """
        net (float[1,3,4,4] x) => (float[1,2,4,4] y) {
            [c1] a = Conv (x, w1)
            [sm] s = Softmax <axis = 1> (a)
            [c2] y = Conv (s, w2)
        }
        """,
        {"w1": n(6, 3, 1, 1), "w2": n(2, 6, 1, 1)},
    )
    result = pass_ = _prune_channels(proto)
    assert not result.modified
    assert pass_.details["left_unpruned"]["c1"] == "reaches Softmax 'sm'"


def _wide(widths: tuple[int, int]) -> onnx.ModelProto:
    """Two 1x1 convs of the given widths feeding a 2-channel conv (the graph output)."""
    n = seeded(15)
    a, b = widths
    return build_model(
        """
        net (float[1,3,4,4] x) => (float[1,2,4,4] y) {
            [c1] h = Conv (x, w1, b1)
            [r] hr = Relu (h)
            [c2] g = Conv (hr, w2)
            [c3] y = Conv (g, w3)
        }
        """,
        {"w1": n(a, 3, 1, 1), "b1": n(a), "w2": n(b, a, 1, 1), "w3": n(2, b, 1, 1)},
    )


@pytest.mark.parametrize(
    ("widths", "kept"),
    [
        ((16, 24), (8, 16)),  # 0.7 * 16 = 11.2 and 0.7 * 24 = 16.8 round to multiples of 8
        ((6, 8), (4, 6)),  # no wider than 8: no rounding
    ],
)
def test_kept_channels_round_to_multiples_of_8(widths, kept):
    result = pass_ = _prune_channels(_wide(widths), round_to=8)
    assert _shape(result.model, "w1")[0] == kept[0]
    assert _shape(result.model, "w2") == (kept[1], kept[0], 1, 1)
    assert pass_.details["layers"]["c1"] == [widths[0], kept[0]]
    assert pass_.details["layers"]["c2"] == [widths[1], kept[1]]


def test_round_to_1_keeps_the_plain_fraction():
    result = _prune_channels(_wide((16, 24)), round_to=1)
    assert _shape(result.model, "w2") == (17, 11, 1, 1)


def test_zoo_resnet_keeps_outputs_but_removed_channels(tmp_path):
    pytest.importorskip("torch")
    from onnxq import io
    from onnxq.config import CompileConfig
    from onnxq.export import export_torch
    from onnxq.models import ZOO
    from onnxq.pipeline import build_pipeline
    from onnxq.recording import run_pipeline

    path = tmp_path / "resnet.onnx"
    export_torch(ZOO["resnet"].factory(), (1, 3, 64, 64), path, exporter="torchscript")
    fused, _ = run_pipeline(io.load_model(path), build_pipeline(CompileConfig(quantize=False)))
    proto = ir.to_proto(fused)
    pass_ = _prune_channels(proto, round_to=8)  # the bounds below were set for blocks of 8
    summary = pass_.details
    assert 0.28 <= 1 - summary["channels_after"] / summary["channels_before"] <= 0.32
    assert summary["parameters"][1] < 0.6 * summary["parameters"][0]


# ---------------------------------------------------------------------------- bias compensation

_DEAD = (0, 5)  # producer channels with zero weights: the lowest importance, pruned first


def _dead_conv() -> onnx.ModelProto:
    """Conv -> Relu -> unpadded 3x3 Conv without bias: two channels are a constant 3."""
    n = seeded(15)
    w1, b1 = n(8, 3, 1, 1), n(8)
    w1[list(_DEAD)], b1[list(_DEAD)] = 0, 3
    return build_model(
        """
        net (float[1,3,6,6] x) => (float[1,4,4,4] y) {
            [c1] a = Conv (x, w1, b1)
            [r] r = Relu (a)
            [c2] y = Conv (r, w2)
        }
        """,
        {"w1": w1, "b1": b1, "w2": n(4, 8, 3, 3)},
    )


def _dead_gemm() -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm (transB, alpha and beta): two channels are a constant 3."""
    n = seeded(16)
    w1, b1 = n(5, 8), n(8)
    w1[:, list(_DEAD)], b1[list(_DEAD)] = 0, 3
    return build_model(
        """
        net (float[2,5] x) => (float[2,3] y) {
            [fc1] a = Gemm (x, w1, b1)
            [r] r = Relu (a)
            [fc2] y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (r, w2, b2)
        }
        """,
        {"w1": w1, "b1": b1, "w2": n(3, 8), "b2": n(3)},
    )


def _dead_matmul() -> onnx.ModelProto:
    """MatMul + Add -> Relu -> MatMul (a graph output, no bias): two channels are 3."""
    n = seeded(17)
    w1, b1 = n(5, 8), n(8)
    w1[:, list(_DEAD)], b1[list(_DEAD)] = 0, 3
    return build_model(
        """
        net (float[2,4,5] x) => (float[2,4,3] y) {
            [mm1] m = MatMul (x, w1)
            [add] a = Add (m, b1)
            [r] r = Relu (a)
            [mm2] y = MatMul (r, w2)
        }
        """,
        {"w1": w1, "b1": b1, "w2": n(8, 3)},
    )


def _open_data(tmp_path, proto: onnx.ModelProto):
    from onnxq.calibration.data import open_calibration_data

    (graph_input,) = proto.graph.input
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    return open_calibration_data(_calibration(tmp_path, tuple(shape)), to_ir(proto))


@pytest.mark.parametrize("make", [_dead_conv, _dead_gemm, _dead_matmul])
def test_bias_compensation_is_exact_for_constant_channels(tmp_path, make):
    proto = make()
    feeds = sample_inputs(proto)
    plain = PruneChannelsPass(0.25)(_inferred(proto))
    plain_model = plain.model
    assert plain.details["bias_compensated"] == 0
    pass_ = PruneChannelsPass(0.25, calibration=_open_data(tmp_path, proto))(_inferred(proto))
    model = pass_.model
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert pass_.removed[0].indices == _DEAD  # the producer's weight
    assert pass_.details["bias_compensated"] == 1
    assert "bias compensated in 1 consumer(s)" in pass_.details["note"]
    assert [o.name for o in model.graph.outputs] == ["y"]
    # The removed channels were constant: their mean is all they ever contributed.
    assert max_rel_diff(proto, model, feeds) <= 1e-4
    assert max_rel_diff(proto, plain_model, feeds) > 1e-2


def test_bias_compensation_creates_a_conv_bias_and_folds_into_matmul_add(tmp_path):
    proto = _dead_conv()
    model = PruneChannelsPass(0.25, calibration=_open_data(tmp_path, proto))(_inferred(proto))
    c2 = next(n for n in model.model.graph if n.name == "c2")
    assert c2.inputs[2].const_value.shape == (4,)
    # A MatMul followed by its bias Add: the Add's constant takes the compensation.
    proto = _dead_matmul()
    proto.graph.node[-1].output[0] = "p"
    proto.graph.node.append(onnx.helper.make_node("Add", ["p", "b2"], ["y"], name="add2"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "b2"))
    model = PruneChannelsPass(0.25, calibration=_open_data(tmp_path, proto))(_inferred(proto))
    assert [n.op_type for n in model.model.graph].count("Add") == 2
    assert max_rel_diff(proto, model.model, sample_inputs(proto)) <= 1e-4


# ---------------------------------------------------------------------------- pipeline


def _calibration(tmp_path, shape: tuple[int, ...]) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).random((16, *shape[1:]), dtype=np.float32))
    return str(path)


def test_prune_then_int8_compose(tmp_path, save_onnx):
    from onnxq.compiler import compile_model
    from onnxq.config import CompileConfig

    src = save_onnx(_residual())
    config = CompileConfig(
        prune="channels:0.3:compensate",
        calibration=_calibration(tmp_path, (1, 4, 8, 8)),
        check_latency=False,
        # The random two-logit head barely varies between inputs, so the spread check of
        # narrow heads (fidelity.py) would keep this model fp32 at the default floor;
        # this test is about pruning composing with int8, not about that floor.
        min_sqnr=10.0,
    )
    report = compile_model(src, tmp_path / "out.onnx", config).to_dict()
    assert report["pruning"]["PruneChannelsPass"]["layers"]["c1"] == [8, 6]
    # The same data compensates the biases of the pruned channels' consumers (c2, c4, fc).
    assert report["pruning"]["PruneChannelsPass"]["bias_compensated"] == 3
    assert report["calibration"]["ranges"]["tensors"] > 0 and report["quantized_nodes"]
    stages = [p["stage"] for p in report["passes"]]
    assert stages.index("prune") < stages.index("quantize")
    # int8 is checked against the pruned fp32 model (the default 20 dB floor), then that
    # reference file is removed.
    assert report["fidelity"]["min_sqnr_db"] >= 20
    assert not list(tmp_path.glob(".*pruned-fp32*"))


def test_pipeline_nothing_to_prune(tmp_path, save_onnx):
    from onnxq.compiler import compile_model
    from onnxq.config import CompileConfig

    src = save_onnx(build_model("net (float[2,5] x) => (float[2,5] y) { y = Relu (x) }"))
    with pytest.raises(InputError, match="nothing to prune"):
        compile_model(src, tmp_path / "o.onnx", CompileConfig(quantize=False, prune="2:4"))


def test_cli_prune_channels(cli, save_onnx, tmp_path):
    src = save_onnx(_depthwise())
    args = ["compile", src, "-o", tmp_path / "o.onnx", "--no-quantize", "--prune"]
    data = _calibration(tmp_path, (1, 3, 8, 8))
    # Calibration data alone does not compensate: that is opt-in.
    result = cli(
        *args, "channels:0.3", "--calibration-data", data, "--report", tmp_path / "plain.json"
    )
    assert result.exit_code == 0, result.output
    assert "prune (PruneChannelsPass): removed 2 of 8 output channels" in result.output
    assert "bias compensated" not in result.output
    plain = json.loads((tmp_path / "plain.json").read_text())["pruning"]["PruneChannelsPass"]
    assert plain["bias_compensated"] == 0
    # With :compensate the pruned channels' mean reaches the pointwise conv's bias.
    result = cli(
        *args,
        "channels:0.3:compensate",
        "--calibration-data",
        data,
        "--report",
        tmp_path / "comp.json",
    )
    assert result.exit_code == 0, result.output
    assert "bias compensated in 1 consumer(s)" in result.output
    comp = json.loads((tmp_path / "comp.json").read_text())["pruning"]["PruneChannelsPass"]
    assert comp["bias_compensated"] == 1 and comp["layers"] == plain["layers"]


def test_torch_pruned_export_keeps_its_zeros(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    from onnxq.compiler import compile_model
    from onnxq.config import CompileConfig
    from onnxq.export import export_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    prune.l1_unstructured(net[0], "weight", amount=0.5)  # not made permanent: orig * mask
    src = tmp_path / "pruned.onnx"
    export_torch(net, (1, 3, 8, 8), src, exporter="torchscript")
    report = compile_model(src, tmp_path / "out.onnx", CompileConfig(quantize=False)).to_dict()
    (layer,) = report["sparsity"]["layers"]
    assert report["sparsity"]["layers"][layer] == 0.5
    out = ir.load(tmp_path / "out.onnx")
    conv = next(n for n in out.graph if n.op_type == "Conv")
    assert np.mean(conv.inputs[1].const_value.numpy() == 0) == 0.5


def test_compensate_without_data_is_an_error(tmp_path, save_onnx):
    from onnxq.compiler import compile_model
    from onnxq.config import CompileConfig

    src = save_onnx(_residual())
    config = CompileConfig(quantize=False, prune="channels:0.3:compensate")
    with pytest.raises(InputError, match="compensate needs --calibration-data"):
        compile_model(src, tmp_path / "o.onnx", config)


def test_cli_prune_then_int8_names_its_reference_and_reports_both(cli, save_onnx, tmp_path):
    src = save_onnx(_residual())
    data = _calibration(tmp_path, (1, 4, 8, 8))
    report = tmp_path / "r.json"
    result = cli(
        *("compile", src, "-o", tmp_path / "o.onnx", "--prune", "channels:0.3"),
        *("--calibration-data", data, "--no-latency-check", "--min-sqnr", "10"),
        *("--report", report),
    )
    assert result.exit_code == 0, result.output
    fidelity = json.loads(report.read_text())["fidelity"]
    assert fidelity["reference"] == "pruned fp32"
    # Pruning moved the outputs: the written model is further from the input than from
    # the pruned fp32 model it was checked against.
    assert fidelity["vs_input_min_sqnr_db"] < fidelity["min_sqnr_db"]
    assert "vs pruned fp32 on" in result.output and "vs the unpruned input:" in result.output


def test_rounding_to_the_measured_block_reports_requested_and_effective_sparsity(monkeypatch):
    from onnxq.passes.prune import rounding

    monkeypatch.setattr(rounding, "channel_block", lambda: (16, "blocks of 16 (test)"))
    result = pass_ = _prune_channels(_wide((16, 40)))  # round_to auto: the block, 16
    # 16 is one block: exact 11; 0.7 * 40 = 28 rounds to 32 (4 away; 16 and 40 are 12).
    assert _shape(result.model, "w2") == (32, 11, 1, 1)
    rounding_ = pass_.details["rounding"]
    assert rounding_["round_to"] == 16 and rounding_["reason"] == "blocks of 16 (test)"
    assert rounding_["requested_sparsity"] == 0.3
    assert rounding_["layers"] == {"c1": [0.3, round(5 / 16, 4)], "c2": [0.3, 0.2]}
    assert rounding_["effective_sparsity"] == round(13 / 56, 4)
    assert "requested 30%, effective 23.2%" in pass_.details["note"]


def test_exact_counts_report_no_rounding():
    pass_ = _prune_channels(_wide((16, 40)), round_to=1)
    assert pass_.details["layers"] == {"c1": [16, 11], "c2": [40, 28], "c3": [2, 2]}
    assert pass_.details["rounding"]["round_to"] == 1
    assert "exact kept counts" in pass_.details["rounding"]["note"]


def _ort_conv_domains(model: ir.Model, tmp_path) -> list[str]:
    """The domain of every Conv in ONNX Runtime's fully optimised graph (NCHWc or plain)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options)
    optimized = onnx.load(options.optimized_model_filepath)
    return [n.domain for n in optimized.graph.node if n.op_type == "Conv"]


def test_rounded_channels_keep_every_conv_on_ort_nchwc_kernels(tmp_path):
    from onnxq.passes.prune.rounding import channel_block

    if channel_block()[0] == 1:
        pytest.skip("ONNX Runtime uses no NCHWc convolutions on this machine")
    n = seeded(16)
    proto = build_model(
        """
        net (float[1,3,8,8] x) => (float[1,4,8,8] y) {
            [c1] h = Conv <pads = [1, 1, 1, 1]> (x, w1)
            [r] hr = Relu (h)
            [c2] g = Conv <pads = [1, 1, 1, 1]> (hr, w2)
            [c3] y = Conv (g, w3)
        }
        """,
        {"w1": n(32, 3, 3, 3), "w2": n(32, 32, 3, 3), "w3": n(4, 32, 1, 1)},
    )
    assert set(_ort_conv_domains(_inferred(proto), tmp_path)) == {"com.microsoft.nchwc"}
    # Exact counts keep 22 of 32: ONNX Runtime pads 22 input channels only when a multiple
    # of 4, so c2 and c3 fall back to the plain Conv (the 0.75x of benchmarks/README.md).
    exact = _prune_channels(proto, round_to=1).model
    assert "" in _ort_conv_domains(exact, tmp_path)
    rounded = _prune_channels(proto).model  # the measured block: 16 (AVX-512) or 24 (AVX2)
    assert _shape(rounded, "w2")[0] % channel_block()[0] == 0
    assert set(_ort_conv_domains(rounded, tmp_path)) == {"com.microsoft.nchwc"}
