"""Latency-aware placement: int8 only where ONNX Runtime fuses it, and only when it is faster.

Two steps, both on the machine that compiles:

1. Structure (no timing). ONNX Runtime turns ``DQ -> op -> Q`` node units into int8
   kernels (QLinearConv, QGemm, MatMulIntegerToFloat, ...) when it creates a session; a
   unit it does not fuse runs its fp32 kernel behind standalone DequantizeLinear nodes, so
   its Q/DQ are pure overhead. The session's optimised graph (``optimized_model_filepath``
   at ``ORT_ENABLE_ALL``) says which units fused. Unfused units, and int8 regions (units
   joined by integer tensors) without any multiply-accumulate kernel, whose entry Q, exit
   DQ and layout changes cannot pay for themselves, are kept fp32 through
   ``InsertQDQPass(keep_fp32=...)``; repeated until the placement is stable, since a
   reverted unit can isolate its neighbours.
2. Measurement. The placement is timed against onnxq's own optimised fp32 model (the
   baseline ``--no-quantize`` writes) interleaved at batch 1, and ``decide`` applies one
   documented rule to the paired bootstrap interval of the speedup (see ``decide``).
   The input model is timed too, for the report: in the same rounds, or, when holding
   its session beside the other two would take too much memory, in a second pair with
   int8 (see ``timing_plan``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import runtime
from onnxq.bench import physical_cores
from onnxq.bootstrap import bootstrap_speedup, ci95
from onnxq.io import save_model, unmap_external_data
from onnxq.numerics import Numerics
from onnxq.passes.qdq import INT8_OPS, SHARED_SCALE_OPS

__all__ = [
    "MIN_GAIN",
    "Decision",
    "FusionAnalysis",
    "LatencyPlacement",
    "Region",
    "Requantizer",
    "TimedRounds",
    "TimingPlan",
    "analyze_fusion",
    "decide",
    "int8_heads",
    "measure_latency",
    "place_for_latency",
    "place_structurally",
    "reversions",
    "time_against_fp32",
    "time_models",
    "time_weight_only",
    "timing_plan",
]

logger = logging.getLogger(__name__)

# ONNX Runtime's int8 kernels (CPU provider, QDQ fusion results).
_MAC_KERNELS = frozenset(
    {
        "QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
        "ConvInteger", "DynamicQuantizeMatMul", "QAttention", "NhwcQLinearConv",
    }
)  # fmt: skip
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_LAYOUT = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})
# Names ONNX Runtime gives the nodes it creates from a node named N: "N_token_3" (layout
# transformation), "fused N" (activation fusion).
_GENERATED_SUFFIX = re.compile(r"(_token_\d+)+$")
_GENERATED_PREFIX = "fused "

# A candidate keeps int8 only if its speedup over fp32 reaches 1 + MIN_GAIN (and its 95%
# interval excludes being slower): a gain under 2% is not worth int8's accuracy loss.
MIN_GAIN = 0.02

# Timing the input, optimised fp32 and int8 models in one set of rounds holds a session of
# each at once. ONNX Runtime's CPU session holds about a model's weights once more than the
# file (pre-packed copies), and while it is created twice that (the weights read, then
# packed). Past this share of the memory the OS reports available, the latency step times
# two pairs instead (fp32 + int8, then input + int8), so the two fp32-sized sessions are
# never alive together. A quarter, because the compile still holds its own IR models (the
# fp32 weights and their int8 copy) beside the sessions, and the machine has neighbours.
TOGETHER_MEMORY_SHARE = 0.25

_NOT_FUSED = "ONNX Runtime runs it as fp32 {op} (no fused int8 kernel): its Q/DQ are pure overhead"
_NO_MAC = (
    "int8 region without a multiply-accumulate kernel ({members}): its {boundary} standalone "
    "Q/DQ/layout nodes cost more than it saves"
)


def _is_int8_kernel(op_type: str) -> bool:
    return op_type in _MAC_KERNELS or op_type.startswith("QLinear")


def _original_name(name: str) -> str:
    name = name.removeprefix(_GENERATED_PREFIX)
    return _GENERATED_SUFFIX.sub("", name)


def int8_heads(model: ir.Model) -> dict[str, str]:
    """Returns ``{node name: op type}`` of the int8 unit heads of a QDQ model.

    A head is an op with an int8 kernel that reads a DequantizeLinear output (its
    activation or its weight); data-movement ops and fused activations are not heads.
    """
    heads = {}
    for node in model.graph:
        if node.op_type not in INT8_OPS or node.op_type in SHARED_SCALE_OPS:
            continue
        if any(
            v is not None
            and v.producer() is not None
            and v.producer().op_type == "DequantizeLinear"
            for v in node.inputs
        ):
            heads[node.name or node.op_type] = node.op_type
    return heads


@dataclasses.dataclass
class Region:
    """int8 kernels joined by integer tensors in ONNX Runtime's optimised graph.

    Attributes:
        members: Original node names of the region's int8 kernels.
        kernels: Op type of each member's kernel.
        boundary: Standalone QuantizeLinear/DequantizeLinear and layout nodes at its edges.
    """

    members: list[str]
    kernels: dict[str, str]
    boundary: dict[str, int]

    @property
    def has_mac(self) -> bool:
        """Whether some member is a multiply-accumulate kernel (where int8 saves time)."""
        return any(op in _MAC_KERNELS for op in self.kernels.values())


@dataclasses.dataclass
class FusionAnalysis:
    """What ONNX Runtime made of a QDQ model's int8 units.

    Attributes:
        fused: Head name -> the int8 kernel it became.
        unfused: Head name -> the fp32 op ONNX Runtime runs instead.
        unknown: Heads not found by name in the optimised graph (left as they are).
        regions: The int8 regions.
        standalone: Counts of standalone Q, DQ and layout nodes in the optimised graph.
        error: Why ONNX Runtime's optimised graph could not be read (then every head is
            unknown and nothing is reverted).
    """

    fused: dict[str, str]
    unfused: dict[str, str]
    unknown: list[str]
    regions: list[Region]
    standalone: dict[str, int]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form for the compile report."""
        return {
            "fused": len(self.fused),
            "unfused": dict(sorted(self.unfused.items())),
            "unknown": sorted(self.unknown),
            "regions": len(self.regions),
            "regions_without_mac": [r.members for r in self.regions if not r.has_mac],
            "standalone": dict(self.standalone),
            **({"error": self.error} if self.error else {}),
        }


