"""Integer numerics chosen for the deployment target's int8 kernels.

ONNX Runtime's x86 int8 GEMM without VNNI multiplies u8 activations by s8 weights with
``vpmaddubsw``, which adds each pair of products in a saturating 16-bit lane:
``255 * (|w1| + |w2|)`` overflows 32767 once two adjacent weights exceed 64 in
magnitude. Weights are therefore kept to 7 bits (``[-64, 63]``, "reduced range") for the
GEMM-based kernels on such CPUs. Depthwise convolutions use a direct kernel that
accumulates in 32 bits and keep the full 8-bit range, hence the per-layer decision. With
VNNI (``vpdpbusd`` accumulates in 32 bits), on ARM and on GPUs, full range is safe.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from pathlib import Path

import numpy as np

__all__ = ["Numerics", "describe_cpu", "detect_target", "numerics_for"]

logger = logging.getLogger(__name__)

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")
# Instruction-set flags that decide int8 and fp32 kernel speed, reported with latencies.
_ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vnni",
    "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile",
    "asimd", "asimddp", "i8mm", "sve",
)  # fmt: skip


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part"):
            return value.strip()
    return platform.processor() or platform.machine()


def describe_cpu() -> dict[str, object]:
    """This machine's CPU for reports: model name, the int8-relevant ISA flags, target.

    Latency decisions are made on the compiling machine and hold for CPUs like it.
    """
    flags = _cpu_flags()
    return {
        "model": _cpu_model(),
        "machine": platform.machine(),
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "target": detect_target()[0],
        "logical_cpus": os.cpu_count(),
    }


def detect_target() -> tuple[str, str]:
    """Detects this machine's int8 target and says why.

    Returns:
        ``(target, reason)`` where target is ``vnni``, ``avx512``, ``avx2`` or ``arm``.
    """
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return "arm", f"machine is {machine}"
    flags = _cpu_flags()
    vnni = sorted(f for f in flags if f in _VNNI_FLAGS)
    if vnni:
        return "vnni", f"CPU has {', '.join(vnni)}"
    if "avx512bw" in flags:
        return "avx512", "CPU has avx512bw but no VNNI"
    return "avx2", "CPU has no VNNI instructions (avx512_vnni/avx_vnni/amx)"


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Integer types and ranges used for one target.

    Attributes:
        target: The resolved target name.
        reason: Why this target (detected flags, or given by the user).
        activation_dtype: ``uint8`` (asymmetric) or ``int8`` (symmetric) activations.
        weight_qmax: Largest weight magnitude for GEMM-based kernels (127, or 63 when
            16-bit saturation is possible).
        depthwise_weight_qmax: Largest weight magnitude for depthwise convolutions.
        note: What the user should know about int8 on this target.
    """

    target: str
    reason: str
    activation_dtype: type = np.uint8
    weight_qmax: int = 127
    depthwise_weight_qmax: int = 127
    note: str = ""

    @property
    def reduced_range(self) -> bool:
        """Whether GEMM-based weights use 7 bits."""
        return self.weight_qmax < 127

    def describe(self) -> dict[str, object]:
        """Returns the choice and its reason as JSON-ready values."""
        return {
            "target": self.target,
            "reason": self.reason,
            "activations": np.dtype(self.activation_dtype).name,
            "weights": "int8 per-channel symmetric",
            "weight_range": f"[-{self.weight_qmax}, {self.weight_qmax}]",
            "depthwise_weight_range": f"[-{self.depthwise_weight_qmax}, "
            f"{self.depthwise_weight_qmax}]",
            "why": _WHY[self.reduced_range],
            "note": self.note,
        }


_WHY = {
    True: "u8s8 GEMM kernels without VNNI add product pairs in saturating 16-bit "
    "lanes; 7-bit weights cannot saturate. Depthwise convs (32-bit accumulation) keep 8 bits.",
    False: "this target accumulates int8 products in 32 bits: full-range weights are exact",
}


_CUDA_NOTE = (
    "ONNX Runtime's CUDA provider has no int8 Conv/Gemm kernels: it runs the QDQ model's "
    "float kernels plus the Q/DQ nodes, and its int32 bias DequantizeLinear on the CPU "
    "(measured 0.8x of fp32 on an H100, benchmarks/CUDA.md). int8 pays on GPUs through "
    "the TensorRT provider."
)


def numerics_for(target: str = "auto") -> Numerics:
    """Returns the numerics for ``target`` (``auto`` detects this machine)."""
    reason = "given with --target"
    if target == "auto":
        target, reason = detect_target()
    if target in ("avx2", "avx512"):
        numerics = Numerics(target, reason, np.uint8, weight_qmax=63)
    elif target == "cuda":
        # GPU int8 kernels (and TensorRT) expect symmetric int8 activations.
        numerics = Numerics(target, reason, np.int8, note=_CUDA_NOTE)
    else:
        numerics = Numerics(target, reason, np.uint8)
    logger.info("Numerics: %s", numerics.describe())
    return numerics
