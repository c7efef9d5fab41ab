from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from onnxq.training.loop import (  # noqa: E402
    digits_loaders,
    evaluate_accuracy,
    save_state,
    seed_everything,
    train,
)


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def _trained_weights(seed: int) -> list[torch.Tensor]:
    seed_everything(seed)
    loaders = digits_loaders(seed=seed, train_per_class=10)
    model = _tiny_net()
    train(model, loaders.train, epochs=2)
    return [p.detach().clone() for p in model.parameters()]


def test_training_is_repeatable_with_the_same_seed_and_not_with_another():
    first, again, other = _trained_weights(0), _trained_weights(0), _trained_weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_training_learns_and_reports_progress():
    seed_everything(0)
    loaders = digits_loaders(seed=0, train_per_class=30)
    model = _tiny_net()
    before = evaluate_accuracy(model, loaders.test)
    seen = []
    history = train(model, loaders.train, epochs=3, lr=1e-2, on_progress=seen.append)
    after = evaluate_accuracy(model, loaders.test)
    steps = len(loaders.train)
    assert len(seen) == 3 * steps
    assert [p.fraction for p in seen][-1] == pytest.approx(1.0)
    assert sum(p.epoch_done for p in seen) == 3
    assert len(history) == 3 and history[-1] < history[0]
    assert after > before + 0.3
    assert not model.training


def test_frozen_parameters_and_their_batch_norm_statistics_do_not_change():
    seed_everything(0)
    loaders = digits_loaders(seed=0, train_per_class=10)
    model = _tiny_net()
    for p in model[:2].parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[:2].state_dict().items()}
    head = model[4].weight.clone()
    train(model, loaders.train, epochs=1)
    assert all(torch.equal(v, model[:2].state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(head, model[4].weight)


def test_an_interrupt_leaves_the_last_complete_checkpoint_and_no_partial_file(tmp_path):
    loaders = digits_loaders(seed=0, train_per_class=10)
    model = _tiny_net()
    checkpoint = tmp_path / "state.pt"

    def interrupt(progress):
        if progress.epoch == 2 and progress.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, loaders.train, epochs=3, on_progress=interrupt, checkpoint=checkpoint)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert set(torch.load(checkpoint)) == set(model.state_dict())
    assert not model.training


def test_save_state_replaces_atomically(tmp_path):
    model = _tiny_net()
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    save_state(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    loaded = torch.load(path)
    assert torch.equal(loaded["4.weight"], model[4].weight)


def test_digits_loaders_select_and_relabel_classes():
    loaders = digits_loaders(seed=0, classes=(5, 6, 7, 8, 9), train_per_class=4)
    data = loaders.data
    assert loaders.classes == (5, 6, 7, 8, 9)
    assert sorted(set(data.y_train.tolist())) == [0, 1, 2, 3, 4]
    assert len(data.y_train) == 20
    assert set(data.y_test.tolist()) == {0, 1, 2, 3, 4}
    x, y = next(iter(loaders.train))
    assert x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64


def test_bad_arguments_are_rejected():
    loaders = digits_loaders(seed=0, train_per_class=2)
    with pytest.raises(ValueError, match="epochs"):
        train(_tiny_net(), loaders.train, epochs=0)
    frozen = _tiny_net().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        train(frozen, loaders.train, epochs=1)
    with pytest.raises(ValueError, match="classes"):
        digits_loaders(classes=(3, 3))
