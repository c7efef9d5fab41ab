from __future__ import annotations

import pytest
import torch

from onnxq.errors import InputError
from onnxq.models import ZOO, ModelInfo, get_model_info
from onnxq.models.digits import accuracy, load_digits_data, train_digits

# Full 224x224 inputs work too; smaller ones keep the test fast.
_SMALL_SHAPES = {"resnet": (2, 3, 64, 64), "mobilenet": (2, 3, 64, 64)}
_NUM_CLASSES = {"resnet": 1000, "mobilenet": 1000, "bert": 2}


def _example(info: ModelInfo, shape: tuple[int, ...]) -> torch.Tensor:
    if info.input_dtype.is_floating_point:
        return torch.randn(shape, dtype=info.input_dtype)
    return torch.randint(0, 8, shape, dtype=info.input_dtype)


def test_zoo_has_the_expected_models():
    assert set(ZOO) == {"convnet", "digits", "resnet", "mobilenet", "transformer", "lstm", "bert"}
    for name, info in ZOO.items():
        assert info.name == name
        assert info.input_shape[0] == 1
        assert info.description and "\n" not in info.description


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_builds_and_runs(name):
    info = ZOO[name]
    model = info.factory()
    assert not model.training
    shape = _SMALL_SHAPES.get(name, (2, *info.input_shape[1:]))
    with torch.no_grad():
        out = model(_example(info, shape))
    assert out.shape == (2, _NUM_CLASSES.get(name, 10))
    assert torch.isfinite(out).all()


def test_bert_ignores_masked_tokens():
    model = ZOO["bert"].factory()
    ids = torch.randint(0, 4096, (2, 32))
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    other = ids.clone()
    other[:, 20:] = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
        unmasked = model(other)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not torch.allclose(a, unmasked, atol=1e-3)


def test_factories_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = ZOO["convnet"].factory(), ZOO["convnet"].factory()
    assert torch.equal(torch.rand(1), expected)
    for ta, tb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb)
    other = ZOO["convnet"].factory(seed=1)
    assert not torch.equal(other.fc.weight, a.fc.weight)


def test_batchnorm_is_not_an_identity():
    # BN with default statistics would hide a broken BN-folding pass.
    bn = ZOO["resnet"].factory().stem[1]
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_get_model_info_lists_known_names():
    assert get_model_info("resnet") is ZOO["resnet"]
    with pytest.raises(InputError, match=r"unknown zoo model 'nope'.*convnet.*transformer"):
        get_model_info("nope")


def test_digits_data_is_split_deterministically():
    data = load_digits_data()
    again = load_digits_data()
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == "float32"
    assert data.y_train.dtype == "int64"
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert len(data.x_test) == pytest.approx(0.2 * (len(data.x_train) + len(data.x_test)), abs=1)
    assert set(data.y_test.tolist()) == set(range(10))
    assert (data.x_test == again.x_test).all()


def test_train_digits_reaches_95_percent():
    model, data = train_digits()
    assert not model.training
    assert accuracy(model, data.x_test, data.y_test) >= 0.95


def test_decoder_is_causal_with_a_tied_head():
    from onnxq.models import EXPORTABLE, LANGUAGE_MODELS

    info = LANGUAGE_MODELS["decoder"]
    assert EXPORTABLE["decoder"] is info and "decoder" not in ZOO
    assert info.sequence_axis == 1
    model = info.factory()
    assert model.lm_head.weight is model.embed.weight
    tokens = torch.randint(0, 8192, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 8192
    with torch.no_grad():
        out, out_changed = model(tokens), model(changed)
    assert out.shape == (2, 10, 8192) and torch.isfinite(out).all()
    # Position i sees tokens <= i only: changing tokens 6.. leaves logits 0..5 alone.
    assert torch.allclose(out[:, :6], out_changed[:, :6], atol=1e-5)
    assert not torch.allclose(out[:, 6:], out_changed[:, 6:])
