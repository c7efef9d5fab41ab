"""Structured channel pruning: the pass that ranks channels, then removes and compensates them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.errors import InputError
from onnxq.inputs import FeedBatches
from onnxq.io import parameter_stats
from onnxq.passes.prune.analysis import ChannelAnalysis, analyze_channels
from onnxq.passes.prune.compensate import compensate_biases, lost_contributions
from onnxq.passes.prune.rounding import AUTO, kept_channels, resolve_round_to
from onnxq.passes.prune.surgery import affected_values, apply_removal
from onnxq.passes.prune.weights import Exclusions, const, find_weights, parse_sparsity
from onnxq.passes.results import ChannelPruneResult

__all__ = ["PruneChannelsPass", "kept_channels"]

logger = logging.getLogger(__name__)


def _norms(weight: np.ndarray, axis: int, norm: str) -> np.ndarray:
    rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).astype(np.float64)
    return np.abs(rows).sum(axis=1) if norm == "l1" else np.sqrt((rows**2).sum(axis=1))


class PruneChannelsPass(ir.passes.InPlacePass):
    """Removes the least important output channels of Conv/Gemm/MatMul and their consumers.

    Whole output channels are removed and every consumer loses the matching input channels:
    a smaller dense model, faster everywhere. Kept channel counts are rounded to multiples
    of ``round_to`` in layers wider than it (`kept_channels`): by default this machine's
    ONNX Runtime convolution channel block (``rounding.channel_block``).

    Runs after BatchNormalization folding. A folded weight is
    ``W' = gamma / sqrt(var + eps) * W``, so the norm of a folded output channel already
    carries BN's scale (the BN-aware importance), and a removed channel's folded bias goes
    with it: the pruned model computes exactly what the fused model computes with every
    removed slice (weights, biases, consumer rows) set to 0. A BN left unfused is sliced
    like any other per-channel parameter. Which channels may go is decided by the channel
    analysis (``analysis.ChannelAnalysis``): a residual group is pruned with one index set
    chosen by the summed importance of its producers.

    Args:
        sparsity: Fraction of each layer's (or residual group's) output channels removed.
        norm: Importance of a channel: ``l1`` or ``l2`` norm of its (BN-folded) weights.
        round_to: Keep a multiple of this many channels: ``auto`` (default) is ONNX
            Runtime's NCHWc channel block on this machine (16 with AVX-512F, 8 on other
            x86-64), where 11 channels cost as much as 16; 1 keeps exact counts.
        exclude: Node names, regular expressions or op types whose outputs stay whole.
        calibration: Data to measure each consumer's mean input per channel (before
            pruning); every consumer then adds the mean contribution of its removed input
            channels to its bias. None: no compensation.
        provider: Execution provider that runs the calibration data.

    The result's ``removed`` lists every sliced parameter (``RemovedSlice``),
    ``details["bias_compensated"]`` counts the consumers whose bias was compensated, and
    ``details["rounding"]`` gives the channel multiple, why, and the requested and
    effective sparsity per layer and overall.
    """

    def __init__(
        self,
        sparsity: float = 0.3,
        *,
        norm: str = "l1",
        round_to: int | str = AUTO,
        exclude: Sequence[str] = (),
        calibration: FeedBatches | None = None,
        provider: str = "cpu",
    ):
        super().__init__()
        self.round_to, self.round_reason = resolve_round_to(round_to)
        if norm not in ("l1", "l2"):
            raise InputError(f"unknown channel importance '{norm}'; choose from l1, l2")
        self.sparsity = parse_sparsity(str(sparsity))
        self.norm = norm
        self.exclude = tuple(exclude)
        self.calibration = calibration
        self.provider = provider

    def __repr__(self) -> str:
        return (
            f"PruneChannelsPass(sparsity={self.sparsity:g}, norm={self.norm!r}, "
            f"round_to={self.round_to}, exclude={list(self.exclude)}, "
            f"calibration={self.calibration!r})"
        )

    def call(self, model: ir.Model) -> ChannelPruneResult:
        if not find_weights(model, lambda node: False):
            raise InputError(
                "nothing to prune: the model has no Conv/Gemm/MatMul with constant weights"
            )
        params_before = parameter_stats(model)[0]
        analysis = analyze_channels(model.graph, Exclusions(self.exclude))
        removed = self._choose(analysis)
        # Measured on the unpruned model: what the removed channels carried on average.
        lost = (
            lost_contributions(model, analysis, removed, self.calibration, self.provider)
            if self.calibration is not None
            else {}
        )
        sliced = apply_removal(model.graph, analysis, removed)
        compensated = compensate_biases(model.graph, analysis, removed, lost)
        modified = bool(sliced)
        if modified:
            for value in affected_values(analysis, removed):
                value.shape = None
            common_passes.ShapeInferencePass()(model)
        details = _channel_summary(analysis, removed, self.sparsity, self.norm)
        details["rounding"] = _rounding_summary(details, self.round_to, self.round_reason)
        details["note"] += f"; {details['rounding']['note']}"
        details["parameters"] = [params_before, parameter_stats(model)[0]]
        details["bias_compensated"] = compensated
        if compensated:
            details["note"] += f"; bias compensated in {compensated} consumer(s)"
        logger.info("%r: %s", self, details["note"])
        return ChannelPruneResult(model, modified=modified, details=details, removed=sliced)

    def _choose(self, analysis: ChannelAnalysis) -> dict[int, np.ndarray]:
        """Per space, the channels to remove: one index set per group, by summed importance."""
        removed: dict[int, np.ndarray] = {}
        for root, members in analysis.groups().items():
            if any(m in analysis.blocked for m in members):
                continue
            score = sum(
                _norms(const(s.node.inputs[1]), s.weight_axis, self.norm)
                for s in (analysis.spaces[m] for m in members)
            )
            size = analysis.spaces[root].size
            keep = kept_channels(size, self.sparsity, self.round_to)
            drop = np.sort(np.argsort(score, kind="stable")[: size - keep])
            for member in members:
                removed[member] = drop
        return removed


def _channel_summary(
    analysis: ChannelAnalysis, removed: dict[int, np.ndarray], sparsity: float, norm: str
) -> dict[str, object]:
    reasons = {analysis.find(space): why for space, why in analysis.blocked.items()}
    layers, left = {}, {}
    for index, space in enumerate(analysis.spaces):
        name = space.node.name or ""
        cut = removed.get(index)
        layers[name] = [space.size, space.size - (0 if cut is None else cut.size)]
        if cut is None:
            left[name] = reasons.get(analysis.find(index), "excluded")
    # Totals over the layers that could be pruned: the layers left whole are listed apart.
    before = sum(v[0] for k, v in layers.items() if k not in left)
    after = sum(v[1] for k, v in layers.items() if k not in left)
    note = (
        f"removed {before - after} of {before} output channels "
        f"({100 * (before - after) / max(before, 1):.1f}%) in {len(layers) - len(left)} layers"
    )
    if left:
        note += f"; {len(left)} left whole (see left_unpruned)"
    return {
        "sparsity": sparsity,
        "importance": norm,
        "channels_before": before,
        "channels_after": after,
        "layers": layers,  # producer -> [channels before, after]
        "left_unpruned": left,  # producer -> why
        "note": note,
    }


def _rounding_summary(summary: dict, round_to: int, reason: str) -> dict[str, object]:
    """Requested vs effective sparsity per pruned layer and overall, and the rule behind it."""
    requested = summary["sparsity"]
    left = summary["left_unpruned"]
    layers = {
        name: [requested, round(1 - after / before, 4)]
        for name, (before, after) in summary["layers"].items()
        if name not in left
    }
    before, after = summary["channels_before"], summary["channels_after"]
    effective = round(1 - after / before, 4) if before else 0.0
    if round_to > 1:
        rule = f"kept counts of layers wider than {round_to} rounded to multiples of {round_to}"
    else:
        rule = "exact kept counts"
    return {
        "round_to": round_to,
        "reason": reason,
        "requested_sparsity": requested,
        "effective_sparsity": effective,
        "layers": layers,  # producer -> [requested, effective sparsity]
        "note": f"sparsity requested {requested:.0%}, effective {effective:.1%} ({rule}: {reason})",
    }
