"""Weight-only quantization: MatMul weights stored block-wise in ONNX Runtime's MatMulNBits.

``MatMul(x, W)`` with a constant ``W [K, N]`` becomes ``com.microsoft.MatMulNBits(x, Wq,
scales[, zero_points])``: each column of ``W`` is cut into blocks of ``block_size`` rows,
each block has one float scale (and, asymmetric, one zero point) and ``bits``-bit integers.
The packing is ONNX Runtime's own (``DefaultWeightOnlyQuantizer.qbits_block_quant``), so
the bit layout is the one its kernels read. Activations stay float: the win is memory
traffic, which dominates single-token decode steps of large MatMuls.

What ONNX Runtime's quantizer skips and this pass handles:

* a tied LM head, ``MatMul(x, Transpose(E))`` (or ``Gemm(x, E, transB=1)``) where ``E`` is
  also the token embedding read by ``Gather(E, ids)``: ``E`` is packed once, as the
  head's ``[N=vocab, K=d_model]`` blocks, and the Gathers become ``GatherBlockQuantized``
  reading the same packed initializer, so the tied weight is stored once, in ``bits``;
* small MatMuls (fewer than ``min_elements`` weights) stay fp32 with the reason: their
  scales and the kernel switch cost more than the bytes saved;
* ``Gemm`` with a bias (``transA=0``, ``alpha=1``): MatMulNBits' bias input.

Given calibration data, these choices are made from measured error, per weight, on the
activations each MatMul multiplies (`onnxq.passes.awq`):

* activation-aware scales (AWQ-style): weight rows are packed scaled by ``s``, the input
  divided by ``s`` (a ``Mul`` before the MatMulNBits), with ``s`` searched for the least
  output error; no scaling when plain rounding is best. Not for a weight tied with an
  embedding: the Gathers read the same packed rows, whose error the scales would move to
  dimensions the head's activations make small but the lookups do not (measured: the
  tied test model's logits got worse);
* GPTQ rounding (`onnxq.passes.gptq`): the same grid, integer codes chosen so the
  layer's output error on the activations is least; kept where it beats the scale search
  on them, and always for a tied weight (only the codes change, and the lookups read
  the same packing), whose codes are chosen for what their error costs the head and the
  lookups together in the next-token distribution (`onnxq.passes.tied_gptq`);
* bits by error: a layer whose output SQNR at ``bits`` is below ``min_sqnr_db`` is
  packed in 8 bits when that meets it, else kept fp32, with the reason in the result;
* end to end: the per-layer choices are checked on the whole model (packed as chosen,
  with a tied weight rounded to nearest, and all rounded to nearest, at the same bits),
  and the packing whose outputs are closest to fp32 on the first calibration batches is
  kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import CalibrationData
from onnxq.passes.awq import (
    ALPHAS,
    ScaleChoice,
    dequantize_blocks,
    output_sqnr_db,
    quantizer,
    search_scales,
)
from onnxq.passes.gptq import gptq_pack
from onnxq.passes.results import DetailedPassResult
from onnxq.passes.tied_gptq import TiedSensitivity, measure_tied_sensitivity, tied_gptq_pack

__all__ = [
    "BITS",
    "MIN_ELEMENTS",
    "MS_DOMAIN",
    "QuantizeWeightsNBitsPass",
    "WeightOnlyResult",
    "check_block_size",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
BITS = (4, 8)
# A 64x64 weight (16 KB fp32) and smaller stays fp32: below this the packed weight saves
# a few KB while the MatMulNBits kernel runs slower than MLAS's fp32 GEMM on it.
MIN_ELEMENTS = 64 * 64


def check_block_size(block_size: int) -> None:
    """Refuses a block size MatMulNBits cannot take (a power of two >= 16).

    Raises:
        ValueError: Naming the value.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {block_size}")


