"""Quantization-aware training that simulates exactly the int8 numerics ``onnxq compile`` deploys.

``prepare_qat`` traces a float model with ``torch.fx``, folds BatchNorm into the preceding
Conv/Linear (as the compiler's ``FoldBatchNormPass`` does, so training sees the weights that
get quantized), and inserts fake quantization where the compiler's ``InsertQDQPass`` puts
QuantizeLinear/DequantizeLinear:

- weights per output channel, symmetric, ``scale = max|w| / qmax`` with ``qmax`` from
  `onnxq.numerics.numerics_for` (63 for GEMM-based kernels on x86 without VNNI, 127 for
  depthwise convolutions and on VNNI/ARM), recomputed from the current weights each step;
- activations per tensor as the target's ``uint8`` (asymmetric) or ``int8`` (symmetric),
  with `onnxq.passes.qdq.QuantParams.from_range`'s formula on a min/max range initialised
  from calibration batches (the compiler's default ``minmax``) and then followed by an
  exponential moving average while training;
- on every Conv/Linear input (data-movement ops such as MaxPool and Flatten keep their
  input's scale, as ONNX Runtime and the compiler propagate it) and after each Conv unit's
  fused ReLU; never on graph outputs.

Conv2d, Linear, BatchNorm, ReLU and data-movement ops are modelled; any other op runs in
float between fake quantizers (its consumers' inputs are quantized again).

``export_qat`` writes an ONNX model whose QuantizeLinear/DequantizeLinear carry the trained
scales; ``onnxq compile`` keeps them (see ``InsertQDQPass``).

ONNX's QuantizeLinear saturates to the full 8-bit range, so 7-bit weights cannot be
expressed as a QuantizeLinear range: the export stores weights already rounded to their
``[-qmax, qmax]`` grid, which a full-range QuantizeLinear then reproduces exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from onnxq.errors import InputError
from onnxq.numerics import Numerics, numerics_for
from onnxq.passes.qdq import QuantParams

__all__ = [
    "ActivationFakeQuantize",
    "WeightFakeQuantize",
    "diff_loss",
    "export_qat",
    "fake_quant_disabled",
    "prepare_qat",
    "qat_loss",
]

logger = logging.getLogger(__name__)

# Ops that move data without changing values: their output stays on the input's grid
# (the compiler's SHARED_SCALE_OPS), so no second fake quantization follows them.
_SHARED_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)
_SHARED_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    nn.functional.max_pool1d,
    nn.functional.max_pool2d,
    nn.functional.max_pool3d,
    nn.functional.dropout,
}
_SHARED_METHODS = {
    "flatten", "view", "reshape", "squeeze", "unsqueeze", "transpose", "permute", "contiguous",
}  # fmt: skip
_RELU_FUNCTIONS = {torch.relu, nn.functional.relu}


class ActivationFakeQuantize(nn.Module):
    """Per-tensor fake quantization of an activation, as the compiler's QDQ for one tensor.

    The range ``[low, high]`` is observed (not quantized) while calibrating, then followed by
    an exponential moving average in training mode and frozen in eval mode. Scale and zero
    point come from `QuantParams.from_range`, the compiler's own formula.
    """

    def __init__(self, dtype: type = np.uint8, momentum: float = 0.01):
        """Configures the fake quantizer.

        Args:
            dtype: ``np.uint8`` (asymmetric) or ``np.int8`` (symmetric), the target's type.
            momentum: Weight of each training batch's min/max in the moving range.
        """
        super().__init__()
        self.dtype = dtype
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))
        self.calibrating = False
        self.enabled = True

    def extra_repr(self) -> str:
        return f"dtype={np.dtype(self.dtype).name}, range=[{self.low:.4g}, {self.high:.4g}]"

    def params(self) -> QuantParams:
        """The scale and zero point the compiler derives from the current range."""
        if not torch.isfinite(self.low) or not torch.isfinite(self.high):
            raise InputError("fake quantizer has no range: calibrate before training (prepare_qat)")
        return QuantParams.from_range(float(self.low), float(self.high), self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:  # before `enabled`: calibration runs the float model
            with torch.no_grad():
                self.low.copy_(torch.minimum(self.low, x.min()))
                self.high.copy_(torch.maximum(self.high, x.max()))
            return x
        if self.training and self.enabled:
            with torch.no_grad():
                m = self.momentum
                self.low.mul_(1 - m).add_(m * x.min())
                self.high.mul_(1 - m).add_(m * x.max())
        if not self.enabled:
            return x
        qp = self.params()
        info = np.iinfo(self.dtype)
        # Python scalars: the TorchScript exporter turns this into QuantizeLinear/
        # DequantizeLinear with constant scale and zero point.
        return torch.fake_quantize_per_tensor_affine(
            x, qp.scale, qp.zero_point, int(info.min), int(info.max)
        )


class WeightFakeQuantize(nn.Module):
    """Symmetric per-output-channel fake quantization of a weight to ``[-qmax, qmax]``."""

    def __init__(self, qmax: int):
        """Configures the fake quantizer.

        Args:
            qmax: Largest integer magnitude (63 for 7-bit GEMM weights, else 127).
        """
        super().__init__()
        self.qmax = qmax
        self.enabled = True
        # Set by `export_qat`: the rounded weight and its scales. Buffers, so the exporter
        # writes them as initializers behind a QuantizeLinear (constants would be folded).
        self.register_buffer("rounded", None)
        self.register_buffer("frozen_scale", None)

    def extra_repr(self) -> str:
        return f"qmax={self.qmax}, per-channel symmetric"

    def scale(self, weight: Tensor) -> Tensor:
        """Per-channel scales as `onnxq.passes.qdq.quantize_weight` computes them."""
        w = weight.detach()
        amax = w.reshape(w.shape[0], -1).abs().amax(dim=1).float()
        return torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))

    def forward(self, weight: Tensor) -> Tensor:
        if self.rounded is not None:
            zero = torch.zeros(self.frozen_scale.shape, dtype=torch.int32)
            # Already on the [-qmax, qmax] grid: the full int8 range reproduces it exactly,
            # and it is the only signed range ONNX's QuantizeLinear has.
            return torch.fake_quantize_per_channel_affine(
                self.rounded, self.frozen_scale, zero, 0, -128, 127
            )
        if not self.enabled:
            return weight
        scale = self.scale(weight)
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -self.qmax, self.qmax)

    def freeze(self, weight: Tensor) -> None:
        """Fixes the rounded weight and its scales (for export)."""
        with torch.no_grad():
            self.rounded = self.forward(weight).detach().clone()
            self.frozen_scale = self.scale(weight).clone()


class QATConv2d(nn.Conv2d):
    """A Conv2d whose weight is fake-quantized per output channel."""

    weight_fake_quant: WeightFakeQuantize

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)


class QATLinear(nn.Linear):
    """A Linear whose weight is fake-quantized per output channel."""

    weight_fake_quant: WeightFakeQuantize

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight_fake_quant(self.weight), self.bias)


def _qat_copy(module: nn.Module, numerics: Numerics) -> nn.Module:
    """The QAT twin of a Conv2d or Linear, sharing nothing with the original."""
    if isinstance(module, nn.Conv2d):
        qmax = numerics.weight_qmax
        weight_shape = module.weight.shape
        # The compiler's depthwise rule: one input channel per group, a group per output.
        if module.groups > 1 and module.groups == weight_shape[0] and weight_shape[1] == 1:
            qmax = numerics.depthwise_weight_qmax
        twin: nn.Module = copy.deepcopy(module)
        twin.__class__ = QATConv2d
    else:
        qmax = numerics.weight_qmax
        twin = copy.deepcopy(module)
        twin.__class__ = QATLinear
    twin.weight_fake_quant = WeightFakeQuantize(qmax)
    return twin


# ---------------------------------------------------------------------------- graph walk


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_shared(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _SHARED_MODULES)
    if node.op == "call_function":
        return node.target in _SHARED_FUNCTIONS
    return node.op == "call_method" and node.target in _SHARED_METHODS


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fold_batch_norms(gm: fx.GraphModule) -> int:
    """Folds each BatchNorm that alone consumes a Conv2d/Linear into its weights."""
    folded = 0
    for node in list(gm.graph.nodes):
        layer = _module(gm, node)
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            continue
        user = _only_user(node)
        bn = _module(gm, user) if user is not None else None
        if not isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        _set_submodule(gm, node.target, fuse(layer.eval(), bn.eval()))
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        folded += 1
    return folded


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _insert_fake_quant(gm: fx.GraphModule, after: fx.Node, fq: ActivationFakeQuantize) -> fx.Node:
    """Routes every use of ``after`` (but the new node) through a new fake quantizer."""
    name = f"{after.name}_fake_quant"
    gm.add_submodule(name, fq)
    with gm.graph.inserting_after(after):
        node = gm.graph.call_module(name, (after,))
    after.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def _origin(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walks back over data-movement ops to the node whose output they carry."""
    while _is_shared(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_fake_quant(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), ActivationFakeQuantize)


