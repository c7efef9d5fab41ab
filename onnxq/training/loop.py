"""The seeded, interruptible CPU training loop the Torch-side training tools share."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from onnxq.io import atomic_write

if TYPE_CHECKING:
    from onnxq.models.digits import DigitsData

__all__ = [
    "DigitsLoaders",
    "LossFn",
    "Progress",
    "classification_loss",
    "digits_loaders",
    "evaluate_accuracy",
    "save_state",
    "seed_everything",
    "torch_threads",
    "train",
]

logger = logging.getLogger(__name__)

# A training loss: (model, inputs, labels) -> scalar. It gets the model, not its outputs,
# so that distillation (a teacher's logits) and QAT (a float twin's outputs) fit the same loop.
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a training run is, passed to the progress callback after every step.

    Attributes:
        epoch: Current epoch, from 1.
        epochs: Epochs in the run.
        step: Steps done in this epoch, from 1.
        steps: Steps per epoch.
        loss: This step's loss.
        epoch_loss: Mean loss over this epoch's steps so far.
    """

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    epoch_loss: float

    @property
    def fraction(self) -> float:
        """Share of the whole run done, from 0 to 1."""
        return ((self.epoch - 1) * self.steps + self.step) / (self.epochs * self.steps)

    @property
    def epoch_done(self) -> bool:
        """Whether this step ended an epoch."""
        return self.step == self.steps


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and Torch's random generators.

    With `train`'s single thread (the default), a run on the CPU is then bit-for-bit
    repeatable.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Runs Torch on ``threads`` intra-op threads (None: leave as is), restoring them after.

    One thread keeps float reductions in a fixed order (repeatable weights) and is as fast as
    more for the small models trained here.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def classification_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the model's logits against integer labels: the default `LossFn`."""
    return nn.functional.cross_entropy(model(x), y)


def _train_mode(model: nn.Module) -> None:
    """Training mode, except for batch norms whose parameters are all frozen.

    A frozen layer must not change at all: its running statistics stay too (the usual
    convention for a frozen backbone in transfer learning).
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def save_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Saves the model's ``state_dict`` atomically: an interrupt leaves the old file or none."""
    with atomic_write(path) as f:
        torch.save(model.state_dict(), f)


def train(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn = classification_loss,
    *,
    epochs: int,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    on_progress: Callable[[Progress], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    threads: int | None = 1,
) -> list[float]:
    """Trains ``model`` in place with Adam on its trainable parameters.

    Parameters with ``requires_grad=False`` are frozen (and so are the running statistics
    of batch norms whose parameters all are). The model is left in eval mode, also when
    the run is interrupted: a KeyboardInterrupt propagates with the model as the last
    completed step left it, and ``checkpoint`` (written atomically after each epoch) holds
    the last completed epoch, never a partial file.

    Args:
        model: The model; trained in place.
        loader: Batches of ``(inputs, labels)``; seed its generator for a repeatable order.
        loss_fn: ``(model, inputs, labels) -> loss``; cross-entropy by default.
        epochs: Passes over ``loader``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        on_progress: Called after every step with a `Progress`.
        checkpoint: Where to save the ``state_dict`` after each epoch (optional).
        threads: Torch threads during the run (1: repeatable; None: leave as is).

    Returns:
        The mean loss of each epoch.

    Raises:
        ValueError: ``epochs`` < 1, an empty loader, or no trainable parameters.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    steps = len(loader)
    if steps == 0:
        raise ValueError("the training data loader yields no batches")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all are frozen)")
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    history = []
    with torch_threads(threads):
        try:
            for epoch in range(1, epochs + 1):
                _train_mode(model)
                total = 0.0
                for step, (x, y) in enumerate(loader, start=1):
                    optimizer.zero_grad()
                    loss = loss_fn(model, x, y)
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                    if on_progress is not None:
                        on_progress(Progress(epoch, epochs, step, steps, loss.item(), total / step))
                history.append(total / steps)
                logger.info("epoch %d/%d: mean loss %.4f", epoch, epochs, history[-1])
                if checkpoint is not None:
                    model.eval()
                    save_state(model, checkpoint)
        finally:
            model.eval()
    return history


def evaluate_accuracy(model: nn.Module, loader: DataLoader, *, threads: int | None = 1) -> float:
    """Share of the loader's samples whose arg-max output is the label (eval mode, no grad)."""
    model.eval()
    hits = samples = 0
    with torch_threads(threads), torch.no_grad():
        for x, y in loader:
            hits += int((model(x).argmax(dim=1) == y).sum())
            samples += len(y)
    if samples == 0:
        raise ValueError("the evaluation data loader yields no samples")
    return hits / samples


@dataclasses.dataclass(frozen=True)
class DigitsLoaders:
    """The digits task as Torch data loaders.

    Attributes:
        train: Shuffled (seeded) training batches of ``(images, labels)``.
        test: Held-out batches, in a fixed order.
        data: The arrays behind them (after class selection and relabelling).
        classes: The original digit of each label, in label order.
    """

    train: DataLoader
    test: DataLoader
    data: DigitsData
    classes: tuple[int, ...]


def _select(
    x: np.ndarray, y: np.ndarray, classes: Sequence[int], per_class: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Samples of ``classes`` (at most ``per_class`` each, first in order), labels 0..k-1."""
    keep = np.concatenate(
        [np.flatnonzero(y == c)[:per_class] for c in classes]  # [:None] keeps all
    )
    keep.sort()
    relabel = np.full(int(y.max()) + 1, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    return x[keep], relabel[y[keep]]


def digits_loaders(
    *,
    seed: int = 0,
    batch_size: int = 64,
    classes: Sequence[int] | None = None,
    train_per_class: int | None = None,
) -> DigitsLoaders:
    """Loads the demo's digits task (sklearn's bundled 8x8 digits, no download) as loaders.

    Args:
        seed: Seed of the train/test split and of the shuffling.
        batch_size: Samples per batch.
        classes: Digits to keep (default all ten); they are relabelled 0..k-1 in this order,
            so a subset trains a k-way classifier.
        train_per_class: Keep at most this many training samples of each class (few-label
            fine-tuning); the test part keeps all of them.

    Returns:
        The loaders and their arrays.
    """
    from onnxq.models.digits import NUM_CLASSES, DigitsData, load_digits_data

    full = load_digits_data(seed)
    classes = tuple(range(NUM_CLASSES)) if classes is None else tuple(classes)
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
        raise ValueError(f"classes must be distinct digits 0-9, got {classes}")
    x_train, y_train = _select(full.x_train, full.y_train, classes, train_per_class)
    x_test, y_test = _select(full.x_test, full.y_test, classes, None)
    data = DigitsData(x_train, y_train, x_test, y_test)
    generator = torch.Generator().manual_seed(seed)
    train_set = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    test_set = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))
    return DigitsLoaders(
        train=DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator),
        test=DataLoader(test_set, batch_size=256),
        data=data,
        classes=classes,
    )
