"""A conv-bn-relu CNN for sklearn's 8x8 digits, with its data and a quick CPU training loop."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import Tensor, nn

from onnxq.models._build import seeded
from onnxq.models.convnet import conv_bn_relu
from onnxq.training.loop import torch_threads

__all__ = ["DigitsData", "DigitsNet", "accuracy", "digits", "load_digits_data", "train_digits"]

logger = logging.getLogger(__name__)

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The digits data set, split into train and test parts.

    Attributes:
        x_train: Images, float32 in [0, 1], shaped (N, 1, 8, 8).
        y_train: Labels, int64, shaped (N,).
        x_test: Held-out images, like ``x_train``.
        y_test: Held-out labels, like ``y_train``.

    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class DigitsNet(nn.Module):
    """Three conv-bn-relu layers (one max pool) and a linear classifier for 8x8 digits.

    Args:
        widths: Output channels of the three conv layers (narrower: a distillation student).
        num_classes: Size of the output.
    """

    def __init__(
        self, widths: tuple[int, int, int] = (16, 32, 32), num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            conv_bn_relu(1, a), conv_bn_relu(a, b), nn.MaxPool2d(2), conv_bn_relu(b, c)
        )
        self.fc = nn.Linear(c * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, 1, 8, 8) to logits (N, 10)."""
        return self.fc(self.features(x).flatten(1))


def digits(seed: int = 0) -> DigitsNet:
    """Build the zoo's (untrained) ``digits`` model with seeded random weights, in eval mode."""
    return seeded(DigitsNet, seed)


def load_digits_data(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """Load sklearn's bundled digits (no download) and split them, stratified by label.

    Args:
        seed: Seed of the split.
        test_fraction: Share of the samples held out for testing.

    Returns:
        The split data, deterministic for a given seed.

    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are integers in 0..16.
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsData(x_train, y_train, x_test, y_test)


def accuracy(model: nn.Module, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Return the share of samples whose arg-max logit equals the label (eval mode)."""
    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(x)).argmax(dim=1)
    return float((predicted == torch.as_tensor(y)).float().mean())


def train_digits(
    epochs: int = 10, seed: int = 0, batch_size: int = 64, lr: float = 3e-3
) -> tuple[DigitsNet, DigitsData]:
    """Train ``DigitsNet`` on the digits training split, deterministically on CPU.

    Args:
        epochs: Passes over the training data.
        seed: Seed of the weights, the split and the batch order.
        batch_size: Samples per Adam step.
        lr: Adam learning rate.

    Returns:
        The trained model (eval mode) and the data it was trained on.

    """
    data = load_digits_data(seed)
    model = digits(seed).train()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch_threads(1):
        for epoch in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
            logger.debug("digits epoch %d: loss %.4f", epoch, loss.item())
    model.eval()
    logger.info("digits test accuracy: %.4f", accuracy(model, data.x_test, data.y_test))
    return model, data
