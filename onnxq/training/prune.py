"""Structured channel pruning of a Torch model with torch-pruning's DepGraph, then fine-tuning."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from onnxq.passes.prune.rounding import AUTO, kept_channels, resolve_round_to
from onnxq.training.loop import train

__all__ = ["PruneSummary", "count_parameters", "output_layers", "prune_channels", "prune_finetune"]

logger = logging.getLogger(__name__)

_NORMS = {"l1": 1, "l2": 2}


@dataclasses.dataclass(frozen=True)
class PruneSummary:
    """What `prune_channels` removed.

    Attributes:
        parameters_before: Parameters of the model before pruning.
        parameters_after: Parameters after.
        channels: Per pruned layer (the group's root module name), output channels before
            and after.
        sparsity: The requested share of channels to remove.
        round_to: Kept counts are multiples of this in layers wider than it (1: exact).
        round_reason: Why that multiple (e.g. the measured ONNX Runtime channel block).
        whole: Prunable layers kept whole (the sparsity, rounded, removes nothing): their
            output channels.
    """

    parameters_before: int
    parameters_after: int
    channels: dict[str, tuple[int, int]]
    sparsity: float = 0.0
    round_to: int = 1
    round_reason: str = ""
    whole: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        """Share of the parameters removed."""
        return 1.0 - self.parameters_after / self.parameters_before

    @property
    def effective_sparsity(self) -> float:
        """Share of the prunable layers' output channels removed (after rounding)."""
        kept = sum(a for _, a in self.channels.values()) + sum(self.whole.values())
        before = sum(b for b, _ in self.channels.values()) + sum(self.whole.values())
        return 1.0 - kept / before if before else 0.0

    def describe(self) -> str:
        """One line: requested and effective sparsity per layer and overall, and why."""
        layers = ", ".join(
            [f"{n} {b}->{a}" for n, (b, a) in self.channels.items()]
            + [f"{n} {b} whole" for n, b in self.whole.items()]
        )
        rule = f"multiples of {self.round_to}" if self.round_to > 1 else "exact counts"
        return (
            f"channels requested {self.sparsity:.0%}, effective {self.effective_sparsity:.1%} "
            f"({layers}; {rule}: {self.round_reason})"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def output_layers(model: nn.Module, example_inputs: Tensor) -> list[nn.Module]:
    """The modules whose output is returned by the model as is (their outputs must stay).

    Found by running the model once: a layer followed by another operation (e.g. a final
    softmax) is not found; pass it as ``ignored_layers`` to `prune_channels` then.
    """
    produced: dict[int, nn.Module] = {}

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            produced[id(output)] = module

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            outputs = model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return [produced[id(o)] for o in outputs if id(o) in produced]


def prune_channels(
    model: nn.Module,
    example_inputs: Tensor,
    sparsity: float,
    *,
    norm: str = "l1",
    round_to: int | str = AUTO,
    ignored_layers: Sequence[nn.Module] = (),
) -> PruneSummary:
    """Removes a share of the output channels of every prunable layer, in place.

    torch-pruning's dependency graph (DepGraph) finds the layers whose channels are coupled
    (a conv, its batch norm, the consumers' input channels, residual additions, a flatten
    into a linear layer) and removes them together; the result is a smaller dense model of
    the same class that trains as before. Each coupled group is scored by the summed norm
    of all its weights and keeps as many channels as ``onnxq compile --prune channels:S``
    would (`kept_channels`: ``(1 - S) * size`` rounded to a multiple of ``round_to`` in
    layers wider than it), so ``channels:0.3`` means the same on both paths. The layers
    producing the model's outputs keep them.

    Args:
        model: The model; pruned in place (``copy.deepcopy`` it first to keep the original).
        example_inputs: One input batch, to trace the model.
        sparsity: Share of the channels to remove, in [0, 1).
        norm: ``l1`` or ``l2`` channel importance.
        round_to: Keep a multiple of this many channels (layers wider than it): ``auto``
            is this machine's ONNX Runtime NCHWc channel block (16 with AVX-512F, 8 on
            other x86-64), to which its convolutions pad channels; 1 keeps exact counts.
        ignored_layers: Layers whose output channels must stay, besides the output layers.

    Returns:
        Parameter counts and per-layer channel counts before and after.

    Raises:
        ValueError: ``sparsity`` outside [0, 1) or an unknown ``norm``.
        onnxq.errors.InputError: ``round_to`` neither ``auto`` nor a positive integer.
    """
    import torch_pruning as tp  # optional: only this module needs it

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    multiple, reason = resolve_round_to(round_to)
    was_training = model.training
    model.eval()
    before = count_parameters(model)
    ignored = [*output_layers(model, example_inputs), *ignored_layers]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    importance = tp.importance.GroupMagnitudeImportance(p=_NORMS[norm], normalizer=None)
    names = {module: name for name, module in model.named_modules()}
    channels, whole = {}, {}
    # Pruning one group inside the generator is how torch-pruning's own pruners do it: the
    # next group is then built on the already-pruned model.
    for group in graph.get_all_groups(ignored_layers=ignored):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        size = graph.get_out_channels(root)
        keep = kept_channels(size, sparsity, multiple)
        name = names.get(root, type(root).__name__)
        if keep >= size:
            whole[name] = size
            continue
        with torch.no_grad():
            score = importance(group)
        drop = torch.argsort(score, stable=True)[: size - keep].sort().values.tolist()
        group = graph.get_pruning_group(root, handler, idxs=drop)
        if not graph.check_pruning_group(group):
            logger.info("not pruning %s: torch-pruning refuses the group", names.get(root))
            continue
        group.prune()
        channels[name] = (size, keep)
    model.train(was_training)
    summary = PruneSummary(
        before, count_parameters(model), channels, sparsity, multiple, reason, whole
    )
    logger.info(
        "pruned %d layer group(s): %d -> %d parameters (-%.1f%%); %s",
        len(channels),
        summary.parameters_before,
        summary.parameters_after,
        100 * summary.removed_fraction,
        summary.describe(),
    )
    return summary


def prune_finetune(
    model: nn.Module,
    loader: DataLoader,
    sparsity: float,
    *,
    epochs: int,
    norm: str = "l1",
    round_to: int | str = AUTO,
    **train_options: Any,
) -> PruneSummary:
    """Prunes ``model`` in place (`prune_channels`) and fine-tunes it on ``loader``.

    Args:
        model: The trained model; pruned and fine-tuned in place.
        loader: Batches of ``(inputs, labels)``; the first batch traces the model.
        sparsity: Share of the channels to remove.
        epochs: Fine-tuning epochs.
        norm: ``l1`` or ``l2`` channel importance.
        round_to: Kept channel counts are multiples of this (``auto``: this machine's ONNX
            Runtime channel block; 1: exact).
        **train_options: Passed to `onnxq.training.loop.train` (``lr``, ``loss_fn``,
            ``on_progress``, ...).

    Returns:
        What was pruned.
    """
    example = next(iter(loader))[0][:1]
    summary = prune_channels(model, example, sparsity, norm=norm, round_to=round_to)
    train(model, loader, epochs=epochs, **train_options)
    return summary