def _optimized_graph(model: ir.Model | str | os.PathLike, tmp: Path) -> onnx.GraphProto:
    path = tmp / "ort-optimized.onnx"
    runtime.create_session(model, optimization="all", threads=1, optimized_model_path=path)
    return onnx.load(str(path), load_external_data=False).graph


def analyze_fusion(model: ir.Model) -> FusionAnalysis:
    """Creates an ONNX Runtime session for ``model`` and reads which int8 units it fused.

    Args:
        model: A QDQ model (as ``InsertQDQPass`` writes it).
    """
    heads = int8_heads(model)
    with tempfile.TemporaryDirectory(prefix="onnxq-placement-") as tmp:
        try:
            graph = _optimized_graph(model, Path(tmp))
        except Exception as e:  # ORT raises several unrelated types (e.g. > 2 GB output)
            logger.warning("cannot read ONNX Runtime's optimised graph, nothing reverted: %s", e)
            return FusionAnalysis({}, {}, list(heads), [], {}, error=str(e).splitlines()[0])
    nodes = list(graph.node)
    by_name: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in nodes:
        by_name[_original_name(node.name)].append(node)
    fused, unfused, unknown = {}, {}, []
    for head in heads:
        ops = [n.op_type for n in by_name.get(head, [])]
        kernel = next((op for op in ops if _is_int8_kernel(op)), None)
        if kernel is not None:
            fused[head] = kernel
        elif ops:
            unfused[head] = ops[0]
        else:
            unknown.append(head)
    standalone = collections.Counter(
        n.op_type for n in nodes if n.op_type in _QDQ or n.op_type in _LAYOUT
    )
    return FusionAnalysis(fused, unfused, unknown, _regions(nodes), dict(standalone))


def _float_output(node: onnx.NodeProto) -> bool:
    """int8 kernels that dequantize their own output (QGemm without an output scale)."""
    if node.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        return True
    return node.op_type == "QGemm" and (len(node.input) < 8 or not node.input[7])


