"""Residual Add before LayerNormalization as Sum, where ORT's fused SkipLayerNorm is slower."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxq.errors import InputError
from onnxq.passes.results import DetailedPassResult

__all__ = [
    "TIMING_SECONDS",
    "PreventSkipLayerNormFusionPass",
    "ResidualNormTimer",
    "SkipLayerNormResult",
    "residual_norm_models",
    "time_residual_forms",
    "without_skip_layernorm",
]

logger = logging.getLogger(__name__)

_ONNX = ("", "ai.onnx")

# Seconds of interleaved rounds of the two micro models (after their warm-up): a residual
# Add + LayerNorm runs in 0.02-0.2 ms here, so this is hundreds of paired rounds.
TIMING_SECONDS = 0.25
# The sequence length of the micro models when the model's own is not static.
DEFAULT_SEQUENCE = 128

# (timer, shape, axis, dtype, provider, threads) -> the timing: a compile measures once.
_TIMINGS: dict[tuple[Any, ...], dict[str, Any]] = {}


class ResidualNormTimer(Protocol):
    """Times model files interleaved: label -> per-round latencies (ms, paired rounds)."""

    def __call__(
        self, models: Mapping[str, Path], *, provider: str, threads: int | None
    ) -> Mapping[str, np.ndarray]: ...


@dataclasses.dataclass
class SkipLayerNormResult(DetailedPassResult):
    """``details``: ``rewritten`` (the Add nodes now Sum) and ``count``.

    When measured (fusable Adds found), also ``timings`` (one per micro-model shape: median
    ms fused and as Sum, ``ratio`` fused/Sum with its 95% interval, ``decision``) and
    ``kept`` (Add name -> why it stays an Add).
    """


def _fusable_add(norm: ir.Node) -> ir.Node | None:
    """The Add ONNX Runtime would fuse with ``norm`` into SkipLayerNormalization, if any.

    ORT's ``SkipLayerNormFusion`` takes an Add of two 3-D inputs of one shape whose only
    consumer is the LayerNormalization (and not a graph output).
    """
    add = norm.inputs[0].producer() if norm.inputs and norm.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or add.domain not in _ONNX:
        return None
    out = add.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None
    a, b = add.inputs
    if a is None or b is None or a.shape is None or b.shape is None:
        return None
    if len(a.shape) != 3 or a.shape != b.shape:
        return None
    return add


def residual_norm_models(
    shape: tuple[int, int, int], axis: int, dtype: ir.DataType
) -> dict[str, onnx.ModelProto]:
    """``LayerNormalization(a + b)`` written both ways: ``fused`` (Add) and ``sum`` (Sum).

    ONNX Runtime fuses the Add form into SkipLayerNormalization at optimisation level all;
    the Sum form stays Sum + LayerNormalization. Scale and bias span the normalised dims.
    """
    np_type = dtype.numpy()
    normalised = shape[axis:]
    weights = [
        numpy_helper.from_array(np.ones(normalised, np_type), "scale"),
        numpy_helper.from_array(np.zeros(normalised, np_type), "bias"),
    ]
    inputs = [helper.make_tensor_value_info(n, dtype.value, shape) for n in ("a", "b")]
    output = helper.make_tensor_value_info("y", dtype.value, shape)
    models = {}
    for label, op in (("fused", "Add"), ("sum", "Sum")):
        nodes = [
            helper.make_node(op, ["a", "b"], ["s"], name="residual"),
            helper.make_node(
                "LayerNormalization", ["s", "scale", "bias"], ["y"], name="norm", axis=axis
            ),
        ]
        graph = helper.make_graph(nodes, label, inputs, [output], weights)
        models[label] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return models


def time_residual_forms(
    models: Mapping[str, Path], *, provider: str, threads: int | None
) -> dict[str, np.ndarray]:
    """The default timer: `onnxq.bench.benchmark`, interleaved, ``TIMING_SECONDS`` of rounds."""
    from onnxq.bench import benchmark

    labels = list(models)
    result = benchmark(
        [models[k] for k in labels],
        provider=provider,
        threads=threads,
        min_runs=20,
        max_time=TIMING_SECONDS,
    )
    return {label: s.samples_ms for label, s in zip(labels, result.stats, strict=True)}


def _measure(
    timer: ResidualNormTimer,
    shape: tuple[int, int, int],
    axis: int,
    dtype: ir.DataType,
    provider: str,
    threads: int | None,
) -> dict[str, Any]:
    """Times the two micro models; `onnxq.placement.decide` says whether Sum is faster."""
    from onnxq.placement import decide

    facts: dict[str, Any] = {
        "shape": list(shape),
        "axis": axis,
        "dtype": dtype.name,
        "provider": provider,
        "threads": threads,
    }
    with tempfile.TemporaryDirectory(prefix="onnxq-skipln-") as tmp:
        paths = {}
        for label, proto in residual_norm_models(shape, axis, dtype).items():
            paths[label] = Path(tmp) / f"{label}.onnx"
            onnx.save(proto, paths[label])
        try:
            times = timer(paths, provider=provider, threads=threads)
        except (
            InputError,
            RuntimeError,
            ValueError,
            ort.capi.onnxruntime_pybind11_state.Fail,
        ) as e:
            # Nothing measured: leave the graph as ONNX Runtime would run it.
            logger.warning("could not time SkipLayerNormalization against Sum: %s", e)
            return {**facts, "decision": "add", "reason": f"not measured: {e}"}
    fused, total = np.asarray(times["fused"]), np.asarray(times["sum"])
    decision = decide(fused, {"sum": total})
    ratio, (lo, hi) = decision.speedups["sum"], decision.intervals["sum"]
    faster = decision.choice == "sum"
    verdict = "faster" if faster else "not measured faster"
    return {
        **facts,
        "fused_ms": float(np.median(fused)),
        "sum_ms": float(np.median(total)),
        "ratio": ratio,
        "ratio_ci95": [lo, hi],
        "rounds": int(fused.size),
        "decision": "sum" if faster else "add",
        "reason": (
            f"Sum + LayerNormalization is {verdict} than ONNX Runtime's fused "
            f"SkipLayerNormalization ({ratio:.2f}x, 95% CI [{lo:.2f}, {hi:.2f}])"
        ),
        "rule": "Sum when fused/Sum median time (paired interleaved rounds) is at least "
        "1.02 and its 95% bootstrap interval starts at 1 or above (`onnxq.placement.decide`)",
    }


class PreventSkipLayerNormFusionPass(ir.passes.InPlacePass):
    """Writes the residual ``Add`` feeding a ``LayerNormalization`` as ``Sum`` where that is faster.

    ONNX Runtime's session optimiser fuses ``Add -> LayerNormalization`` into
    ``com.microsoft.SkipLayerNormalization``. Its CPU kernel (1.32) is a scalar loop:
    measured 6.5-7.6x slower than ``Add`` + ``LayerNormalization`` at [1|8, 128, 256|768],
    1 or 2 threads (1.09 ms vs 0.15 ms at [8, 128, 256]: a third of the zoo encoder's
    dynamic int8 time at batch 8). ``Sum`` of two tensors computes the same sum bit for
    bit, and no ORT fusion matches it.

    Whether the fused kernel is slower depends on the ORT build and the machine, so the
    pass measures it where it compiles, on the given provider and threads. Before
    rewriting, two micro models of the model's own shape (batch 1, its static sequence
    length or ``DEFAULT_SEQUENCE``, its hidden size, normalised axis and dtype) are timed
    interleaved for ``TIMING_SECONDS`` (`residual_norm_models`, `onnxq.bench.benchmark`):
    ``Add -> LayerNormalization``, which ORT fuses, and ``Sum -> LayerNormalization``. The
    Adds become Sum only when `onnxq.placement.decide`'s rule says Sum is faster (median
    ratio at least 1.02, its paired 95% bootstrap interval not below 1); otherwise they stay
    and ``details["kept"]`` says why. Timings are cached for the process per (shape, axis,
    dtype, provider, threads, timer): a compile measures once. As the pass measures it here
    (AMD EPYC, 2 cores, load 3.2, ORT default threads; benchmarks/README.md,
    "SkipLayerNormalization, timed"): fused/Sum 6.56x [6.50, 6.58] at [1, 128, 256] and
    7.66x [7.51, 7.75] at [1, 128, 768], so the Adds become Sum. The pipelines run the pass
    only on the CPU provider: on CUDA the fused kernel is the fast one.

    Args:
        measure: False: rewrite every fusable Add without timing (the fixed rule).
        timer: Times the micro models (default `time_residual_forms`); tests inject one.
        provider: ONNX Runtime provider the model is deployed on.
        threads: Intra-op threads it runs with (None: ONNX Runtime's default).
    """

    def __init__(
        self,
        *,
        measure: bool = True,
        timer: ResidualNormTimer | None = None,
        provider: str = "cpu",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.measure = measure
        self.timer = timer
        self.provider = provider
        self.threads = threads

    def _timing(self, add: ir.Node, norm: ir.Node) -> dict[str, Any]:
        """The cached timing for ``add``'s shape and dtype (measured on first use)."""
        shape = add.inputs[0].shape
        width = shape[2] if isinstance(shape[2], int) else None
        scale = norm.inputs[1].shape if len(norm.inputs) > 1 and norm.inputs[1] else None
        if width is None and scale is not None and isinstance(scale[-1], int):
            width = scale[-1]
        if width is None:
            return {"decision": "add", "reason": "hidden size not static: nothing to time"}
        seq = shape[1] if isinstance(shape[1], int) else DEFAULT_SEQUENCE
        axis = norm.attributes.get_int("axis", -1) % 3
        dtype = add.inputs[0].dtype or ir.DataType.FLOAT
        # Looked up here, not bound at import: tests replace the module's default timer.
        timer = self.timer if self.timer is not None else time_residual_forms
        key = (timer, (1, seq, width), axis, dtype, self.provider, self.threads)
        if key not in _TIMINGS:
            _TIMINGS[key] = _measure(
                timer, (1, seq, width), axis, dtype, self.provider, self.threads
            )
            logger.info("residual LayerNorm %s: %s", key[1:], _TIMINGS[key]["reason"])
        return _TIMINGS[key]

    def call(self, model: ir.Model) -> SkipLayerNormResult:
        rewritten: list[str] = []
        kept: dict[str, str] = {}
        timings: list[dict[str, Any]] = []
        for norm in list(model.graph):
            if norm.op_type != "LayerNormalization" or norm.domain not in _ONNX:
                continue
            add = _fusable_add(norm)
            if add is None:
                continue
            name = add.name or "Add"
            if self.measure:
                timing = self._timing(add, norm)
                if timing not in timings:
                    timings.append(timing)
                if timing["decision"] != "sum":
                    kept[name] = timing["reason"]
                    continue
            total = ir.node("Sum", list(add.inputs), name=name)
            # (the Sum's output takes the Add's name, type and shape)
            ir.convenience.replace_nodes_and_values(
                model.graph, add, [add], [total], [add.outputs[0]], [total.outputs[0]]
            )
            rewritten.append(name)
        if rewritten:
            logger.info("SkipLayerNorm fusion prevented at %d residual Adds", len(rewritten))
        details: dict[str, Any] = {"rewritten": rewritten, "count": len(rewritten)}
        if timings:
            details.update(timings=[dict(t) for t in timings], kept=kept)
        return SkipLayerNormResult(model, modified=bool(rewritten), details=details)


def without_skip_layernorm(model: ir.Model) -> ir.Model:
    """``model`` with its fusable residual Adds as Sum where faster: a copy when any, else itself.

    The copy shares the weights. In a QDQ model only the Adds left fp32 change: a quantized
    Add feeds a QuantizeLinear, not the LayerNormalization, and stays an int8 unit.
    """
    rewritten = model.clone()
    return rewritten if PreventSkipLayerNormFusionPass()(rewritten).modified else model
