"""The ``--prune`` request grammar: ``PruneSpec`` parses a request and names its passes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.errors import InputError
from onnxq.inputs import FeedBatches
from onnxq.passes.prune import ApplyMasksPass, PruneChannelsPass, PruneWeightsPass, load_masks
from onnxq.passes.prune.rounding import AUTO, resolve_round_to
from onnxq.passes.prune.weights import parse_sparsity

__all__ = ["KINDS", "PruneSpec"]

KINDS = (
    "unstructured:S",
    "unstructured:S:global",
    "channels:S",
    "channels:S:l2",
    "channels:S:compensate",
    "channels:S:exact",
    "channels:S:round=N",
    "2:4",
    "mask:FILE",
)


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """A parsed ``--prune`` request.

    ONNX Runtime's CPU provider has no sparse kernels, so zeros alone buy no speed. What
    each kind buys:

    - ``unstructured:S`` (per layer) or ``unstructured:S:global``: the fraction S of
      smallest |w| of every Conv/Gemm/MatMul weight becomes 0. Latency and file size stay
      the same; the zip-compressed size shrinks (reported), which is what a download or an
      app bundle pays.
    - ``2:4``: in every group of 4 consecutive weights along the input-channel axis the 2
      largest stay: the pattern GPU sparse tensor cores run faster; no speed-up on ONNX
      Runtime's CPU provider.
    - ``mask:masks.npz``: initializer name -> 0/1 mask, e.g. from ``torch.nn.utils.prune``.
    - ``channels:S`` (L1, or ``channels:S:l2``): whole output channels are removed and
      every consumer loses the matching input channels: a smaller dense model, faster
      everywhere. Kept channel counts are rounded to multiples of this machine's ONNX
      Runtime convolution channel block in layers wider than one block (16 with
      AVX-512F, 8 on other x86-64: NCHWc convolutions pad channels to it, so 11 channels
      run as slowly as 16); ``:exact`` keeps exact counts, ``:round=N`` multiples of N.

    Attributes:
        kind: ``unstructured``, ``channels``, ``2:4`` or ``mask``.
        sparsity: Fraction of weights (or channels) to remove, in [0, 1).
        scope: ``layer`` or ``global`` (unstructured), ``l1`` or ``l2`` (channels).
        masks: The ``.npz`` of masks (``mask`` kind).
        exclude: Node names, regular expressions or op types never pruned.
        compensate: Channels only: move the removed channels' mean contribution into the
            consumers' biases (needs calibration data). Opt-in: measured on digits it wins
            back 10 of 16 points at 0.3 but loses 16 more at 0.5 (benchmarks/README.md).
        round_to: Channels only: kept counts are multiples of this (``auto``: the
            channel block of this machine's ONNX Runtime; 1 with ``:exact``).
    """

    kind: str
    sparsity: float = 0.0
    scope: str = ""
    masks: str | None = None
    exclude: tuple[str, ...] = ()
    compensate: bool = False
    round_to: int | str = AUTO

    @classmethod
    def parse(cls, text: str, exclude: Sequence[str] = ()) -> PruneSpec:
        """Parses a request such as ``channels:0.3[:l2][:compensate][:exact|:round=N]``.

        The forms are ``unstructured:S[:global]``,
        ``channels:S[:l2][:compensate][:exact|:round=N]``, ``2:4`` and ``mask:FILE.npz``.

        Raises:
            InputError: Unknown kind or scope, a sparsity outside [0, 1), or a bad
                ``round=N``.
        """
        kind, _, rest = text.strip().partition(":")
        exclude = tuple(exclude)
        if text.strip() == "2:4":
            return cls("2:4", 0.5, exclude=exclude)
        if kind == "mask" and rest:
            return cls("mask", masks=rest, exclude=exclude)
        scopes = {"unstructured": ("layer", "global"), "channels": ("l1", "l2")}
        if kind not in scopes or not rest:
            raise InputError(f"unknown prune kind '{text}'; choose from {', '.join(KINDS)}")
        sparsity, *options = rest.split(":")
        flags = ("compensate", "exact", "round=N") if kind == "channels" else ()
        rounding = [o for o in options if flags and (o == "exact" or o.startswith("round="))]
        unknown = [o for o in options if o not in scopes[kind] + flags and o not in rounding]
        if unknown or sum(o in scopes[kind] for o in options) > 1 or len(rounding) > 1:
            allowed = ", ".join(scopes[kind] + flags)
            raise InputError(f"bad {kind} options '{':'.join(options)}'; choose from {allowed}")
        scope = next((o for o in options if o in scopes[kind]), scopes[kind][0])
        round_to: int | str = AUTO
        if rounding:
            round_to = 1 if rounding[0] == "exact" else rounding[0].removeprefix("round=")
            round_to = resolve_round_to(round_to)[0]  # a bad N fails here, not mid-compile
        return cls(
            kind,
            parse_sparsity(sparsity),
            scope,
            exclude=exclude,
            compensate="compensate" in options,
            round_to=round_to,
        )

    def passes(
        self, calibration: FeedBatches | None = None, *, provider: str = "cpu"
    ) -> list[ir.passes.PassBase]:
        """Returns the passes that carry out this request, in order.

        Args:
            calibration: Data for channel pruning's bias compensation (used with
                ``compensate``; other kinds ignore it).
            provider: Execution provider that runs the calibration data.

        Raises:
            InputError: The mask file cannot be read.
        """
        if self.kind == "channels":
            # The removed channels leave shape computations (Reshape's Concat) unused.
            return [
                PruneChannelsPass(
                    self.sparsity,
                    norm=self.scope,
                    round_to=self.round_to,
                    exclude=self.exclude,
                    calibration=calibration if self.compensate else None,
                    provider=provider,
                ),
                common_passes.RemoveUnusedNodesPass(),
            ]
        if self.kind == "mask":
            return [ApplyMasksPass(load_masks(self.masks or ""), exclude=self.exclude)]
        method = "2:4" if self.kind == "2:4" else self.scope
        return [PruneWeightsPass(self.sparsity, method=method, exclude=self.exclude)]
