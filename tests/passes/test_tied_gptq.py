"""Tests for passes/tied_gptq.py: a tied head/embedding rounded for both its readers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_builders import build_model, seeded
from ort_helpers import ort_outputs, to_ir
from test_weight_only import OUTLIER_NET, _id_samples, _low_rank_tied_lm, _quantize_with_data

import onnxq.passes.tied_gptq as tied_gptq
import onnxq.passes.weight_only as weight_only
from onnxq.passes.awq import quantizer
from onnxq.passes.gptq import gptq_pack
from onnxq.passes.tied_gptq import TiedSensitivity, measure_tied_sensitivity, tied_gptq_pack
from onnxq.passes.weight_only import QuantizeWeightsNBitsPass


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _held_out_kl_and_agreement(proto, model, count: int = 32) -> tuple[float, float]:
    """Mean KL(fp32 || model) of the next-token distributions and top-1 agreement."""
    held_out = _id_samples(count, 13)
    kls, agree = [], []
    for i in range(count):
        feeds = {name: array[i] for name, array in held_out.items()}
        expected = _log_softmax(ort_outputs(proto, feeds)["logits"][0])
        got = _log_softmax(ort_outputs(model, feeds)["logits"][0])
        kls.append(float((np.exp(expected) * (expected - got)).sum(-1).mean()))
        agree.append(float((expected.argmax(-1) == got.argmax(-1)).mean()))
    return float(np.mean(kls)), float(np.mean(agree))


def test_lookup_aware_codes_keep_the_next_token_distribution_closer(tmp_path):
    # The tied LM (embedding -> MatMul, Relu -> tied head): rounding for the head alone
    # moves error into what the lookups read. Held-out ids, on ONNX Runtime.
    proto = _low_rank_tied_lm()
    samples = {name: array[:, 0] for name, array in _id_samples(64, 12).items()}
    kwargs = {"bits": 4, "block_size": 32, "end_to_end": False}
    aware, result = _quantize_with_data(proto, tmp_path, samples, **kwargs)
    head_only, _ = _quantize_with_data(proto, tmp_path, samples, lookup_aware=False, **kwargs)
    assert result.details["activation_aware"]["head"]["method"] == "gptq"
    assert result.details["tied"] == {"emb": ["head_Q4", "embed_Q4"]}
    kl, agreement = _held_out_kl_and_agreement(proto, aware)
    kl_head_only, agreement_head_only = _held_out_kl_and_agreement(proto, head_only)
    # Measured: KL 0.24 vs 0.47 nats, agreement 80.5% vs 70.3% (256 held-out tokens).
    assert kl < 0.75 * kl_head_only
    assert agreement > agreement_head_only


def test_measure_reads_the_head_input_the_lookups_and_a_symmetric_sensitivity():
    proto = _low_rank_tied_lm()
    model = to_ir(proto)
    samples = _id_samples(6, 12)
    feeds = [{name: array[i] for name, array in samples.items()} for i in range(6)]
    nodes = {n.name: n for n in model.graph}
    measured = measure_tied_sensitivity(model, nodes["head"], [nodes["embed"]], feeds)
    assert measured is not None
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    ids = samples["ids"].reshape(-1)
    r = np.maximum(init["emb"][ids] @ init["w1"], 0)  # the head's input
    np.testing.assert_allclose(measured.x, r, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(measured.counts, np.bincount(ids, minlength=512))
    assert measured.weights.shape == (len(ids), 512)
    g = measured.lookup
    np.testing.assert_allclose(g, g.T)
    eig = np.linalg.eigvalsh(g)
    assert eig.max() > 0 and eig.min() > -1e-6 * eig.max()  # a Fisher form: PSD
    assert {n.name for n in model.graph} == set(nodes)  # the model itself is untouched


def test_uniform_weights_and_no_lookups_give_plain_gptq():
    # With every row's Fisher weight 1 and no lookup, each row's Hessian is X^T X: the
    # objective is GPTQ's and the codes must be its codes.
    x = seeded(1)(300, 64).astype(np.float64)
    w = seeded(2)(64, 96, scale=0.1)
    quant = quantizer(4, 32, False)
    plain = TiedSensitivity(x, np.ones((300, 96), np.float32), np.zeros((64, 64)), np.zeros(96))
    got = tied_gptq_pack(w, quant, plain)
    want = gptq_pack(x, w, quant)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_not_measured_without_a_tied_weight_or_beyond_the_width(tmp_path, monkeypatch):
    calls = []
    real = tied_gptq.measure_tied_sensitivity

    def counting(*args, **kwargs):
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(weight_only, "measure_tied_sensitivity", counting)
    proto = build_model(OUTLIER_NET, {"w": seeded(5)(128, 64, scale=0.1)})
    x = seeded(6)(16, 16, 128)
    _quantize_with_data(proto, tmp_path, {"x": x}, bits=4, block_size=32)
    assert calls == []  # no embedding: nothing to measure
    # A head wider than MAX_K: measured as None, so plain GPTQ for the head.
    monkeypatch.setattr(tied_gptq, "MAX_K", 128)
    model = to_ir(_low_rank_tied_lm())
    nodes = {n.name: n for n in model.graph}
    feeds = [{name: array[0] for name, array in _id_samples(1, 12).items()}]
    assert real(model, nodes["head"], [nodes["embed"]], feeds) is None


@pytest.mark.parametrize("lookup_aware", [True, False])
def test_the_pass_measures_only_when_asked(tmp_path, monkeypatch, lookup_aware):
    calls = []
    real = tied_gptq.measure_tied_sensitivity
    monkeypatch.setattr(
        weight_only,
        "measure_tied_sensitivity",
        lambda *a, **k: calls.append(a[1].name) or real(*a, **k),
    )
    samples = {name: array[:, 0] for name, array in _id_samples(64, 12).items()}
    _quantize_with_data(
        _low_rank_tied_lm(), tmp_path, samples, bits=4, block_size=32, lookup_aware=lookup_aware
    )
    assert calls == (["head"] if lookup_aware else [])
    assert QuantizeWeightsNBitsPass().lookup_aware  # on by default


def test_measured_positions_stop_at_max_tokens_and_shrink_with_the_vocabulary(monkeypatch):
    model = to_ir(_low_rank_tied_lm())
    nodes = {n.name: n for n in model.graph}
    samples = _id_samples(6, 12)  # 6 runs of 8 positions
    feeds = [{name: array[i] for name, array in samples.items()} for i in range(6)]
    measured = measure_tied_sensitivity(
        model, nodes["head"], [nodes["embed"]], feeds, max_tokens=16
    )
    assert measured is not None and measured.x.shape == (16, 256)
    assert measured.counts.sum() == 16  # the lookups of the runs measured, no more
    # A vocabulary of 512 and room for 8 x 512 logits: one run of 8 positions.
    monkeypatch.setattr(tied_gptq, "MAX_LOGITS", 8 * 512)
    measured = measure_tied_sensitivity(model, nodes["head"], [nodes["embed"]], feeds)
    assert measured is not None and measured.x.shape == (8, 256)