@dataclasses.dataclass
class WeightOnlyResult(DetailedPassResult):
    """Weight-only quantization.

    ``details`` holds ``bits``, ``block_size``, ``symmetric``, ``quantized_nodes``,
    ``not_quantized`` (node -> why it stays fp32), ``tied`` (embedding -> the nodes sharing
    its packed weight) and ``weight_bytes`` (``before``, ``after``, ``ratio``: the bytes of
    every distinct MatMul/Gemm weight, fp32 before, packed plus scales after). Given
    calibration data, also ``activation_aware`` (node -> ``alpha``, ``bits``, output
    ``sqnr_db`` and plain rounding's ``rtn_sqnr_db`` on the calibration activations;
    ``method``: ``"gptq"`` where GPTQ's codes were kept, else ``"awq"``) and
    ``fallback`` (node -> why it was packed in 8 bits, not ``bits``).
    """


@dataclasses.dataclass
class _Weight:
    """Where a node's weight comes from: ``source`` as stored, transposed or not."""

    source: ir.Value
    transposed: bool  # True: source is [N, K] (a Transpose'd embedding, Gemm transB=1)


@dataclasses.dataclass
class _Packed:
    """One weight packed for MatMulNBits: the initializers every user of it shares."""

    weight: _Weight
    k: int
    n: int
    inputs: list[ir.Value]  # packed, scales[, zero points]
    bits: int
    block_size: int
    inv_scales: ir.Value | None = None  # 1/s of the activation-aware scales (input Mul)

    @property
    def nbytes(self) -> int:
        extra = [self.inv_scales] if self.inv_scales is not None else []
        return sum(v.const_value.nbytes for v in [*self.inputs, *extra])  # type: ignore[union-attr]


@dataclasses.dataclass
class _Plan:
    """How one weight is packed: bits (None: kept fp32, ``reason`` says why) and scales.

    ``codes``: the packing GPTQ chose (``qbits_block_quant``'s three arrays), None: rounded
    to nearest (with ``choice``'s scales, if any). ``tied``: the weight is also read by
    embedding lookups.
    """

    bits: int | None
    block_size: int
    choice: ScaleChoice | None = None
    reason: str = ""
    codes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    tied: bool = False  # the weight is also an embedding's table


@dataclasses.dataclass
class _Rewrite:
    """What packing one model did (`QuantizeWeightsNBitsPass._rewrite`)."""

    packed: dict[tuple[int, bool], _Packed] = dataclasses.field(default_factory=dict)
    quantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    before: dict[int, int] = dataclasses.field(default_factory=dict)  # id -> fp32 bytes
    kept: dict[int, int] = dataclasses.field(default_factory=dict)
    aware: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)
    fallback: dict[str, str] = dataclasses.field(default_factory=dict)
    tied: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Collected:
    """Calibration runs: activations per node, and fp32 outputs of the first batches.

    ``activations``: per MatMul/Gemm, the input it multiplies (``[rows, K]``, sampled);
    ``reference``: the first batches' feeds with the fp32 model's outputs (the
    end-to-end comparison's data).
    """

    activations: dict[str, np.ndarray]
    reference: list[tuple[dict[str, np.ndarray], list[np.ndarray]]]


# The packings compared end to end: the per-layer choices, those with a tied weight
# rounded to nearest, and every weight rounded to nearest.
_VARIANTS = ("aware", "tied-rtn", "rtn")
# Bytes of fp32 outputs kept for the end-to-end comparison (the first batches up to this).
REFERENCE_BYTES = 64 << 20


def _scaled(plan: _Plan) -> bool:
    return plan.choice is not None and plan.choice.scales is not None


def _variant(plan: _Plan, variant: str) -> _Plan:
    """``plan`` as ``variant`` packs it: data-aware codes and scales dropped, or not."""
    if variant == "aware" or (variant == "tied-rtn" and not plan.tied):
        return plan
    if plan.choice is None:
        return dataclasses.replace(plan, codes=None)
    rtn = plan.choice.rtn_sqnr_db
    return dataclasses.replace(plan, codes=None, choice=ScaleChoice(0.0, None, rtn, rtn))


def _embeddings(graph: ir.Graph) -> list[ir.Value]:
    """2-D float initializers read by ``Gather(E, ids, axis=0)``: token embeddings."""
    found = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or len(tensor.shape) != 2 or tensor.dtype != ir.DataType.FLOAT:
            continue
        if any(
            user.op_type == "Gather"
            and not user.domain
            and index == 0
            and user.attributes.get_int("axis", 0) == 0
            for user, index in value.uses()
        ):
            found.append(value)
    return found


