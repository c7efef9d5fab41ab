from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("sklearn")

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from onnxq.models.digits import DigitsNet  # noqa: E402
from onnxq.passes.prune.channels import kept_channels  # noqa: E402
from onnxq.training.loop import digits_loaders, seed_everything  # noqa: E402
from onnxq.training.prune import count_parameters, prune_channels, prune_finetune  # noqa: E402

_X = torch.zeros(2, 1, 8, 8)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_digits_net_loses_the_channels_onnx_pruning_would_remove(sparsity):
    model = DigitsNet().eval()
    summary = prune_channels(model, _X[:1], sparsity, round_to=8)
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


def test_auto_rounding_keeps_block_multiples_and_the_export_runs_on_ort(monkeypatch, tmp_path):
    import onnxruntime as ort

    from onnxq.export import export_torch
    from onnxq.passes.prune import rounding

    monkeypatch.setattr(rounding, "channel_block", lambda: (16, "blocks of 16 (test)"))
    model = DigitsNet().eval()
    summary = prune_channels(model, _X[:1], 0.3)  # round_to auto: the (patched) block
    # 16 wide is one block: exact 11; 0.7 * 32 = 22.4 rounds to 16 (32 is 9.6 away).
    assert sorted(after for _, after in summary.channels.values()) == [11, 16, 16]
    assert (summary.sparsity, summary.round_to) == (0.3, 16)
    assert summary.effective_sparsity == pytest.approx(1 - 43 / 80)
    assert "requested 30%, effective 46.2%" in summary.describe()
    assert "blocks of 16 (test)" in summary.describe()
    path = tmp_path / "pruned.onnx"
    export_torch(model, (1, 1, 8, 8), path, exporter="torchscript")
    x = torch.randn(4, 1, 8, 8)
    (got,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_a_layer_rounding_keeps_whole_is_counted_in_the_effective_sparsity():
    model = DigitsNet().eval()
    summary = prune_channels(model, _X[:1], 0.05, round_to=8)  # 15.2 -> 16, 30.4 -> 32
    assert summary.channels == {} and sorted(summary.whole.values()) == [16, 32, 32]
    assert summary.effective_sparsity == 0.0
