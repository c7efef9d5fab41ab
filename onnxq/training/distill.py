"""Knowledge distillation: train a small student on a large teacher's softened outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from onnxq.training.loop import LossFn, train

__all__ = ["distill", "distillation_loss", "distillation_loss_fn"]


def _check(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> Tensor:
    """Hinton et al.'s distillation loss, averaged over the batch.

    ``alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE(student,
    labels)``. The T² keeps the soft term's gradients on the scale of the hard term's as T
    changes (they shrink as 1/T² otherwise).

    Args:
        student_logits: (N, C) logits of the model being trained.
        teacher_logits: (N, C) logits of the teacher (no gradient flows into them).
        labels: (N,) integer class labels.
        alpha: Weight of the soft (teacher) term, in [0, 1]; 0 is plain cross-entropy.
        temperature: Softening temperature T > 0.

    Returns:
        The scalar loss.

    Raises:
        ValueError: ``alpha`` outside [0, 1], ``temperature`` <= 0, or mismatched shapes.
    """
    _check(alpha, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0.0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def distillation_loss_fn(teacher: nn.Module, alpha: float, temperature: float) -> LossFn:
    """A `onnxq.training.loop.LossFn` that distills ``teacher`` (kept in eval mode) into the model.

    The student may be any module with the teacher's output shape, e.g. a QAT-prepared copy
    of the teacher itself.
    """
    _check(alpha, temperature)
    teacher.eval()

    def loss(student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return distillation_loss(student(x), teacher_logits, y, alpha, temperature)

    return loss


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    alpha: float = 0.5,
    temperature: float = 4.0,
    **train_options: Any,
) -> list[float]:
    """Trains ``student`` in place on ``teacher``'s softened logits and the labels.

    Args:
        student: The model trained (in place).
        teacher: The trained model distilled; not modified.
        loader: Batches of ``(inputs, labels)``.
        epochs: Passes over ``loader``.
        alpha: Weight of the teacher term (see `distillation_loss`).
        temperature: Softening temperature.
        **train_options: Passed to `onnxq.training.loop.train` (``lr``, ``on_progress``,
            ``checkpoint``, ...).

    Returns:
        The mean loss of each epoch.
    """
    _check(alpha, temperature)  # before any training, not at the first step
    was_training = teacher.training
    try:
        return train(
            student,
            loader,
            distillation_loss_fn(teacher, alpha, temperature),
            epochs=epochs,
            **train_options,
        )
    finally:
        teacher.train(was_training)