def _tied(weight: _Weight, embeddings: Sequence[ir.Value]) -> _Weight:
    """The embedding a head weight is a copy of (transposed), else ``weight`` itself.

    Exporters and constant folding often store a tied head as its own ``[K, N]`` copy of
    the embedding ``E [N, K]`` (a folded ``Transpose(E)``): packing ``E`` instead lets the
    head and the embedding share one packed weight, and the copy goes.
    """
    array = weight.source.const_value.numpy()  # type: ignore[union-attr]
    head = array if weight.transposed else array.T  # [N, K]
    for e in embeddings:
        if e is weight.source:
            return weight
        if tuple(e.shape or ()) == head.shape and np.array_equal(e.const_value.numpy(), head):  # type: ignore[union-attr]
            return _Weight(e, transposed=True)
    return weight


class QuantizeWeightsNBitsPass(ir.passes.InPlacePass):
    """Stores MatMul/Gemm weights block-wise in ``bits`` as MatMulNBits (weight-only).

    Args:
        bits: 4 or 8.
        block_size: Rows of ``W`` per scale, a power of two >= 16.
        symmetric: No zero points (signed range); False stores a zero point per block.
        accuracy_level: MatMulNBits' ``accuracy_level`` (None: ONNX Runtime's default).
        min_elements: Weights with fewer elements stay fp32.
        exclude: Node names kept fp32.
        calibration: Data to run the model on: the activations each MatMul multiplies
            decide its scales and bits (None: plain round-to-nearest at ``bits``).
        min_sqnr_db: With ``calibration``: a layer whose output SQNR is below this at
            ``bits`` goes to 8 bits, or stays fp32 when 8 bits also miss it (None: no
            fallback).
        provider: Execution provider the activations are collected with.
        max_rows: Activation rows (tokens) kept per MatMul for the search (seeded sample).
        gptq: With ``calibration``: GPTQ rounding (`onnxq.passes.gptq`) competes with the
            scale search for every weight and is kept where its output error is lower; a
            weight tied with an embedding, which cannot take scales, always takes it. Not
            for a weight with fewer calibration rows (tokens) than inputs ``K``. False:
            activation-aware scales only (round-to-nearest for a tied weight).
        tied_block_size: Block size of a weight tied with an embedding (None:
            ``block_size``): the head is the largest weight and the lookups read it too, so
            finer blocks there buy fidelity for few bytes.
        end_to_end: With ``calibration``: the per-layer choices are kept only if the
            whole model's outputs on the first calibration batches are at least as close
            to fp32 as with a tied weight, or every weight, rounded to nearest (see
            ``_end_to_end``); False: per-layer choices as made.
        lookup_aware: With ``calibration`` and GPTQ: a weight tied with an embedding is
            rounded for what its error costs the head and the lookups together, in the
            next-token distribution (`onnxq.passes.tied_gptq`); False: for the head alone.
    """

    def __init__(
        self,
        bits: int = 4,
        block_size: int = 32,
        *,
        symmetric: bool = False,
        accuracy_level: int | None = None,
        min_elements: int = MIN_ELEMENTS,
        exclude: Sequence[str] = (),
        calibration: CalibrationData | None = None,
        min_sqnr_db: float | None = None,
        provider: str = "cpu",
        max_rows: int = 4096,
        gptq: bool = True,
        tied_block_size: int | None = None,
        end_to_end: bool = True,
        lookup_aware: bool = True,
    ) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        check_block_size(block_size)
        if tied_block_size is not None:
            check_block_size(tied_block_size)
        self.bits = bits
        self.block_size = block_size
        self.symmetric = symmetric
        self.accuracy_level = accuracy_level
        self.min_elements = min_elements
        self.exclude = tuple(exclude)
        self.calibration = calibration
        self.min_sqnr_db = min_sqnr_db
        self.provider = provider
        self.max_rows = max_rows
        self.gptq = gptq
        self.tied_block_size = tied_block_size or block_size
        self.end_to_end = end_to_end
        self.lookup_aware = lookup_aware
        self._sensitivity: dict[str, TiedSensitivity] = {}
        self._quantizers = {
            (b, size): quantizer(b, size, symmetric)
            for b in BITS
            for size in {block_size, self.tied_block_size}
        }
        self._activations: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{type(self).__name__}(bits={self.bits}, block_size={self.block_size}, {kind})"

    def call(self, model: ir.Model) -> WeightOnlyResult:
        collected = self._collect(model) if self.calibration is not None else None
        self._activations = collected.activations if collected is not None else {}
        self._sensitivity = {}
        if collected is not None and collected.reference and self.gptq and self.lookup_aware:
            self._sensitivity = self._measure_tied(model, [f for f, _ in collected.reference])
        planned: dict[tuple[str, bool], _Plan] = {}
        end_to_end: dict[str, Any] | None = None
        variant = "aware"
        if collected is not None and collected.reference and self.end_to_end:
            end_to_end = self._end_to_end(model, planned, collected.reference)
            variant = end_to_end["chosen"] if end_to_end else variant
        done = self._rewrite(model, planned, variant)
        after = sum(p.nbytes for p in done.packed.values()) + sum(done.kept.values())
        total = sum(done.before.values())
        details = {
            "bits": self.bits,
            "block_size": self.block_size,
            "tied_block_size": self.tied_block_size,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level,
            "quantized_nodes": done.quantized,
            "not_quantized": done.skipped,
            "tied": done.tied,
            **(
                {"activation_aware": done.aware, "fallback": done.fallback}
                if self.calibration
                else {}
            ),
            **({"end_to_end": end_to_end} if end_to_end else {}),
            "weight_bytes": {
                "before": total,
                "after": after,
                "ratio": total / after if after else None,
            },
        }
        logger.info(
            "weight-only int%d: %d MatMul/Gemm quantized, %d kept fp32, weights %d -> %d bytes",
            self.bits,
            len(done.quantized),
            len(done.skipped),
            total,
            after,
        )
        return WeightOnlyResult(model, modified=bool(done.quantized), details=details)

    def _rewrite(
        self, model: ir.Model, planned: dict[tuple[str, bool], _Plan], variant: str
    ) -> _Rewrite:
        """Packs every eligible weight of ``model`` as ``planned`` (planning what is not).

        ``variant``: ``"aware"`` packs the plans as chosen per weight; ``"tied-rtn"`` packs
        a weight tied with an embedding by plain rounding (the lookups read its codes too);
        ``"rtn"`` packs every weight by plain rounding, keeping only the bits chosen.
        """
        graph = model.graph
        done = _Rewrite()
        embeddings = _embeddings(graph)
        for node in list(graph):
            if node.domain or node.op_type not in ("MatMul", "Gemm"):
                continue
            weight, why = self._weight_of(node)
            if weight is None:
                done.skipped[node.name] = why
                continue
            nbytes = weight.source.const_value.nbytes  # type: ignore[union-attr]
            done.before[id(weight.source)] = nbytes  # as stored: a head's own copy counts
            weight = _tied(weight, embeddings)
            k, n = self._kn(weight)
            why = self._too_small(node, k, n)
            if why:
                done.skipped[node.name] = why
                done.kept[id(weight.source)] = nbytes
                continue
            is_tied = weight.source in embeddings
            key = (weight.source.name or "", weight.transposed)
            if key not in planned:
                planned[key] = self._plan(node, weight, tied=is_tied)
            plan = _variant(planned[key], variant)
            if (id(weight.source), weight.transposed) not in done.packed:
                choice = plan.choice
                if choice is not None:
                    done.aware[node.name] = {
                        "method": "gptq" if plan.codes is not None else "awq",
                        "alpha": choice.alpha,
                        "bits": plan.bits or 32,
                        "sqnr_db": round(choice.sqnr_db, 2),
                        "rtn_sqnr_db": round(choice.rtn_sqnr_db, 2),
                    }
            if plan.bits is None:
                done.skipped[node.name] = plan.reason
                done.kept[id(weight.source)] = nbytes
                continue
            if plan.bits != self.bits:
                done.fallback[node.name] = plan.reason
            packed_key = (id(weight.source), weight.transposed)
            if packed_key not in done.packed:
                done.packed[packed_key] = self._pack(graph, weight, k, n, plan)
            self._replace(graph, node, done.packed[packed_key])
            done.quantized.append(node.name)
        done.tied = self._share_with_gathers(graph, done.packed)
        if done.quantized:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return done

    def _measure_tied(
        self, model: ir.Model, feeds: list[dict[str, np.ndarray]]
    ) -> dict[str, TiedSensitivity]:
        """Per embedding tied with a head: what its rounding costs (`tied_gptq`)."""
        embeddings = _embeddings(model.graph)
        found: dict[str, TiedSensitivity] = {}
        for node in model.graph:
            if node.domain or node.op_type not in ("MatMul", "Gemm"):
                continue
            weight, _ = self._weight_of(node)
            if weight is None:
                continue
            weight = _tied(weight, embeddings)
            name = weight.source.name or ""
            if weight.source not in embeddings or name in found:
                continue
            if self._too_small(node, *self._kn(weight)):
                continue
            gathers = [
                user
                for user, index in weight.source.uses()
                if user.op_type == "Gather" and not user.domain and index == 0
            ]
            measured = measure_tied_sensitivity(model, node, gathers, feeds, provider=self.provider)
            if measured is not None:
                found[name] = measured
        return found

    def _end_to_end(
        self,
        model: ir.Model,
        planned: dict[tuple[str, bool], _Plan],
        reference: list[tuple[dict[str, np.ndarray], list[np.ndarray]]],
    ) -> dict[str, Any] | None:
        """Which packing keeps the model's outputs closest to fp32 on calibration data.

        Each layer's choice (GPTQ codes, activation-aware scales) is made on that layer's
        output error alone; whether the choices together beat plain rounding is a property
        of the whole model (a tied weight's codes also feed the embedding lookups, which
        the head's error measure does not see). So the model is packed each way, run on
        the first calibration batches, and the variant with the highest output SQNR is
        kept (ties go to the per-layer choices). None: no layer made a data-aware choice.
        """
        scores: dict[str, float] = {}
        for variant in _VARIANTS:
            # The plans exist once the first variant is packed: a tied weight without GPTQ
            # codes packs the same either way.
            if variant == "tied-rtn" and not any(
                p.tied and p.codes is not None for p in planned.values()
            ):
                continue
            trial = model.clone()
            done = self._rewrite(trial, planned, variant)
            if not done.quantized:
                return None
            if variant == "aware" and not any(
                p.codes is not None or _scaled(p) for p in planned.values()
            ):
                return None
            scores[variant] = self._output_sqnr(trial, reference)
        chosen = max(scores, key=lambda v: (scores[v], v == "aware"))
        if chosen != "aware":
            logger.info(
                "weight-only: %s packing kept (end-to-end output SQNR %.2f dB vs %.2f dB for "
                "the per-layer choices)",
                chosen,
                scores[chosen],
                scores["aware"],
            )
        return {"sqnr_db": {v: round(d, 2) for v, d in scores.items()}, "chosen": chosen}

    def _output_sqnr(
        self,
        model: ir.Model,
        reference: list[tuple[dict[str, np.ndarray], list[np.ndarray]]],
    ) -> float:
        """SQNR (dB) of ``model``'s float outputs against fp32's, over ``reference``."""
        from onnxq.runtime import create_session

        session = create_session(model, provider=self.provider)
        signal = noise = 0.0
        for feeds, expected in reference:
            for ref, got in zip(expected, session.run(None, feeds), strict=True):
                if not np.issubdtype(ref.dtype, np.floating):
                    continue
                ref64 = np.asarray(ref, np.float64)
                signal += float(np.sum(ref64**2))
                noise += float(np.sum((ref64 - got) ** 2))
        if noise == 0.0:
            return float("inf")
        return 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")

    # ------------------------------------------------------------------ finding weights

    def _weight_of(self, node: ir.Node) -> tuple[_Weight | None, str]:
        """The node's constant weight, or None and why the node stays as it is."""
        if node.name in self.exclude:
            return None, "excluded"
        b = node.inputs[1] if len(node.inputs) > 1 else None
        if b is None:
            return None, "no weight input"
        transposed = False
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
                return None, "Gemm with transA or alpha != 1 has no MatMulNBits form"
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and (
                attrs.get_float("beta", 1.0) != 1.0
                or bias.const_value is None
                or len(bias.const_value.shape) != 1
            ):
                return None, "Gemm bias is not a constant vector (MatMulNBits' bias is [N])"
            transposed = bool(attrs.get_int("transB", 0))
        producer = b.producer()
        if b.const_value is None and producer is not None and producer.op_type == "Transpose":
            # MatMul(x, Transpose(E)): the tied LM head. Only a plain 2-D transpose.
            perm = producer.attributes.get_ints("perm", None)
            source = producer.inputs[0]
            plain = perm is None or list(perm) == [1, 0]
            if source is not None and source.const_value is not None and plain:
                b, transposed = source, not transposed
        if b.const_value is None or b.is_graph_input():
            return None, "B is an activation, not a constant weight (left as is)"
        tensor = b.const_value
        if len(tensor.shape) != 2:
            return None, f"weight of rank {len(tensor.shape)}: MatMulNBits takes 2-D weights"
        if tensor.dtype != ir.DataType.FLOAT:
            return None, f"{tensor.dtype.name} weight: only float32 weights are quantized"
        return _Weight(b, transposed), ""

    @staticmethod
    def _kn(weight: _Weight) -> tuple[int, int]:
        rows, cols = weight.source.const_value.shape  # type: ignore[union-attr]
        return (cols, rows) if weight.transposed else (rows, cols)

    def _too_small(self, node: ir.Node, k: int, n: int) -> str:
        if k * n < self.min_elements:
            return (
                f"small: {k}x{n} weights < {self.min_elements}; the packed kernel would not "
                "beat fp32 GEMM and saves little"
            )
        a = node.inputs[0]
        if a is not None and a.shape is not None and len(a.shape) == 0:
            return "scalar input"
        return ""

    # ------------------------------------------------------------------ rewriting

    # ------------------------------------------------------------------ measured choices

    def _collect(self, model: ir.Model) -> _Collected:
        """Runs the calibration data: activations per MatMul (sampled), fp32 outputs."""
        from onnxq.runtime import Probe

        wanted: dict[str, str] = {}  # input value name -> a node reading it
        for node in model.graph:
            if node.domain or node.op_type not in ("MatMul", "Gemm"):
                continue
            weight, _ = self._weight_of(node)
            a = node.inputs[0]
            if weight is not None and a is not None and a.name:
                wanted.setdefault(a.name, node.name)
        if not wanted:
            return _Collected({}, [])
        outputs = [v.name for v in model.graph.outputs]
        probe = Probe(
            model,
            lambda graph: (
                [v for n in graph for v in n.outputs if v.name in wanted]
                + [v for v in graph.inputs if v.name in wanted]
                + list(graph.outputs)
            ),
            provider=self.provider,
        )
        rows: dict[str, list[np.ndarray]] = {}
        reference: list[tuple[dict[str, np.ndarray], list[np.ndarray]]] = []
        kept_bytes = 0
        for batch in self.calibration.batches():  # type: ignore[union-attr]
            got = probe.run(batch)
            for name, array in got.items():
                if name in wanted:
                    array = np.asarray(array, np.float32)
                    rows.setdefault(name, []).append(array.reshape(-1, array.shape[-1]))
            if kept_bytes < REFERENCE_BYTES:
                expected = [np.asarray(got[name]) for name in outputs]
                reference.append((dict(batch), expected))
                kept_bytes += sum(a.nbytes for a in expected)
        rng = np.random.default_rng(0)
        by_input = {}
        for name, parts in rows.items():
            x = np.concatenate(parts)
            if len(x) > self.max_rows:
                x = x[np.sort(rng.choice(len(x), self.max_rows, replace=False))]
            by_input[name] = x
        activations = {
            node.name: by_input[node.inputs[0].name]
            for node in model.graph
            if node.op_type in ("MatMul", "Gemm")
            and node.inputs[0] is not None
            and node.inputs[0].name in by_input
        }
        return _Collected(activations, reference)

    def _plan(self, node: ir.Node, weight: _Weight, *, tied: bool) -> _Plan:
        return dataclasses.replace(self._plan_bits(node, weight, tied=tied), tied=tied)

    def _plan_bits(self, node: ir.Node, weight: _Weight, *, tied: bool) -> _Plan:
        """Scales and bits from the output error on the node's activations (given data).

        ``tied``: the weight is also an embedding's table (no scales, see the module).
        """
        size = self.tied_block_size if tied else self.block_size
        x = self._activations.get(node.name)
        if x is None:
            return _Plan(self.bits, size)
        w = self._matrix(weight)
        alphas = (0.0,) if tied else ALPHAS
        name = weight.source.name or ""

        def search(bits: int) -> ScaleChoice:
            return search_scales(x, w, self._quantizers[bits, size], alphas)

        choice = search(self.bits)
        codes = None
        # Fewer activation rows than inputs: H = X^T X is singular, GPTQ fits the rows it
        # is measured on (its SQNR there says little about other inputs): scales only.
        use_gptq = self.gptq and len(x) >= w.shape[0]
        if use_gptq:
            codes, choice = self._gptq(x, w, (self.bits, size), choice, tied=tied, name=name)
        floor = self.min_sqnr_db
        if floor is None or choice.sqnr_db >= floor:
            return _Plan(self.bits, size, choice, codes=codes)
        missed = (
            f"int{self.bits} output SQNR {choice.sqnr_db:.1f} dB < {floor:g} dB on the "
            "calibration activations"
        )
        if self.bits == 4:
            wider = search(8)
            wider_codes = None
            if use_gptq:
                wider_codes, wider = self._gptq(x, w, (8, size), wider, tied=tied, name=name)
            if wider.sqnr_db >= floor:
                return _Plan(8, size, wider, f"{missed}; int8 {wider.sqnr_db:.1f} dB", wider_codes)
            missed += f"; int8 {wider.sqnr_db:.1f} dB"
        return _Plan(None, size, choice, f"{missed}: kept fp32")

    def _gptq(
        self,
        x: np.ndarray,
        w: np.ndarray,
        key: tuple[int, int],
        choice: ScaleChoice,
        *,
        tied: bool,
        name: str = "",
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, ScaleChoice]:
        """GPTQ's packing when it beats ``choice`` on ``x`` (always for a tied weight).

        A tied weight cannot take activation-aware scales (see the module), so GPTQ, which
        changes only the integer codes, is its one data-aware choice; elsewhere it competes
        with the scale search on the output error it minimises.
        """
        quant = self._quantizers[key]
        bits, size = key
        sensitivity = self._sensitivity.get(name) if tied else None
        if sensitivity is not None:
            codes = tied_gptq_pack(w, quant, sensitivity)
        else:
            codes = gptq_pack(x, w, quant)
        zp = None if self.symmetric else codes[2]
        approx = x @ dequantize_blocks(codes[0], codes[1], zp, w.shape[0], bits, size)
        sqnr = output_sqnr_db(x @ w, approx)
        if not tied and sqnr <= choice.sqnr_db:
            return None, choice
        return codes, ScaleChoice(0.0, None, sqnr, choice.rtn_sqnr_db)

    @staticmethod
    def _matrix(weight: _Weight) -> np.ndarray:
        array = weight.source.const_value.numpy()  # type: ignore[union-attr]
        return np.ascontiguousarray(array.T if weight.transposed else array, dtype=np.float32)

    def _pack(self, graph: ir.Graph, weight: _Weight, k: int, n: int, plan: _Plan) -> _Packed:
        """Packs ``W [K, N]`` with ONNX Runtime's block quantizer; adds the initializers."""
        bits = plan.bits or self.bits
        w = self._matrix(weight)
        scales = plan.choice.scales if plan.choice is not None else None
        if scales is not None:
            w = w * scales[:, None]
        if plan.codes is not None:
            data, block_scales, zero_points = plan.codes
        else:
            quant = self._quantizers[bits, plan.block_size]
            data, block_scales, zero_points = quant.qbits_block_quant(w)
        stem = (weight.source.name or "weight") + ("_T" if weight.transposed else "")
        arrays = [(f"{stem}_q{bits}", data), (f"{stem}_scales", block_scales)]
        if not self.symmetric:
            arrays.append((f"{stem}_zero_points", zero_points))
        values = [self._constant(graph, name, arr) for name, arr in arrays]
        inverse = None
        if scales is not None:
            inverse = self._constant(
                graph, f"{stem}_awq_inv_scales", (1.0 / scales).astype(np.float32)
            )
        return _Packed(weight, k, n, values, bits, plan.block_size, inverse)

    def _replace(self, graph: ir.Graph, node: ir.Node, packed: _Packed) -> None:
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        new_nodes = []
        a = node.inputs[0]
        if packed.inv_scales is not None:  # x / s: the weight rows were packed times s
            new_nodes.append(ir.node("Mul", [a, packed.inv_scales], name=f"{node.name}_awq"))
            a = new_nodes[-1].outputs[0]
        inputs: list[ir.Value | None] = [a, *packed.inputs]
        if bias is not None:
            # MatMulNBits inputs: A, B, scales, zero_points, g_idx, bias.
            inputs += [None] * (5 - len(inputs)) + [bias]
        attributes: dict[str, int] = {
            "K": packed.k,
            "N": packed.n,
            "bits": packed.bits,
            "block_size": packed.block_size,
        }
        if self.accuracy_level is not None:
            attributes["accuracy_level"] = self.accuracy_level
        new = ir.node(
            "MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{node.name}_Q{packed.bits}"
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [*new_nodes, new], [node.outputs[0]], [new.outputs[0]]
        )

    def _share_with_gathers(
        self, graph: ir.Graph, packed: dict[tuple[int, bool], _Packed]
    ) -> dict[str, list[str]]:
        """Token-embedding Gathers of a packed tied weight read the packed blocks.

        The head's ``[N=vocab, K=d_model]`` packing is the embedding's rows, blocked
        along ``d_model``: ``GatherBlockQuantized`` (quantize_axis 1) reads it through a
        Reshape to ``[vocab, -1]``, so the fp32 embedding need not be kept.
        """
        tied: dict[str, list[str]] = {}
        for p in packed.values():
            source = p.weight.source
            if not p.weight.transposed:
                continue
            gathers = [
                user
                for user, index in source.uses()
                if user.op_type == "Gather"
                and not user.domain
                and index == 0
                and user.attributes.get_int("axis", 0) == 0
            ]
            for gather in gathers:
                shape = self._constant(
                    graph, f"{p.inputs[0].name}_rows", np.array([p.n, -1], dtype=np.int64)
                )
                reshape = ir.node("Reshape", [p.inputs[0], shape], name=f"{gather.name}_rows")
                inputs = [reshape.outputs[0], gather.inputs[1], p.inputs[1]]
                if len(p.inputs) > 2:
                    inputs.append(p.inputs[2])
                new = ir.node(
                    "GatherBlockQuantized",
                    inputs,
                    {
                        "gather_axis": 0,
                        "quantize_axis": 1,
                        "block_size": p.block_size,
                        "bits": p.bits,
                    },
                    domain=MS_DOMAIN,
                    name=f"{gather.name}_Q{p.bits}",
                )
                ir.convenience.replace_nodes_and_values(
                    graph, gather, [gather], [reshape, new], [gather.outputs[0]], [new.outputs[0]]
                )
            if gathers:
                tied[source.name or ""] = [user.name or "" for user, _ in p.inputs[1].uses()]
        return tied

    @staticmethod
    def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        """An initializer ``name`` holding ``array`` (registered once per name)."""
        existing = graph.initializers.get(name)
        if existing is not None:
            return existing
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.dtype = value.const_value.dtype  # type: ignore[union-attr]
        graph.register_initializer(value)
        return value