def _regions(nodes: Sequence[onnx.NodeProto]) -> list[Region]:
    """Groups int8 kernels connected by integer tensors (through data-movement nodes).

    A tensor is integer when a QuantizeLinear or an int8 kernel produces it, or a node
    that reads an integer tensor (MaxPool, Transpose, Flatten, ...) passes one on; Q and
    DQ nodes are the regions' edges, not members.
    """
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in nodes:
        for name in n.input:
            consumers[name].append(n)
    integer: set[str] = set()
    members = []
    for n in nodes:  # ONNX Runtime writes nodes in topological order
        if n.op_type == "QuantizeLinear":
            integer.update(n.output)
        elif n.op_type != "DequantizeLinear" and (
            _is_int8_kernel(n.op_type) or any(t in integer for t in n.input)
        ):
            members.append(n)
            if not _float_output(n):
                integer.update(n.output)
    parent = {id(n): id(n) for n in members}

    def find(key: int) -> int:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for tensor in integer:
        linked = [n for n in (*consumers[tensor], producer.get(tensor)) if id(n) in parent]
        for other in linked[1:]:
            parent[find(id(other))] = find(id(linked[0]))
    groups: dict[int, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in members:
        groups[find(id(n))].append(n)
    regions = []
    for group in groups.values():
        tensors = {t for n in group for t in (*n.input, *n.output)}
        qdq = {
            id(n): n
            for t in tensors
            for n in (*consumers[t], producer.get(t))
            if n is not None and n.op_type in _QDQ
        }
        edges = [*qdq.values(), *(n for n in group if n.op_type in _LAYOUT)]
        kernels = {_original_name(n.name): n.op_type for n in group if _is_int8_kernel(n.op_type)}
        boundary = collections.Counter(n.op_type for n in edges)
        regions.append(Region(sorted(kernels), kernels, dict(boundary)))
    return [r for r in regions if r.kernels]


def reversions(analysis: FusionAnalysis) -> dict[str, str]:
    """Returns ``{head name: reason}`` for the units that should stay fp32.

    Unfused units, and every member of a region without a multiply-accumulate kernel.
    """
    keep = {name: _NOT_FUSED.format(op=op) for name, op in analysis.unfused.items()}
    for region in analysis.regions:
        if region.has_mac:
            continue
        reason = _NO_MAC.format(
            members=", ".join(region.members), boundary=sum(region.boundary.values())
        )
        for name in region.members:
            keep.setdefault(name, reason)
    return keep


class Requantizer:
    """Re-runs QDQ insertion on copies of one calibrated fp32 model with more nodes fp32.

    Args:
        calibrated: The fp32 model after CalibrateRangesPass (ranges in ``value.meta``);
            it is never modified.
        numerics: Integer formats (as the compile used).
        exclude: ``--exclude`` patterns (as the compile used).
        op_types: ``--op-types`` (as the compile used).
        prevent_skip_layernorm: fp32 residual Adds before LayerNormalization as Sum (ONNX
            Runtime's CPU provider; see `onnxq.mixed_precision.quantize_clone`).

    Attributes:
        summary: The ``InsertQDQPass`` summary of the last model built.
    """

    def __init__(
        self,
        calibrated: ir.Model,
        numerics: Numerics,
        *,
        exclude: Sequence[str] = (),
        op_types: Sequence[str] = (),
        prevent_skip_layernorm: bool = False,
    ) -> None:
        self.calibrated = calibrated
        self.numerics = numerics
        self.exclude = tuple(exclude)
        self.op_types = tuple(op_types)
        self.prevent_skip_layernorm = prevent_skip_layernorm
        self.summary: dict[str, Any] = {}

    def __call__(self, keep_fp32: Mapping[str, str]) -> ir.Model:
        """Returns a new int8 model with ``keep_fp32`` nodes left fp32 (reasons reported)."""
        from onnxq.mixed_precision import quantize_clone

        model, qdq = quantize_clone(
            self.calibrated,
            self.numerics,
            keep_fp32,
            exclude=self.exclude,
            op_types=self.op_types,
            prevent_skip_layernorm=self.prevent_skip_layernorm,
        )
        self.summary = qdq.details
        return model


def place_structurally(
    quantize: Callable[[Mapping[str, str]], ir.Model],
    model: ir.Model,
    keep_fp32: Mapping[str, str] = (),
    *,
    max_rounds: int = 4,
) -> tuple[ir.Model, dict[str, str], FusionAnalysis]:
    """Keeps fp32 the units ONNX Runtime would not run as int8, until none is left.

    Args:
        quantize: Builds the int8 model for a ``keep_fp32`` mapping (e.g. a Requantizer).
        model: The int8 model ``quantize(keep_fp32)`` returns (already built).
        keep_fp32: Nodes already kept fp32 (by the user or the accuracy search).
        max_rounds: Bound on analyse-and-requantize rounds.

    Returns:
        The final int8 model, the nodes this step reverted (name -> reason), and the
        analysis of the final model.
    """
    keep = dict(keep_fp32)
    reverted: dict[str, str] = {}
    analysis = analyze_fusion(model)
    for _ in range(max_rounds):
        new = {k: v for k, v in reversions(analysis).items() if k not in keep}
        if not new:
            break
        logger.info("Keeping %d int8 units fp32: %s", len(new), new)
        keep.update(new)
        reverted.update(new)
        model = quantize(keep)
        analysis = analyze_fusion(model)
    return model, reverted, analysis


# ---------------------------------------------------------------------------- measurement


@dataclasses.dataclass(frozen=True)
class Decision:
    """The emit decision: which candidate ships, with the numbers behind it.

    Attributes:
        choice: ``"fp32"`` or the label of the int8 candidate that ships.
        speedups: Label -> median fp32 time / median candidate time.
        intervals: Label -> 95% bootstrap interval of that speedup (paired rounds).
        reason: One line saying why.
        rule: The decision rule, in words.
    """

    choice: str
    speedups: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    reason: str
    rule: str = (
        f"int8 ships when the upper end of the 95% bootstrap interval of fp32/int8 median "
        f"time (paired interleaved rounds) reaches {1 + MIN_GAIN:g}; else optimised fp32"
    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "choice": self.choice,
            "speedups": dict(self.speedups),
            "speedup_ci95": {k: list(v) for k, v in self.intervals.items()},
            "reason": self.reason,
            "rule": self.rule,
        }


def decide(
    fp32_ms: np.ndarray,
    candidates: Mapping[str, np.ndarray],
    *,
    min_gain: float = MIN_GAIN,
    seed: int = 0,
) -> Decision:
    """Chooses optimised fp32 or the fastest int8 candidate from paired timings.

    The promise is a model never slower than the optimised fp32, so the rule errs toward
    fp32 under noise: a candidate is eligible when its speedup (fp32 median / candidate
    median) is at least ``1 + min_gain`` and the lower end of the 95% bootstrap interval
    (rounds resampled as pairs) is at least 1, i.e. it is not slower within the noise. (An
    earlier rule shipped int8 unless it was clearly slower: on a loaded machine a table
    recogniser's int8 shipped and measured 0.84x its fp32.) The eligible candidate with the
    largest point speedup ships; with none eligible, fp32 ships.

    Args:
        fp32_ms: Per-round latencies of the optimised fp32 model.
        candidates: Label -> per-round latencies of an int8 candidate (same rounds).
        min_gain: Smallest speedup worth int8 (see ``MIN_GAIN``).
        seed: Bootstrap seed (the decision is deterministic for given timings).
    """
    base = float(np.median(fp32_ms))
    speedups, intervals = {}, {}
    for label, samples in candidates.items():
        median = float(np.median(samples))
        speedups[label] = base / median if median > 0 else float("inf")
        intervals[label] = ci95(bootstrap_speedup(fp32_ms, samples, seed=seed))
    return _choose(speedups, intervals, min_gain)


def _choose(
    speedups: Mapping[str, float], intervals: Mapping[str, tuple[float, float]], min_gain: float
) -> Decision:
    """``decide``'s rule on measured speedups and their 95% intervals."""
    speedups, intervals = dict(speedups), dict(intervals)
    eligible = [k for k in speedups if speedups[k] >= 1.0 + min_gain and intervals[k][0] >= 1.0]
    if not eligible:
        best = max(speedups, key=speedups.get, default=None)
        detail = (
            f"{best} {speedups[best]:.2f}x, 95% CI [{intervals[best][0]:.2f}, "
            f"{intervals[best][1]:.2f}]"
            if best is not None
            else "no candidate"
        )
        return Decision(
            "fp32", speedups, intervals, f"int8 is not faster than optimised fp32 ({detail})"
        )
    choice = max(eligible, key=lambda k: speedups[k])
    lo, hi = intervals[choice]
    return Decision(
        choice,
        speedups,
        intervals,
        f"{choice} {speedups[choice]:.2f}x optimised fp32 (95% CI [{lo:.2f}, {hi:.2f}])",
    )


def measure_latency(
    models: Mapping[str, str | os.PathLike],
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    seconds: float = 3.0,
    threads: int | None = None,
    min_runs: int = 5,
) -> dict[str, np.ndarray]:
    """Times models interleaved at batch 1; returns label -> per-round latencies (ms).

    Args:
        models: Label -> model file.
        feeds: One sample (batch 1) by input name; None: seeded random inputs.
        seconds: Budget of timed rounds (all models together); slow models get at least
            ``min_runs`` rounds, fast ones as many as the budget allows.
        threads: Intra-op threads (None: ONNX Runtime's default).
        min_runs: Fewest rounds.
    """
    from onnxq.bench import benchmark

    labels = list(models)
    with contextlib.ExitStack() as stack:
        data = None
        if feeds is not None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxq-lat-")))
            data = tmp / "sample.npz"
            # Written as the model takes it: slicing axis 0 would break a scalar input or
            # one whose axis 0 is not a batch axis; the data layout rule reads it back as one.
            np.savez(data, **{k: np.asarray(v) for k, v in feeds.items()})
        result = benchmark(
            [str(models[k]) for k in labels],
            data=data,
            threads=threads,
            min_runs=min_runs,
            max_time=seconds,
        )
    return {label: stats.samples_ms for label, stats in zip(labels, result.stats, strict=True)}


# ---------------------------------------------------------------------------- the whole step


@dataclasses.dataclass
class LatencyPlacement:
    """What the latency step decided, for the compiler and the compile report.

    Attributes:
        emit: ``"int8"`` or ``"fp32"`` (then the optimised fp32 model ships).
        model: The int8 model to emit (None when fp32 ships).
        reverted: Nodes this step kept fp32 (name -> reason).
        quantize_summary: ``InsertQDQPass`` summary of ``model`` when nodes were reverted
            (None: the summary of the model given still holds).
        analysis: ONNX Runtime's fusion of the final int8 placement.
        reason: One line: why this model ships.
        latency: Batch-1 timings and both ratios (None when not measured).
        cpu: The machine the decision was made on.
    """

    emit: str
    model: ir.Model | None
    reverted: dict[str, str]
    quantize_summary: dict[str, Any] | None
    analysis: FusionAnalysis
    reason: str
    latency: dict[str, Any] | None
    cpu: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The compile report's ``placement`` section."""
        return {
            "emitted": self.emit,
            "reason": self.reason,
            "reverted": dict(self.reverted),
            "fusion": self.analysis.to_dict(),
            "cpu": self.cpu,
        }


def place_for_latency(
    int8: ir.Model,
    quantize: Callable[[Mapping[str, str]], ir.Model],
    *,
    fp32: str | os.PathLike,
    original: str | os.PathLike,
    keep_fp32: Mapping[str, str] = (),
    feeds: Mapping[str, np.ndarray] | None = None,
    measure: bool = True,
    seconds: float = 2.0,
    threads: int | None = None,
    accept: Callable[[ir.Model], bool] | None = None,
    holding: Sequence[ir.Model] = (),
) -> LatencyPlacement:
    """Reverts int8 units ONNX Runtime cannot run as int8, then ships int8 only if it pays.

    Args:
        int8: The int8 model (``quantize(keep_fp32)``).
        quantize: Builds the int8 model for a ``keep_fp32`` mapping (e.g. a Requantizer).
        fp32: onnxq's optimised fp32 model file (what ``--no-quantize`` writes): the
            baseline int8 must beat.
        original: The model file as given (its ratio is reported too).
        keep_fp32: Nodes already kept fp32 (the accuracy search's result).
        feeds: The first calibration sample (batch 1); None: seeded random inputs.
        measure: Time the models (False: the structural step alone decides).
        seconds: Budget of timed rounds.
        threads: Intra-op threads for timing (None: ONNX Runtime's default).
        accept: Whether a placement with units reverted still meets the fidelity
            criteria. Returning a unit to fp32 removes its quantization error, but not
            always the model's: errors that cancelled can stop cancelling (a ViT heatmap's
            IoU@0.8 fell from 0.90 to 0.895). Rejected reversions are dropped and the
            accuracy-checked ``int8`` is timed instead.
        holding: Other models the caller holds (see ``time_against_fp32``).
    """
    from onnxq.numerics import describe_cpu

    placed, reverted, analysis = place_structurally(quantize, int8, keep_fp32)
    if reverted and accept is not None and not accept(placed):
        logger.warning(
            "latency placement: keeping %d unfused unit(s) int8: returning them to fp32 "
            "misses the fidelity criteria",
            len(reverted),
        )
        placed, reverted, analysis = int8, {}, analyze_fusion(int8)
    summary = getattr(quantize, "summary", None) if reverted else None
    cpu = describe_cpu()
    # Heads not found by name may well be fused: then the timing decides.
    fuses = bool(analysis.fused or analysis.unknown)
    if not fuses:
        reason = "no int8 unit fuses into an int8 kernel of ONNX Runtime on this CPU"
    else:
        reason = f"{len(analysis.fused)} int8 units fuse into ONNX Runtime int8 kernels"
    if not measure:
        emit = "int8" if fuses else "fp32"
        model = placed if fuses else None
        return LatencyPlacement(emit, model, reverted, summary, analysis, reason, None, cpu)
    # With nothing left to fuse, the placement before reversion is timed so the report
    # still says what int8 would have cost; it is not shipped.
    decision, latency = time_against_fp32(
        placed if fuses else int8,
        fp32=fp32,
        original=original,
        feeds=feeds,
        seconds=seconds,
        threads=threads,
        fallback=None if fuses else reason,
        holding=(*holding, quantize.calibrated) if isinstance(quantize, Requantizer) else holding,
    )
    emit, reason = decision.choice, decision.reason
    return LatencyPlacement(
        emit, placed if emit == "int8" else None, reverted, summary, analysis, reason, latency, cpu
    )


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    """How the latency step times the input, optimised fp32 and int8 models.

    Attributes:
        mode: ``"together"``: all three in one set of interleaved rounds; ``"pairs"``:
            fp32 with int8 (the decision), then the input with int8 (the input ratio).
        estimated_bytes: Estimated session memory of timing all three together.
        limit_bytes: Above this estimate the step times in pairs (None: available memory
            unknown, always together).
        sizes: Label -> model file size with its external data (bytes).
    """

    mode: str
    estimated_bytes: int
    limit_bytes: int | None
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the compile report's ``latency.timing``)."""
        why = (
            "all three models in one set of interleaved rounds"
            if self.mode == "together"
            else "two interleaved pairs: optimised fp32 + int8 (the decision), then input + "
            "int8 (the input ratio); three sessions at once would exceed the memory limit"
        )
        return {
            "mode": self.mode,
            "estimated_session_bytes": self.estimated_bytes,
            "limit_bytes": self.limit_bytes,
            "why": why,
        }


def timing_plan(
    models: Mapping[str, str | os.PathLike], available: int | None = None
) -> TimingPlan:
    """Times all models together unless their sessions would not fit the memory limit.

    Args:
        models: ``input``, ``fp32`` and ``int8`` model files.
        available: Bytes available (None: ``MemAvailable`` of this machine).
    """
    from onnxq.calibration.memory import available_memory
    from onnxq.io import model_file_size

    sizes = {label: model_file_size(path) for label, path in models.items()}
    # Each session holds its weights again (pre-packed); the largest one's creation, twice.
    estimate = sum(sizes.values()) + max(sizes.values())
    if available is None:
        available = available_memory()
    limit = None if available is None else int(available * TOGETHER_MEMORY_SHARE)
    mode = "pairs" if limit is not None and estimate > limit else "together"
    return TimingPlan(mode, estimate, limit, sizes)


@dataclasses.dataclass(frozen=True)
class TimedRounds:
    """Per-round latencies (ms) of models timed interleaved by `time_models`.

    Attributes:
        plan: How they were timed (``together``: one set of rounds; ``pairs``: each model
            in a set of rounds of its own with ``pivot``); None: all together, by a caller's
            own timer.
        pivot: The model every pair holds (the baseline the others are decided against).
        sets: Each set of rounds: label -> that model's latencies in those rounds.
    """

    plan: TimingPlan | None
    pivot: str
    sets: tuple[Mapping[str, np.ndarray], ...]

    @classmethod
    def together(cls, times: Mapping[str, np.ndarray], pivot: str) -> TimedRounds:
        """Rounds a caller's own timer took, all models together."""
        return cls(None, pivot, (dict(times),))

    def to_dict(self) -> dict[str, Any]:
        """How the models were timed (the latency step's own section: `TimingPlan`)."""
        count = len({label for rounds in self.sets for label in rounds})
        if len(self.sets) == 1:
            why = f"{count} models in one set of interleaved rounds"
        else:
            why = (
                f"each model in an interleaved pair with {self.pivot}: {count} sessions at "
                f"once would exceed the memory limit; two others are compared through "
                f"{self.pivot}, each ratio within its own rounds"
            )
        plan = self.plan
        return {
            "mode": "pairs" if len(self.sets) > 1 else "together",
            "estimated_session_bytes": plan.estimated_bytes if plan is not None else None,
            "limit_bytes": plan.limit_bytes if plan is not None else None,
            "why": why,
        }

    def paired(self, a: str, b: str) -> Mapping[str, np.ndarray] | None:
        """A set of rounds ``a`` and ``b`` both ran in (None: they never ran together)."""
        return next((rounds for rounds in self.sets if a in rounds and b in rounds), None)

    def speedup(self, base: str, other: str, *, seed: int = 0) -> tuple[float, np.ndarray]:
        """``median(base) / median(other)`` and its bootstrap replicates.

        Paired (`bootstrap_speedup`) when one set of rounds holds both. Otherwise both were
        timed with the pivot, in different rounds: the ratio is taken through it, base /
        pivot over other / pivot, each within its own rounds (drift between the two sets
        cancels), resampled independently (seeds ``seed`` and ``seed + 1``).
        """
        rounds = self.paired(base, other)
        if rounds is not None:
            median = float(np.median(rounds[other]))
            ratio = float(np.median(rounds[base])) / median if median > 0 else float("inf")
            return ratio, bootstrap_speedup(rounds[base], rounds[other], seed=seed)
        first, second = self.speedup(base, self.pivot, seed=seed)
        third, fourth = self.speedup(other, self.pivot, seed=seed + 1)
        return first / third, second / fourth

    def decide(
        self, base: str, candidates: Sequence[str], *, min_gain: float = MIN_GAIN
    ) -> Decision:
        """`decide` between ``base`` and ``candidates`` (paired, or through the pivot)."""
        if len(self.sets) == 1:
            (rounds,) = self.sets
            return decide(rounds[base], {k: rounds[k] for k in candidates}, min_gain=min_gain)
        speedups, intervals = {}, {}
        for label in candidates:
            speedups[label], replicates = self.speedup(base, label)
            intervals[label] = ci95(replicates)
        return _choose(speedups, intervals, min_gain)


def time_models(
    models: Mapping[str, str | os.PathLike],
    pivot: str,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    seconds: float = 2.0,
    threads: int | None = None,
    holding: Sequence[ir.Model] = (),
) -> TimedRounds:
    """Times models interleaved at batch 1: all together, or each in a pair with ``pivot``.

    Small models run in one set of interleaved rounds. When their sessions together would
    take more than ``TOGETHER_MEMORY_SHARE`` of the available memory (``timing_plan``),
    every other model is timed with ``pivot`` in a pair of its own, in ``models``' order,
    so that at most two sessions are alive at once; each pair gets ``2 / len(models)`` of
    ``seconds``, so every model runs as long as it would in rounds of all.

    Args:
        models: Label -> model file (``pivot`` among them).
        pivot: The model each pair holds: the one the others are compared with.
        feeds: One sample (batch 1); None: seeded random inputs.
        seconds: Budget of timed rounds (all together).
        threads: Intra-op threads (None: ONNX Runtime's default).
        holding: Models the caller holds (the files' own IR models, a reference): the
            memory maps of their external weights are closed before timing, so that weights
            read earlier do not sit in memory beside the sessions (they are mapped again
            when next read).
    """
    unmapped = unmap_external_data(*holding)
    if unmapped:
        logger.info("closed %.1f GB of weight maps before timing", unmapped / 1e9)
    plan = timing_plan(models)
    if plan.mode == "together":
        times = measure_latency(models, feeds, seconds=seconds, threads=threads)
        return TimedRounds(plan, pivot, (times,))
    logger.info(
        "timing in pairs: %d sessions at once would take about %.1f GB (limit %.1f GB)",
        len(models),
        plan.estimated_bytes / 1e9,
        plan.limit_bytes / 1e9,
    )
    share = seconds * 2 / len(models)
    sets = []
    for label in models:
        if label == pivot:
            continue
        # The larger model first: a pair's peak is the big session's creation, before the
        # other session exists.
        pair = sorted((label, pivot), key=lambda k: -plan.sizes[k])
        sets.append(
            measure_latency({k: models[k] for k in pair}, feeds, seconds=share, threads=threads)
        )
    return TimedRounds(plan, pivot, tuple(sets))


def time_against_fp32(
    int8: ir.Model,
    *,
    fp32: str | os.PathLike,
    original: str | os.PathLike,
    feeds: Mapping[str, np.ndarray] | None = None,
    seconds: float = 2.0,
    threads: int | None = None,
    fallback: str | None = None,
    holding: Sequence[ir.Model] = (),
) -> tuple[Decision, dict[str, Any]]:
    """Times an int8 model against optimised fp32 (and the input) at batch 1; decides.

    Small models are timed all three interleaved. When their sessions together would take
    more than ``TOGETHER_MEMORY_SHARE`` of the available memory (see ``timing_plan``), fp32
    and int8 are timed interleaved as one pair (the decision, exactly as before), then the
    input and int8 as another (int8's ratio to the input, interleaved too); fp32's ratio to
    the input is then derived through int8 and the report says so.

    Args:
        int8: The int8 candidate (QDQ or dynamic).
        fp32: onnxq's optimised fp32 model file: the baseline int8 must beat.
        original: The model file as given (its ratio is reported too).
        feeds: One sample (batch 1); None: seeded random inputs.
        seconds: Budget of timed rounds.
        threads: Intra-op threads for timing (None: ONNX Runtime's default).
        fallback: When given, fp32 ships for this reason whatever the timing says
            (int8 is still timed so the report says what it would have cost).
        holding: Other models the caller holds (the fp32 model, the reference): the memory
            maps of their external weights, and of ``int8``'s, are closed before timing, so
            that weights read earlier in the compile do not sit in memory beside the
            sessions (they are mapped again when next read).

    Returns:
        The decision (``choice`` ``"int8"`` or ``"fp32"``) and the compile report's
        ``latency`` section.
    """
    with tempfile.TemporaryDirectory(prefix="onnxq-placement-") as tmp:
        candidate = Path(tmp) / "int8.onnx"
        save_model(int8, candidate)
        # In pairs: fp32 with int8 first (the decision), then the input with int8.
        models = {"fp32": fp32, "input": original, "int8": candidate}
        timed = time_models(
            models,
            "int8",
            feeds,
            seconds=seconds,
            threads=threads,
            holding=(int8, *holding),
        )
    decision = timed.decide("fp32", ["int8"])
    if fallback is not None:
        decision = dataclasses.replace(decision, choice="fp32", reason=fallback)
    if decision.choice == "fp32":
        logger.warning("emitting the optimised fp32 model: %s", decision.reason)
    return decision, _latency_report(timed, decision, threads)


def _latency_report(timed: TimedRounds, decision: Decision, threads: int | None) -> dict[str, Any]:
    """Batch-1 medians, int8 vs the input and vs optimised fp32, with 95% intervals.

    In pairs the decision's rounds hold fp32 and int8, the input's pair the input and int8;
    fp32's ratio to the input is then taken through int8, timed in both.
    """
    plan = timed.plan
    times, reported = timed.paired("fp32", "int8"), timed.paired("input", "int8")
    assert times is not None and reported is not None  # int8 is the pivot
    p50 = {k: float(np.median(v)) for k, v in times.items()}
    vs_input, vs_input_boot = timed.speedup("input", "int8")
    # The decision already bootstrapped fp32 over int8 (same rounds, same seed).
    vs_fp32, vs_fp32_ci = decision.speedups["int8"], list(decision.intervals["int8"])
    fp32_vs_input, fp32_vs_input_boot = timed.speedup("input", "fp32")
    return {
        "batch": 1,
        # None: ONNX Runtime's default, one thread per physical core.
        "threads": threads or physical_cores(),
        "runs": int(times["int8"].size),
        "input_p50_ms": float(np.median(reported["input"])),
        "fp32_p50_ms": p50["fp32"],
        "int8_p50_ms": p50["int8"],
        # int8 over the model as given (BN folding and cleanup included) ...
        "speedup": vs_input,
        "speedup_ci95": list(ci95(vs_input_boot)),
        # ... and over onnxq's own optimised fp32: what int8 itself buys.
        "speedup_vs_fp32": vs_fp32,
        "speedup_vs_fp32_ci95": vs_fp32_ci,
        "fp32_speedup_vs_input": fp32_vs_input,
        "fp32_speedup_vs_input_ci95": list(ci95(fp32_vs_input_boot)),
        "timing": {
            **plan.to_dict(),
            "runs_input_pair": int(reported["input"].size),
            "fp32_speedup_vs_input": "interleaved"
            if plan.mode == "together"
            else "derived: int8 vs input (second pair) / int8 vs fp32 (first pair)",
        },
        "emitted": decision.choice,
        "decision": decision.to_dict(),
    }


def time_weight_only(
    candidate: ir.Model,
    fp32: str | os.PathLike,
    feeds: Mapping[str, np.ndarray] | None,
    *,
    seconds: float = 2.0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Times a weight-only model against optimised fp32 on one input; says which ships.

    MatMulNBits reads fewer weight bytes, which pays on single-token decode steps, but
    dequantizes blocks in its inner loop, which can lose to MLAS's fp32 GEMM on long
    prompts and batches: so the decision holds for the shape timed (``feeds``), and the
    weight-only model ships only when its median is not slower than fp32's.

    Returns:
        The compile report's ``weight_only.latency`` section: ``shape``, medians, speedup
        with its 95% interval, ``emitted`` (``weight-only`` or ``fp32``) and ``reason``.
    """
    with tempfile.TemporaryDirectory(prefix="onnxq-wo-") as tmp:
        path = Path(tmp) / "weight_only.onnx"
        save_model(candidate, path)
        times = measure_latency(
            {"fp32": fp32, "weight-only": path}, feeds, seconds=seconds, threads=threads
        )
    fp32_ms, wo_ms = (float(np.median(times[k])) for k in ("fp32", "weight-only"))
    speedup = fp32_ms / wo_ms if wo_ms > 0 else float("inf")
    lo, hi = ci95(bootstrap_speedup(times["fp32"], times["weight-only"]))
    emit = "weight-only" if speedup >= 1.0 else "fp32"
    shape = {k: list(np.shape(v)) for k, v in (feeds or {}).items()}
    reason = (
        f"weight-only {speedup:.2f}x optimised fp32 (95% CI [{lo:.2f}, {hi:.2f}]) on "
        f"{shape or 'random inputs'}"
    )
    if emit == "fp32":
        reason = f"weight-only is slower than optimised fp32: {reason}"
        logger.warning("emitting the optimised fp32 model: %s", reason)
    return {
        "shape": shape,
        "threads": threads or physical_cores(),
        "runs": int(times["fp32"].size),
        "fp32_p50_ms": fp32_ms,
        "weight_only_p50_ms": wo_ms,
        "speedup_vs_fp32": speedup,
        "speedup_vs_fp32_ci95": [lo, hi],
        "emitted": emit,
        "reason": reason,
        "rule": "weight-only ships when its median latency is not above optimised fp32's "
        "on the timed shape",
    }