def _place_fake_quant(gm: fx.GraphModule, numerics: Numerics) -> int:
    """Swaps in QAT layers and adds activation fake quantization where the compiler's QDQ goes."""
    outputs = {a for a in gm.graph.find_nodes(op="output")[0].all_input_nodes}
    layers = [n for n in gm.graph.nodes if isinstance(_module(gm, n), nn.Conv2d | nn.Linear)]
    dtype = numerics.activation_dtype
    count = 0
    for node in layers:
        _set_submodule(gm, node.target, _qat_copy(_module(gm, node), numerics))
    # Conv units quantize their output after the fused ReLU (ONNX Runtime folds the ReLU
    # into the QuantizeLinear); Linear outputs only when another layer reads them.
    for node in layers:
        if not isinstance(_module(gm, node), QATConv2d):
            continue
        user = _only_user(node)
        tail = user if user is not None and _is_relu(gm, user) else node
        if tail not in outputs:
            _insert_fake_quant(gm, tail, ActivationFakeQuantize(dtype))
            count += 1
    for node in layers:
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        origin = _origin(gm, source)
        if not _is_fake_quant(gm, origin):
            _insert_fake_quant(gm, origin, ActivationFakeQuantize(dtype))
            count += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    gm.recompile()
    return count


# ---------------------------------------------------------------------------- public API


