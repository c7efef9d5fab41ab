from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from onnxq.models.digits import DigitsNet  # noqa: E402
from onnxq.passes.prune.channels import kept_channels  # noqa: E402
from onnxq.training.loop import digits_loaders, seed_everything  # noqa: E402
from onnxq.training.prune import count_parameters, prune_channels, prune_finetune  # noqa: E402

_X = torch.zeros(2, 1, 8, 8)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_digits_net_loses_the_channels_onnx_pruning_would_remove(sparsity):
    model = DigitsNet().eval()
    summary = prune_channels(model, _X[:1], sparsity)
    widths = tuple(kept_channels(w, sparsity, 8) for w in (16, 32, 32))
    expected = count_parameters(DigitsNet(widths))
    assert summary.parameters_before == count_parameters(DigitsNet())
    assert summary.parameters_after == count_parameters(model) == expected
    assert sorted(after for _, after in summary.channels.values()) == sorted(widths)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_without_rounding_the_share_of_channels_removed_is_the_sparsity():
    model = nn.Sequential(
        nn.Conv2d(1, 20, 3, padding=1),
        nn.BatchNorm2d(20),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1280, 5),
    )
    summary = prune_channels(model, _X[:1], 0.25, round_to=1)
    assert model[0].out_channels == model[1].num_features == 15
    assert model[4].in_features == 15 * 64 and model[4].out_features == 5
    assert summary.channels == {"0": (20, 15)}
    # Per removed channel: its conv kernel and bias (9 + 1), BN scale and shift (2), and the
    # linear layer's 64 inputs (one per pixel) into each of its 5 outputs.
    assert summary.parameters_before - summary.parameters_after == 5 * (9 + 1 + 2 + 64 * 5)


def test_residual_additions_are_pruned_together():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            y = self.a(x)
            y = y + self.b(y)
            return self.head(y.mean(dim=(2, 3)))

    model = Residual()
    prune_channels(model, _X[:1], 0.5)
    assert model.a.out_channels == model.b.out_channels == model.b.in_channels == 8
    assert model(_X).shape == (2, 3)


def test_zero_sparsity_changes_nothing_and_bad_arguments_are_rejected():
    model = DigitsNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    summary = prune_channels(model, _X[:1], 0.0)
    assert summary.channels == {} and summary.removed_fraction == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="sparsity"):
        prune_channels(model, _X[:1], 1.0)
    with pytest.raises(ValueError, match="norm"):
        prune_channels(model, _X[:1], 0.3, norm="l3")


def test_the_pruned_model_fine_tunes():
    seed_everything(0)
    loaders = digits_loaders(seed=0, train_per_class=10)
    model = DigitsNet()
    summary = prune_finetune(model, loaders.train, 0.3, epochs=1)
    assert summary.removed_fraction > 0.3
    assert all(p.requires_grad for p in model.parameters())
    fc = model.fc.weight.detach().clone()
    prune_finetune(model, loaders.train, 0.0, epochs=1)
    assert not torch.equal(fc, model.fc.weight)
    assert not model.training
