"""Hardware-aware rounding of kept channels: the rule, the setting, the measured block."""

from __future__ import annotations

import platform

import pytest

from onnxq.errors import InputError
from onnxq.passes.prune import rounding
from onnxq.passes.prune.rounding import channel_block, kept_channels, resolve_round_to


@pytest.mark.parametrize(
    ("size", "sparsity", "block", "kept"),
    [
        (32, 0.3, 16, 16),  # 22.4 requested: 16 is 6.4 away, 32 is 9.6
        (64, 0.3, 16, 48),  # 44.8: 48 (3.2 away) beats 32
        (24, 0.3, 16, 16),  # wider than one block: 16.8 -> 16 (24 would prune nothing)
        (40, 0.05, 16, 40),  # 38: the layer left whole (2 away) beats 32
        (32, 0.25, 16, 32),  # 24 is as far from 16 as from 32: the tie keeps more
        (64, 0.99, 16, 16),  # never zero: at least one block
        (32, 0.3, 8, 24),  # the AVX2 block
    ],
)
def test_wide_layers_keep_the_nearest_multiple_of_the_block(size, sparsity, block, kept):
    assert kept_channels(size, sparsity, block) == kept


@pytest.mark.parametrize(
    ("size", "sparsity", "block", "kept"),
    [
        (16, 0.3, 16, 11),  # one block wide: rounding could only keep it whole
        (8, 0.3, 16, 6),  # narrower than a block
        (32, 0.3, 1, 22),  # exact counts
        (32, 0.0, 16, 32),  # nothing requested, nothing removed
        (3, 0.9, 1, 1),  # never zero
    ],
)
def test_narrow_layers_and_exact_requests_keep_the_plain_fraction(size, sparsity, block, kept):
    assert kept_channels(size, sparsity, block) == kept


def test_the_rounded_count_is_the_multiple_nearest_the_request():
    for block in (8, 16):
        for size in range(block + 1, 5 * block):
            for step in range(1, 20):
                sparsity = step / 20
                kept = kept_channels(size, sparsity, block)
                candidates = [*range(block, size + 1, block), size]
                assert kept in candidates
                target = size * (1 - sparsity)
                assert abs(kept - target) == min(abs(c - target) for c in candidates)


def test_round_to_settings():
    assert resolve_round_to("auto") == channel_block()
    assert resolve_round_to(1)[0] == 1 and "exact" in resolve_round_to(1)[1]
    assert resolve_round_to("8") == (8, "round_to=8 given")
    for bad in (0, -16, "2.5", "x", ""):
        with pytest.raises(InputError, match="round_to must be 'auto' or a positive integer"):
            resolve_round_to(bad)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="MLAS blocks known for x86"
)
def test_measured_block_agrees_with_the_cpu_flags():
    # The probe reads ONNX Runtime's padded filter; MLAS picks 16 with AVX-512F, else 8.
    assert rounding._probe_block() == rounding._block_from_flags()[0]
    block, reason = channel_block()
    assert block in (8, 16) and f"blocks of {block}" in reason


def test_a_failed_probe_falls_back_to_the_cpu_flags(monkeypatch):
    def broken() -> int:
        raise RuntimeError("no session")

    monkeypatch.setattr(rounding, "_probe_block", broken)
    channel_block.cache_clear()
    try:
        assert channel_block() == rounding._block_from_flags()
    finally:
        channel_block.cache_clear()
