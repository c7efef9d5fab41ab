"""The compression evaluation table: size, parameters, MACs, accuracy, fidelity and latency."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq import runtime
from onnxq.bench import benchmark
from onnxq.bootstrap import bootstrap_proportion, ci95
from onnxq.calibration.data import open_calibration_data
from onnxq.evaluate import EvalResult, evaluate
from onnxq.inputs import infer_concrete_shapes
from onnxq.io import load_model, parameter_stats
from onnxq.passes.prune import zipped_size

__all__ = ["MAC_OPS", "compare", "count_macs", "count_parameters", "pareto_front"]

logger = logging.getLogger(__name__)

# Op type -> (index of the activation input, index of the weight input). The integer and
# QLinear forms do the same multiply-accumulates as the float op they replace.
MAC_OPS: dict[str, tuple[int, int]] = {
    "Conv": (0, 1),
    "ConvInteger": (0, 1),
    "QLinearConv": (0, 3),
    "ConvTranspose": (0, 1),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
}
# Inputs 1 and 2 of these ops are a scale and a zero point: quantization metadata, which
# would make an int8 model look larger than the fp32 one it was made from.
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


Dims = dict[str, tuple[int, ...]]


def _operands(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None, ir.Value]:
    """The activation, weight and output of a node whose op is in `MAC_OPS`."""
    x_index, w_index = MAC_OPS[node.op_type]
    inputs = node.inputs
    x = inputs[x_index] if len(inputs) > x_index else None
    w = inputs[w_index] if len(inputs) > w_index else None
    return x, w, node.outputs[0]


def _dims(value: ir.Value | None, measured: Dims) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.shape is not None and value.shape.is_static():
        return tuple(int(d) for d in value.shape.numpy())
    return measured.get(value.name)


def _node_macs(node: ir.Node, measured: Dims) -> int | None:
    """Multiply-accumulates of one node from its shapes; None if they are unknown."""
    x, w, y = (_dims(v, measured) for v in _operands(node))
    if x is None or w is None or y is None:
        return None
    if node.op_type == "ConvTranspose":
        # Every input element is scattered through the kernel into M/group output channels.
        return math.prod(x) * math.prod(w[1:])
    if "Conv" in node.op_type:
        # Every output element sums C/group x kernel products (weight: M x C/group x k...).
        return math.prod(y) * math.prod(w[1:])
    if node.op_type == "Gemm":
        inner = x[0] if node.attributes.get_int("transA", 0) else x[-1]
        return math.prod(y) * inner
    return math.prod(y) * x[-1]  # MatMul: every output element is one dot product


def _measured_dims(model: ir.Model, names: set[str], feeds: Mapping[str, np.ndarray]) -> Dims:
    """Shapes of main-graph tensors in one ONNX Runtime run on the feeds.

    Shape inference stops at some exported shape arithmetic (Shape -> Squeeze -> Concat ->
    Reshape); running the model is exact wherever it runs.
    """

    def choose(graph: ir.Graph) -> list[ir.Value]:
        return [v for node in graph for v in node.outputs if v.name in names]

    probe = runtime.Probe(model, choose)
    return {name: array.shape for name, array in probe.run(feeds).items()}


def count_macs(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (and their int8 forms).

    Shapes come from shape inference with the feeds' shapes (`infer_concrete_shapes`);
    those it leaves unknown are read from one run of the model on the feeds. Other ops
    (activations, pooling, normalization) are not counted: they are a small part of the
    work of the networks this table compares.

    Args:
        model: The model; it is not modified.
        feeds: One run's inputs, by name; the count is for one run on them.

    Returns:
        The count, or None when a counted node's shapes stay unknown (no feed for an input).
    """
    shaped = infer_concrete_shapes(model, feeds)
    nodes = [
        node
        for graph in shaped.graphs()
        for node in graph
        if node.domain in ("", "ai.onnx") and node.op_type in MAC_OPS
    ]
    missing = {
        v.name for node in nodes for v in _operands(node) if v is not None and _dims(v, {}) is None
    }
    names = {v.name for v in model.graph.inputs}
    measured = _measured_dims(model, missing, feeds) if missing and names <= set(feeds) else {}
    total = 0
    unknown = []
    for node in nodes:
        macs = _node_macs(node, measured)
        if macs is None:
            unknown.append(node.name or node.op_type)
        else:
            total += macs
    if unknown:
        logger.warning("MACs unknown: no shapes for %s", ", ".join(unknown[:5]))
        return None
    return total


