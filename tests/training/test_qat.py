"""Tests for onnxq/training/qat.py: the compiler's numerics in Torch, export, compile, ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from onnxq.compiler import compile_model  # noqa: E402
from onnxq.config import CompileConfig  # noqa: E402
from onnxq.errors import InputError  # noqa: E402
from onnxq.passes.qdq import QuantParams, quantize_weight  # noqa: E402
from onnxq.training.qat import (  # noqa: E402
    ActivationFakeQuantize,
    WeightFakeQuantize,
    diff_loss,
    export_qat,
    fake_quant_disabled,
    prepare_qat,
    qat_loss,
)


def _net() -> nn.Module:
    """Conv-BN-ReLU, a depthwise Conv-ReLU, MaxPool, Flatten, Linear (digits-sized)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


def _batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 1, 8, 8, generator=generator) for _ in range(count)]


def _fake_quants(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def _activation_fake_quants(qat) -> list[ActivationFakeQuantize]:
    """The activation fake quantizers in the order the forward pass runs them."""
    modules = [qat.get_submodule(n.target) for n in qat.graph.nodes if n.op == "call_module"]
    return [m for m in modules if isinstance(m, ActivationFakeQuantize)]


def test_prepare_folds_bn_and_quantizes_like_the_compiler_on_avx2():
    net = _net()
    calibration = _batches(2)
    qat = prepare_qat(net, calibration[0], target="avx2", calibration=calibration)
    assert not _fake_quants(qat, nn.BatchNorm2d)
    # 7-bit GEMM weights without VNNI; the depthwise conv keeps 8 bits; the Linear 7.
    assert [fq.qmax for fq in _fake_quants(qat, WeightFakeQuantize)] == [63, 127, 63]
    # The input, each conv unit's ReLU; MaxPool and Flatten keep the second ReLU's grid.
    activations = _activation_fake_quants(qat)
    assert len(activations) == 3
    first = torch.cat(calibration)
    assert activations[0].params() == QuantParams.from_range(
        float(first.min()), float(first.max()), np.uint8
    )
    # The fake-quantized weight is the compiler's per-channel quantization of the folded one.
    conv = qat.get_submodule("0")
    q, scale = quantize_weight(conv.weight.detach().numpy(), 0, 63)
    np.testing.assert_allclose(
        conv.weight_fake_quant(conv.weight).detach().numpy(),
        q * scale[:, None, None, None],
        rtol=1e-6,
    )
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # input untouched


def test_target_and_weight_bits_decide_the_ranges():
    examples = _batches(1)[0]
    vnni = prepare_qat(_net(), examples, target="vnni")
    assert [fq.qmax for fq in _fake_quants(vnni, WeightFakeQuantize)] == [127, 127, 127]
    four = prepare_qat(_net(), examples, target="vnni", weight_bits=4)
    assert [fq.qmax for fq in _fake_quants(four, WeightFakeQuantize)] == [7, 7, 7]
    cuda = prepare_qat(_net(), examples, target="cuda")
    assert all(fq.params().zero_point == 0 for fq in _activation_fake_quants(cuda))


def test_diff_loss_measures_quantization_and_trains():
    examples = _batches(1)[0]
    net = _net()
    qat = prepare_qat(net, examples, target="avx2", weight_bits=3)
    loss = diff_loss(qat, examples, net)
    loss.backward()
    assert qat.get_submodule("0").weight.grad is not None
    with fake_quant_disabled(qat):  # folded BN in float: the same function as the reference
        assert diff_loss(qat, examples, net).item() < 1e-3 * loss.item()
    labels = torch.zeros(8, dtype=torch.long)
    assert qat_loss(1.0, net)(qat, examples, labels) > qat_loss(0.0)(qat, examples, labels)
    with pytest.raises(InputError, match="reference"):
        qat_loss(1.0)


def _train_steps(model: nn.Module, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.rand(8, 1, 8, 8, generator=generator)
        y = torch.randint(0, 5, (8,), generator=generator)
        optimizer.zero_grad()
        qat_loss(0.0)(model, x, y).backward()
        optimizer.step()


def _scales(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    """Scales of the activation QuantizeLinear and of the weight DequantizeLinear nodes."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value"
    }
    values = {**consts, **inits}
    found: dict[str, list[np.ndarray]] = {"activation": [], "weight": []}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.input[1] not in values:
            continue
        scale = values[n.input[1]]
        if n.op_type == "QuantizeLinear" and scale.size == 1:
            found["activation"].append(scale.astype(np.float32))
        elif n.op_type == "DequantizeLinear" and scale.size > 1:
            source = values.get(n.input[0])
            if source is None or source.dtype != np.int32:  # int32: a bias
                found["weight"].append(scale.astype(np.float32))
    return found


def test_exported_model_compiles_with_its_scales_and_matches_torch_int8(tmp_path):
    calibration = _batches(2)
    qat = prepare_qat(_net(), calibration[0], target="avx2", calibration=calibration)
    _train_steps(qat, 5)
    qat.eval()
    exported = export_qat(qat, tmp_path / "qat.onnx", (1, 1, 8, 8))
    x = torch.cat(_batches(4, seed=5))
    np.savez(tmp_path / "calib.npz", input=x.numpy())
    compiled = tmp_path / "int8.onnx"
    config = CompileConfig(
        calibration=str(tmp_path / "calib.npz"), target="avx2", check_latency=False
    )
    report = compile_model(exported, compiled, config).to_dict()
    assert not report["not_quantized"]

    before, after = _scales(onnx.load(exported)), _scales(onnx.load(compiled))
    # Every exported activation scale is used as is, and no other one is added (MaxPool
    # and Flatten reuse their input's): nothing is quantized twice.
    assert {float(s) for s in after["activation"]} == {float(s) for s in before["activation"]}
    assert sorted(map(bytes, after["weight"])) == sorted(map(bytes, before["weight"]))

    with torch.no_grad():
        expected = qat(x).numpy()
    got = ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )[0]
    # Tolerance: one quantization step of the Linear's input (the last fake quantizer)
    # times the largest L1 norm of a quantized Linear row: what one rounding difference
    # in every input element (ORT's requantization rounds in its own order) can move a
    # logit. In practice the two agree far more closely.
    fc = qat.get_submodule("7")
    row_l1 = fc.weight_fake_quant(fc.weight).detach().abs().sum(dim=1).max().item()
    step = _activation_fake_quants(qat)[-1].params().scale
    assert np.abs(got - expected).max() <= step * row_l1
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.95


def test_export_writes_nothing_for_a_model_without_fake_quantization(tmp_path):
    with pytest.raises(InputError, match="prepare_qat"):
        export_qat(_net(), tmp_path / "m.onnx", (1, 1, 8, 8))
    assert not list(tmp_path.iterdir())


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(InputError, match="cannot trace"):
        prepare_qat(Branchy(), torch.zeros(1, 2))


def test_calibrated_untrained_export_compiles_like_the_fp32_model(tmp_path):
    """Without training, prepare_qat + export_qat is onnxq compile's own post-training int8.

    Same activation scales, same weight scales, and outputs within one rounding of the
    Linear's input (BN folded by Torch and by onnxq may differ in the last float bit).
    """
    from onnxq.export import export_torch

    net = _net()
    calibration = _batches(4, seed=7)
    np.savez(tmp_path / "calib.npz", input=torch.cat(calibration).numpy())
    config = CompileConfig(
        calibration=str(tmp_path / "calib.npz"), target="avx2", check_latency=False
    )
    export_torch(net, (1, 1, 8, 8), tmp_path / "fp32.onnx", exporter="torchscript")
    compile_model(tmp_path / "fp32.onnx", tmp_path / "ptq.onnx", config)
    qat = prepare_qat(net, calibration[0], target="avx2", calibration=calibration).eval()
    export_qat(qat, tmp_path / "qat.onnx", (1, 1, 8, 8))
    compile_model(tmp_path / "qat.onnx", tmp_path / "qat_int8.onnx", config)

    ptq, ours = (
        _scales(onnx.load(tmp_path / "ptq.onnx")),
        _scales(onnx.load(tmp_path / "qat_int8.onnx")),
    )
    np.testing.assert_allclose(
        sorted(float(s) for s in ours["activation"]),
        sorted(float(s) for s in ptq["activation"]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.sort(np.concatenate(ours["weight"])), np.sort(np.concatenate(ptq["weight"])), rtol=1e-5
    )
    x = torch.cat(_batches(2, seed=8)).numpy()

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})[0]

    fc = qat.get_submodule("7")
    row_l1 = fc.weight_fake_quant(fc.weight).detach().abs().sum(dim=1).max().item()
    step = _activation_fake_quants(qat)[-1].params().scale
    assert np.abs(run(tmp_path / "qat_int8.onnx") - run(tmp_path / "ptq.onnx")).max() <= (
        step * row_l1
    )
