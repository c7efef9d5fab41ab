"""Hardware-aware rounding of kept channel counts to ONNX Runtime's convolution channel block.

ONNX Runtime's CPU convolutions run in the NCHWc layout: channels in blocks of ``B``
(MLAS ``NchwcBlockSize``: 16 with AVX-512F, 8 on other x86-64 CPUs; ARM builds only with
NCHWc NEON kernels). Measured on ONNX Runtime 1.32's optimised graphs: a Conv's output
channels are padded up to a multiple of ``B`` (11 channels compute as 16, 24 as 32);
a consumer with fewer than ``B`` input channels reads the plain NCHW tensor, one with more
pads them to a multiple of ``B`` when the count is a multiple of 4 and otherwise leaves
NCHWc altogether (22 channels: the plain, slower Conv). Removing channels therefore pays
in steps of ``B``; counts between the steps cost as much as the next multiple, or more.

The block is not assumed from CPU flags: `channel_block` asks the installed ONNX Runtime
(it optimises a one-channel Conv and reads how far the filter was padded); the flags are
the fallback when that probe cannot run. Pruning keeps a multiple of the block in layers
wider than one block (`kept_channels`), as torch-pruning's ``round_to`` and NNCF's
hardware-aware pruning do; a layer of at most one block stays exact, since rounding could
only keep it whole.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import InputError
from onnxq.numerics import describe_cpu

__all__ = ["AUTO", "channel_block", "kept_channels", "resolve_round_to"]

logger = logging.getLogger(__name__)

AUTO = "auto"
_NCHWC_DOMAIN = "com.microsoft.nchwc"


def kept_channels(size: int, sparsity: float, round_to: int) -> int:
    """Channels a layer of ``size`` output channels keeps at ``sparsity``.

    The requested count is ``(1 - sparsity) * size``. With ``round_to > 1`` and a layer
    wider than ``round_to``, the kept count is the multiple of ``round_to`` (or ``size``
    itself, the layer left whole) nearest the requested count, so the layer's sparsity is
    the closest to the requested one its hardware rewards; ties keep more channels, and
    at least one block is kept (never zero). Otherwise the requested count rounded to the
    nearest integer, at least 1.

    Args:
        size: Output channels of the layer (or residual group).
        sparsity: Requested share of channels to remove, in [0, 1).
        round_to: Channel block (1: exact counts).

    Returns:
        The number of channels kept, in ``[1, size]``.
    """
    target = size * (1 - sparsity)
    if round_to > 1 and size > round_to and sparsity > 0:
        candidates = [*range(round_to, size + 1, round_to), size]
        # Nearest to the requested count; on a tie, the larger (less accuracy lost).
        return min(candidates, key=lambda c: (abs(c - target), -c))
    return min(size, max(1, round(target)))


def resolve_round_to(round_to: int | str) -> tuple[int, str]:
    """The channel multiple for a ``round_to`` setting, and why.

    Args:
        round_to: ``"auto"`` (this machine's ONNX Runtime channel block, `channel_block`)
            or a positive integer (1: exact counts).

    Raises:
        InputError: Neither ``auto`` nor a positive integer.
    """
    if isinstance(round_to, str) and round_to.strip().lower() == AUTO:
        return channel_block()
    try:
        value = int(round_to)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or str(value) != str(round_to).strip():
        raise InputError(f"round_to must be 'auto' or a positive integer, got '{round_to}'")
    if value == 1:
        return 1, "exact counts requested (round_to=1)"
    return value, f"round_to={value} given"


@functools.cache
def channel_block() -> tuple[int, str]:
    """ONNX Runtime's NCHWc convolution channel block on this machine, and how it was found.

    Cached: the probe builds one ONNX Runtime session (a few milliseconds).

    Returns:
        ``(block, reason)``; block 1 when ONNX Runtime uses no NCHWc convolutions here.
    """
    cpu = describe_cpu()["model"]
    try:
        block = _probe_block()
    except Exception as e:  # any failure of the probe (no session, no file): use the flags
        block, reason = _block_from_flags()
        logger.warning("ONNX Runtime's channel block probe failed (%s); %s", e, reason)
        return block, reason
    if block == 1:
        return 1, f"ONNX Runtime {ort.__version__} uses no NCHWc convolutions on {cpu}"
    return block, (
        f"ONNX Runtime {ort.__version__} pads convolution channels to blocks of {block} "
        f"on {cpu} (NCHWc; measured on a probe Conv)"
    )


def _probe_block() -> int:
    """Optimises a 1-in, 1-out Conv with ONNX Runtime and reads its padded filter's rows."""
    weight = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory(prefix="onnxq-nchwc-probe-") as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # the "hardware-specific model" warning is the point
        options.intra_op_num_threads = 1
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    filters = {i.name: tuple(i.dims) for i in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.domain == _NCHWC_DOMAIN and node.op_type == "Conv":
            return int(filters[node.input[1]][0])
    return 1


def _block_from_flags() -> tuple[int, str]:
    """The block MLAS picks for this CPU (``platform.cpp``), from the CPU flags alone."""
    info = describe_cpu()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        if "avx512f" in info["isa"]:
            return 16, f"{info['model']} has AVX-512F: MLAS NCHWc block 16 (from CPU flags)"
        return 8, f"{info['model']} is x86-64 without AVX-512F: MLAS NCHWc block 8 (CPU flags)"
    return 1, f"no NCHWc block assumed on {machine} (CPU flags): exact counts"