def count_parameters(model: ir.Model) -> int:
    """Elements of the initializers, less the scales and zero points of quantize ops."""
    metadata = {
        node.inputs[i].name
        for graph in model.graphs()
        for node in graph
        if node.op_type in _QUANT_OPS
        for i in (1, 2)
        if len(node.inputs) > i and node.inputs[i] is not None
    }
    excluded = sum(
        value.const_value.size
        for graph in model.graphs()
        for name, value in graph.initializers.items()
        if name in metadata and value.const_value is not None
    )
    return parameter_stats(model)[0] - excluded


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which ``(cost, quality)`` points no other point beats (no more cost, no less quality).

    Beating means being at least as good on both and strictly better on one; points with
    an unknown (NaN) coordinate are never on the front.
    """
    flags = []
    for i, (cost, quality) in enumerate(points):
        if math.isnan(cost) or math.isnan(quality):
            flags.append(False)
            continue
        beaten = any(
            c <= cost and q >= quality and (c < cost or q > quality)
            for j, (c, q) in enumerate(points)
            if j != i and not (math.isnan(c) or math.isnan(q))
        )
        flags.append(not beaten)
    return flags


def _accuracy(stats: Mapping[str, Any], seed: int) -> dict[str, Any]:
    top1, samples = stats["top1"], stats["samples"]
    hits = round(top1 * samples)
    return {
        "top1": top1,
        "top1_ci95": list(ci95(bootstrap_proportion(hits, samples, seed=seed))),
        "samples": samples,
    }


def _fidelity(result: EvalResult) -> dict[str, Any]:
    """The worst SQNR over the outputs and the top-1 agreement of the first (the scores)."""
    first = next(iter(result.fidelity.values()))
    return {"sqnr_db": result.min_sqnr_db, "top1_agreement": first["top1_agreement"]}


def _latency(bench: Mapping[str, Any], model: str) -> dict[str, dict[str, Any]]:
    return {
        str(r["batch"]): {
            "p50_ms": r["p50_ms"],
            "p50_ci95_ms": r["p50_ci95_ms"],
            "speedup": r["speedup_vs_first"],
            "speedup_ci95": r["speedup_ci95"],
        }
        for r in bench["results"]
        if Path(r["model"]) == Path(model)
    }


def _first_feeds(model: ir.Model, data: str | os.PathLike) -> dict[str, np.ndarray]:
    """One sample of the data as the model takes it (batch 1 where the batch is free)."""
    batch = open_calibration_data(data, model, batch_size=1, ignore_extra=True).take(1)
    return {name: np.asarray(array) for name, array in batch.items()}


def _quality(accuracy: Mapping | None, fidelity: Mapping | None, labelled: bool) -> Any:
    """What the Pareto fronts rank by: top-1, else agreement (the reference's is 1)."""
    if labelled:
        return accuracy["top1"] if accuracy else None
    return 1.0 if fidelity is None else fidelity["top1_agreement"]


def _mark_pareto(rows: list[dict[str, Any]], batch: str) -> None:
    def point(row: Mapping[str, Any], cost: float | None) -> tuple[float, float]:
        value = row["quality"]
        return (math.nan if cost is None else cost, math.nan if value is None else value)

    latency = pareto_front([point(r, r["latency"].get(batch, {}).get("p50_ms")) for r in rows])
    size = pareto_front([point(r, r["size_bytes"]) for r in rows])
    for row, on_latency, on_size in zip(rows, latency, size, strict=True):
        row["pareto"] = [name for name, on in (("latency", on_latency), ("size", on_size)) if on]


def compare(
    reference: str | os.PathLike,
    candidates: Sequence[str | os.PathLike],
    data: str | os.PathLike,
    *,
    labels_key: str | None = None,
    provider: str = "cpu",
    seed: int = 0,
    **timing: Any,
) -> dict[str, Any]:
    """Measures a reference and its compressed candidates side by side.

    Per model: size on disk and zlib-compressed, parameters, MACs per run of one data sample,
    top-1 accuracy with a bootstrap 95% CI (with labels), fidelity to the reference
    (`onnxq.evaluate.evaluate`: worst output SQNR, top-1 agreement), and interleaved latency
    per batch size with CIs (`onnxq.bench.benchmark`). The Pareto fronts of accuracy (top-1
    agreement without labels) against batch-1 latency (the first batch size) and size are
    marked.

    Args:
        reference: The reference model (e.g. fp32); the speedups are relative to it.
        candidates: The compressed models.
        data: Inputs as for `onnxq.evaluate.evaluate` (an ``.npz`` keyed by input name).
        labels_key: Key of the integer class labels in ``data``; enables accuracy.
        provider: ``cpu`` or ``cuda``.
        seed: Seed of the bootstraps.
        **timing: Passed to `onnxq.bench.benchmark`: ``batch_sizes`` (default ``(1, 8)``; the
            data needs as many samples), ``threads``, ``max_time`` (seconds per batch size,
            default 2), ``min_runs``, ``progress``.

    Returns:
        The report: ``{"kind": "compare", "reference", "data", "labels_key", "quality",
        "batch_sizes", "threads", "comparison": [{model, role, size_bytes, zipped_bytes,
        parameters, macs, accuracy, fidelity, latency: {batch: {p50_ms, p50_ci95_ms, speedup,
        speedup_ci95}}, quality, pareto}]}``.

    Raises:
        InputError: Unreadable models or data, mismatched inputs, a missing labels key,
            too few samples for a batch size.
    """
    paths = [str(reference), *(str(c) for c in candidates)]
    evals = [
        evaluate(reference, c, data, labels_key=labels_key, provider=provider) for c in candidates
    ]
    timing = {"batch_sizes": (1, 8), "max_time": 2.0, **timing}
    bench = benchmark(paths, provider=provider, data=data, seed=seed, **timing).to_dict()
    sizes = {Path(i["path"]): i["size_bytes"] for i in bench["model_info"]}
    rows = []
    for i, path in enumerate(paths):
        model = load_model(path, announce=False)
        ev = evals[max(i - 1, 0)]
        side = "reference" if i == 0 else "candidate"
        accuracy = _accuracy(ev.accuracy[side], seed) if ev.accuracy else None
        fidelity = _fidelity(ev) if i else None
        rows.append(
            {
                "model": path,
                "role": side,
                "size_bytes": sizes[Path(path)],
                "zipped_bytes": zipped_size(model),
                "parameters": count_parameters(model),
                "macs": count_macs(model, _first_feeds(model, data)),
                "accuracy": accuracy,
                "fidelity": fidelity,
                "latency": _latency(bench, path),
                "quality": _quality(accuracy, fidelity, labels_key is not None),
            }
        )
    _mark_pareto(rows, str(timing["batch_sizes"][0]))
    return {
        "kind": "compare",
        "reference": str(reference),
        "data": str(data),
        "labels_key": labels_key,
        "samples": evals[0].samples,
        "quality": "top1" if labels_key else "top1_agreement",
        "batch_sizes": list(timing["batch_sizes"]),
        "provider": provider,
        "threads": bench["threads"],
        "threads_effective": bench["threads_effective"],
        "comparison": rows,
    }