def _fake_quantizers(model: nn.Module) -> Iterator[ActivationFakeQuantize | WeightFakeQuantize]:
    for module in model.modules():
        if isinstance(module, ActivationFakeQuantize | WeightFakeQuantize):
            yield module


def _as_input(batch: object) -> tuple[Tensor, ...]:
    """The model inputs of a calibration batch: a tensor, or the first item of (x, y)."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return (batch[0],)
    raise InputError(
        f"calibration batches must be tensors or (inputs, labels) pairs, not {type(batch).__name__}"
    )


def prepare_qat(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    target: str = "auto",
    calibration: Iterable[object] | None = None,
    *,
    weight_bits: int | None = None,
) -> fx.GraphModule:
    """Returns a QAT copy of ``model`` that simulates the compiler's int8 numerics on ``target``.

    The copy folds BatchNorm into the preceding Conv2d/Linear (the running statistics are
    frozen, as the compiled model will have them), fake-quantizes every Conv2d/Linear weight
    and activation as the compiler would quantize them, and has its activation ranges
    initialised from ``calibration``. Train it with your own loop; then `export_qat`.
    ``model`` itself is not modified.

    Args:
        model: A float model that ``torch.fx.symbolic_trace`` can trace.
        example_inputs: Inputs the model runs on; also the calibration batch when
            ``calibration`` is None.
        target: The compiler's ``--target`` (``auto`` detects this machine), which decides
            7-bit or 8-bit weights and uint8 or int8 activations.
        calibration: Batches (tensors, or ``(inputs, labels)`` pairs) whose min/max
            initialise the activation ranges, as ``onnxq compile``'s minmax calibration.
        weight_bits: Fewer weight bits than the target's (e.g. 4: integers in [-7, 7],
            still stored and run as int8, which the compiler keeps as exported).

    Returns:
        The QAT model (a ``torch.fx.GraphModule``) in training mode.

    Raises:
        InputError: The model cannot be traced, or has no Conv2d/Linear to quantize.
    """
    numerics = numerics_for(target)
    if weight_bits is not None:
        if not 2 <= weight_bits <= 8:
            raise InputError(f"weight_bits must be between 2 and 8, not {weight_bits}")
        qmax = 2 ** (weight_bits - 1) - 1
        numerics = dataclasses.replace(
            numerics,
            weight_qmax=min(qmax, numerics.weight_qmax),
            depthwise_weight_qmax=min(qmax, numerics.depthwise_weight_qmax),
        )
    examples = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    float_model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(float_model)
    except Exception as e:  # fx raises many types for untraceable code
        raise InputError(f"prepare_qat cannot trace the model with torch.fx: {e}") from e
    folded = _fold_batch_norms(gm)
    inserted = _place_fake_quant(gm, numerics)
    weights = sum(isinstance(m, WeightFakeQuantize) for m in gm.modules())
    if not weights:
        raise InputError("prepare_qat found no Conv2d or Linear layer to quantize")
    batches = [examples] if calibration is None else (_as_input(b) for b in calibration)
    with _calibrating(gm), torch.no_grad():
        for batch in batches:
            gm(*batch)
    logger.info(
        "QAT for target %s: %d BN folded, %d weights (qmax %d), %d activations (%s)",
        numerics.target,
        folded,
        weights,
        numerics.weight_qmax,
        inserted,
        np.dtype(numerics.activation_dtype).name,
    )
    gm.qat_numerics = numerics
    return gm.train()


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    """Observes activation ranges on the float model, as the compiler calibrates."""
    activations = [m for m in _fake_quantizers(model) if isinstance(m, ActivationFakeQuantize)]
    for fq in activations:
        fq.calibrating = True
    was_training = model.training
    model.eval()
    try:
        with fake_quant_disabled(model):
            yield
    finally:
        for fq in activations:
            fq.calibrating = False
        model.train(was_training)


@contextlib.contextmanager
def fake_quant_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Runs ``model`` as its float twin: same weights, no fake quantization, ranges frozen."""
    quantizers = list(_fake_quantizers(model))
    previous = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q, enabled in zip(quantizers, previous, strict=True):
            q.enabled = enabled


