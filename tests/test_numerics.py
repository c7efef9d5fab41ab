"""Tests for onnxq/numerics.py: target detection and the integer ranges chosen for it."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq import numerics


@pytest.mark.parametrize(
    ("machine", "flags", "target"),
    [
        ("x86_64", {"avx", "avx2"}, "avx2"),
        ("x86_64", {"avx2", "avx512f", "avx512bw"}, "avx512"),
        ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, "vnni"),
        ("x86_64", {"avx2", "avx_vnni"}, "vnni"),
        ("aarch64", {"asimd"}, "arm"),
    ],
)
def test_detect_target_reads_the_instruction_set(monkeypatch, machine, flags, target):
    monkeypatch.setattr(numerics.platform, "machine", lambda: machine)
    monkeypatch.setattr(numerics, "_cpu_flags", lambda: flags)
    detected, reason = numerics.detect_target()
    assert detected == target
    assert reason


@pytest.mark.parametrize(
    ("target", "weight_qmax", "activations"),
    [
        ("avx2", 63, np.uint8),
        ("avx512", 63, np.uint8),
        ("vnni", 127, np.uint8),
        ("arm", 127, np.uint8),
        ("cuda", 127, np.int8),
    ],
)
def test_numerics_per_target(target, weight_qmax, activations):
    chosen = numerics.numerics_for(target)
    assert chosen.weight_qmax == weight_qmax
    assert chosen.depthwise_weight_qmax == 127  # 32-bit accumulation everywhere
    assert chosen.activation_dtype == activations
    assert chosen.describe()["reason"] == "given with --target"


def test_reduced_range_cannot_saturate_16_bit_pairs():
    """The reason for 7-bit weights: u8 * s8 pairs summed in int16 must not overflow."""
    chosen = numerics.numerics_for("avx2")
    assert 255 * 2 * chosen.weight_qmax <= np.iinfo(np.int16).max
    assert 255 * 2 * 127 > np.iinfo(np.int16).max  # full range could saturate


def test_auto_matches_this_machine():
    assert numerics.numerics_for("auto").target == numerics.detect_target()[0]


def test_describe_cpu_names_the_model_and_int8_relevant_flags(monkeypatch):
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(numerics, "_cpu_flags", lambda: {"sse2", "avx2", "avx512_vnni", "fma"})
    monkeypatch.setattr(numerics, "_cpu_model", lambda: "Some Xeon")
    cpu = numerics.describe_cpu()
    assert cpu["model"] == "Some Xeon"
    assert cpu["isa"] == ["avx2", "fma", "avx512_vnni"]
    assert cpu["target"] == "vnni"
