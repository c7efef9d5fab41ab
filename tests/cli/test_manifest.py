"""The fleet manifest: an entry switches off what ``defaults.gate`` sets, with ``false``."""

from __future__ import annotations

import pytest
from fleet_fixtures import write_fleet

from onnxq.cli._manifest import read_manifest
from onnxq.errors import InputError

# Every model starts from this gate; the entries below change it for model a only.
_DEFAULT_GATE = """
[defaults.gate]
min-sqnr = 25
max-latency-ms = 50
per-layer = true
"""


def _fleet(tmp_path, gate_a: str):
    """The fixture fleet with ``_DEFAULT_GATE``; a's gate table is ``gate_a``, b's empty."""
    manifest = write_fleet(tmp_path, gate="")
    text = manifest.read_text().replace("check-samples = 8", "check-samples = 8" + _DEFAULT_GATE)
    first = text.index("[models.gate]")
    text = text[:first] + text[first:].replace("[models.gate]", gate_a, 1)
    manifest.write_text(text)
    return {m.name: m for m in read_manifest(manifest).models}


def test_entries_without_a_gate_of_their_own_take_the_default_gate(tmp_path):
    models = _fleet(tmp_path, "[models.gate]")
    for name in "abc":
        gate = models[name].gate
        assert gate is not None and gate.per_layer is True
        assert (gate.thresholds.min_sqnr, gate.thresholds.max_latency_ms) == (25, 50)


def test_gate_false_gates_that_model_not_at_all(tmp_path):
    models = _fleet(tmp_path, "gate = false")
    assert models["a"].gate is None
    assert models["b"].gate is not None and models["b"].gate.thresholds.min_sqnr == 25


def test_a_gate_key_set_to_false_drops_the_default_value(tmp_path):
    models = _fleet(tmp_path, "[models.gate]\nmin-sqnr = false")
    a, b = models["a"].gate, models["b"].gate
    assert a.thresholds.min_sqnr is None and a.thresholds.max_latency_ms == 50
    assert b.thresholds.min_sqnr == 25  # only a's entry dropped it
    # A flag's false is its value, not an unset.
    (tmp_path / "flag").mkdir()
    models = _fleet(tmp_path / "flag", "[models.gate]\nper-layer = false")
    assert models["a"].gate.per_layer is False and models["a"].gate.thresholds.min_sqnr == 25


def test_dropping_every_threshold_asks_for_gate_false(tmp_path):
    with pytest.raises(
        InputError, match=r"models\[0\] \('a'\): the gate sets no threshold.*gate = false"
    ):
        _fleet(tmp_path, "[models.gate]\nmin-sqnr = false\nmax-latency-ms = false")


def test_gate_true_is_not_a_gate(tmp_path):
    with pytest.raises(InputError, match=r"'gate' must be a table, or false for no gate"):
        _fleet(tmp_path, "gate = true")