def diff_loss(
    model: nn.Module, inputs: Tensor, reference: nn.Module, quantized: Tensor | None = None
) -> Tensor:
    """L_diff: mean squared error between the fake-quantized and the float model's outputs.

    The float model is a fixed target (e.g. the fp32 model `prepare_qat` was given), not
    the QAT model's own weights without fake quantization: that target moves with the
    weights, and shrinking every output satisfies it (measured: digits accuracy collapsed
    to 34-52% at λ = 1).

    Args:
        model: The QAT model.
        inputs: The batch.
        reference: The float model; run in eval mode without gradients.
        quantized: ``model(inputs)`` when already computed (saves a forward pass).

    Returns:
        The scalar loss, to add to the task loss times a weight λ.
    """
    if quantized is None:
        quantized = model(inputs)
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad():
            target = reference(inputs)
    finally:
        reference.train(was_training)
    return nn.functional.mse_loss(quantized, target)


def qat_loss(weight: float = 0.0, reference: nn.Module | None = None):
    """A ``(model, inputs, labels) -> loss``: cross-entropy plus ``weight`` · `diff_loss`.

    Raises:
        InputError: A positive ``weight`` without a ``reference`` float model.
    """
    if weight and reference is None:
        raise InputError("the L_diff term needs the float reference model")

    def loss(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        logits = model(inputs)
        task = nn.functional.cross_entropy(logits, labels)
        if not weight:
            return task
        return task + weight * diff_loss(model, inputs, reference, logits)

    return loss


def export_qat(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    dynamic_batch: bool = True,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
) -> Path:
    """Writes the QAT model as ONNX with QuantizeLinear/DequantizeLinear, atomically.

    The activation scales and zero points are the trained ranges' (frozen); weights are
    stored rounded to their integer grid, so ``onnxq compile`` keeps every scale as is.
    ``model`` itself is not modified.

    Args:
        model: A model returned by `prepare_qat` (and trained).
        path: The ``.onnx`` file to write.
        input_shape: Shape of an example input, batch first.
        dynamic_batch: Make the batch axis symbolic.
        input_names: Graph input names.
        output_names: Graph output names.

    Returns:
        The path written.

    Raises:
        InputError: ``model`` has no fake quantization (not from `prepare_qat`).
    """
    import onnx_ir.passes.common as common_passes

    from onnxq.export import export_torch
    from onnxq.io import check_output_path, load_model, save_model, temp_beside
    from onnxq.passes.cleanup import FoldConstantsPass

    frozen = copy.deepcopy(model).eval()
    layers = [m for m in frozen.modules() if isinstance(m, QATConv2d | QATLinear)]
    if not layers:
        raise InputError("export_qat needs a model returned by prepare_qat")
    for layer in layers:
        layer.weight_fake_quant.freeze(layer.weight)
    path = Path(path)
    check_output_path(None, path)
    with temp_beside(path, folder=True) as tmp:
        raw = Path(tmp) / "qat.onnx"
        # torch.export has no fake-tensor kernel for fake quantization (torch 2.13): the
        # TorchScript exporter is the one that writes QuantizeLinear/DequantizeLinear.
        with warnings.catch_warnings():
            # The frozen ranges are constants on purpose (python scalars in the trace).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            export_torch(
                frozen,
                input_shape,
                raw,
                exporter="torchscript",
                dynamic_batch=dynamic_batch,
                input_names=input_names,
                output_names=output_names,
            )
        onnx_model = load_model(raw, announce=False)
        # The exporter computes each scale and zero point with a Cast of a Constant: fold
        # them, so every QuantizeLinear reads its parameters from initializers.
        FoldConstantsPass()(onnx_model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
            onnx_model
        )
        common_passes.RemoveUnusedNodesPass()(onnx_model)
        save_model(onnx_model, path)
    logger.info("Exported the QAT model to %s", path)
    return path
