"""The ``--prune`` request grammar: parsing and the passes a request names."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.errors import InputError
from onnxq.passes.prune import ApplyMasksPass, PruneChannelsPass
from onnxq.prune_spec import PruneSpec


@pytest.mark.parametrize(
    ("text", "kind", "sparsity", "scope"),
    [
        ("unstructured:0.5", "unstructured", 0.5, "layer"),
        ("unstructured:0.5:global", "unstructured", 0.5, "global"),
        ("channels:0.3", "channels", 0.3, "l1"),
        ("channels:0:l2", "channels", 0.0, "l2"),
        ("channels:0.3:l2:compensate", "channels", 0.3, "l2"),
        ("2:4", "2:4", 0.5, ""),
    ],
)
def test_spec_parses(text, kind, sparsity, scope):
    spec = PruneSpec.parse(text, exclude=["fc"])
    assert (spec.kind, spec.sparsity, spec.scope, spec.exclude) == (kind, sparsity, scope, ("fc",))
    assert spec.compensate == text.endswith(":compensate")


@pytest.mark.parametrize(
    "text", ["channels:0.3:l3", "channels:0.3:l1:l2", "unstructured:0.5:compensate"]
)
def test_spec_rejects_bad_options(text):
    with pytest.raises(InputError, match=r"bad .* options"):
        PruneSpec.parse(text)


@pytest.mark.parametrize("text", ["channels:1", "channels:-0.1", "unstructured:abc"])
def test_spec_rejects_bad_sparsity(text):
    with pytest.raises(InputError, match=r"sparsity must be in \[0, 1\)"):
        PruneSpec.parse(text)


def test_spec_rejects_unknown_kind():
    with pytest.raises(InputError, match=r"unknown prune kind 'rows:0.3'.*channels:S.*2:4"):
        PruneSpec.parse("rows:0.3")


def test_spec_mask_file_must_exist(tmp_path):
    with pytest.raises(InputError, match="cannot read prune masks"):
        PruneSpec.parse(f"mask:{tmp_path / 'none.npz'}").passes()


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("channels:0.3", ["PruneChannelsPass", "RemoveUnusedNodesPass"]),
        ("unstructured:0.5:global", ["PruneWeightsPass"]),
        ("2:4", ["PruneWeightsPass"]),
    ],
)
def test_spec_names_its_passes(text, kinds):
    passes = PruneSpec.parse(text, exclude=["fc"]).passes()
    assert [type(p).__name__ for p in passes] == kinds
    assert passes[0].exclude == ("fc",)


def test_spec_compensates_only_when_asked():
    data = object()  # only handed on: the pass reads it when it runs
    plain, compensating = (
        PruneSpec.parse(text).passes(data)[0]
        for text in ("channels:0.3", "channels:0.3:compensate")
    )
    assert isinstance(plain, PruneChannelsPass) and plain.calibration is None
    assert compensating.calibration is data


def test_spec_mask_file_becomes_apply_masks(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, w1=np.ones((2, 2), np.float32))
    (pass_,) = PruneSpec.parse(f"mask:{path}").passes()
    assert isinstance(pass_, ApplyMasksPass) and list(pass_.masks) == ["w1"]


@pytest.mark.parametrize(
    ("text", "round_to"),
    [
        ("channels:0.3", "auto"),
        ("channels:0.3:exact", 1),
        ("channels:0.3:l2:round=8", 8),
        ("channels:0.3:compensate:round=16", 16),
    ],
)
def test_spec_rounding_options_reach_the_pass(text, round_to):
    from onnxq.passes.prune.rounding import channel_block

    spec = PruneSpec.parse(text)
    assert spec.round_to == round_to
    expected = channel_block()[0] if round_to == "auto" else round_to
    assert spec.passes()[0].round_to == expected


@pytest.mark.parametrize(
    "text", ["channels:0.3:exact:round=8", "unstructured:0.5:exact", "unstructured:0.5:round=8"]
)
def test_spec_rejects_conflicting_or_misplaced_rounding(text):
    with pytest.raises(InputError, match=r"bad .* options"):
        PruneSpec.parse(text)


@pytest.mark.parametrize("text", ["channels:0.3:round=0", "channels:0.3:round=x"])
def test_spec_rejects_a_bad_round_to(text):
    with pytest.raises(InputError, match="round_to must be 'auto' or a positive integer"):
        PruneSpec.parse(text)
