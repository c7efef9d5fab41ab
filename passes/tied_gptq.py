"""GPTQ for a weight shared by an LM head and the token embedding, weighted by what it costs.

A tied weight ``E [V, K]`` is read twice: the head computes ``logits = x E^T`` and the
embedding looks rows up, ``E[ids]``. Plain GPTQ (`onnxq.passes.gptq`) rounds it for the
head alone, ``H = X^T X``: it moves each row's rounding error into directions the head's
inputs lack, which the lookups do not lack, and treats every vocabulary row alike, while
a row only matters to the head where its token is likely. Measured on the zoo decoder
(trained): rounding the lookups to nearest cost 235 of 16,384 held-out next tokens
against fp32 lookups, GPTQ's head codes shared with them about as much.

Both costs here are the same quantity, the second-order change of the next-token
distribution (its Fisher information, ``diag(p) - p p^T`` on the logits), summed over the
calibration positions, so one objective per row ``t`` of ``E``, with error ``e_t``:

* head: ``e_t (sum_pos w_t(pos) x_pos^T x_pos) e_t^T`` with ``w_t = p_t (1 - p_t)``: the
  row's logit error where the token is plausible;
* lookups: ``n_t e_t G e_t^T``, ``n_t`` the row's lookups in the calibration data and
  ``G`` the Fisher-weighted sensitivity of the logits to one lookup's error: the Jacobian
  of the head's input with respect to the embedding output, measured by finite
  differences (``K`` extra runs on the first calibration batches), through ``E``.

Rows that are plausible predictions (the ``rows`` with the largest ``sum w_t``) or looked
up get their own Hessian; the others keep the head's ``X^T X`` (their logits never
matter much, and GPTQ's codes for them are as good as any). The grid is still ONNX
Runtime's (only the integer codes change), so the head's ``MatMulNBits`` and the lookups'
``GatherBlockQuantized`` read the same packing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

from onnxq.passes.gptq import DAMP, gptq_codes, ort_grid, pack_codes

__all__ = ["TiedSensitivity", "measure_tied_sensitivity", "tied_gptq_pack"]

logger = logging.getLogger(__name__)

# Vocabulary entries per position the Fisher weighting keeps (the most probable): the
# rest carry too little probability to move the metric, and all V would cost V x K x K.
TOP_TOKENS = 64
# Rows of E given their own Hessian (the most plausible predictions, and those looked up).
OWN_ROWS = 256
# Per-row Hessians cost a K x K inverse each: beyond this K the head's X^T X is used alone.
MAX_K = 1024
# Logits held for the Fisher weights (positions x vocabulary): 64 M floats, 256 MB each.
MAX_LOGITS = 64 << 20


@dataclasses.dataclass
class TiedSensitivity:
    """What the weighted objective needs, measured on calibration data.

    Attributes:
        x: The head's inputs, ``[T, K]`` (float64).
        weights: ``p_t (1 - p_t)`` per position and row, ``[T, V]`` (float32).
        lookup: ``G [K, K]``: Fisher-weighted logit change per unit lookup error, per
            lookup (float64).
        counts: Lookups per row of ``E`` in the same data, ``[V]``.
    """

    x: np.ndarray
    weights: np.ndarray
    lookup: np.ndarray
    counts: np.ndarray


def measure_tied_sensitivity(
    model: ir.Model,
    head: ir.Node,
    gathers: Sequence[ir.Node],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    provider: str = "cpu",
    max_tokens: int = 1024,
) -> TiedSensitivity | None:
    """Runs the fp32 model with the lookups perturbed, one embedding dimension at a time.

    Args:
        model: The fp32 model (not modified: a copy is instrumented).
        head: The head's ``MatMul``/``Gemm`` (input 0: ``x``; output: the logits).
        gathers: The ``Gather(E, ids)`` lookups of the same weight.
        feeds: Calibration batches; the first ones up to ``max_tokens`` head rows are run.
        provider: Execution provider.
        max_tokens: Positions measured (each of the ``K`` runs costs a forward on them).

    Returns:
        None when the model does not fit the measurement (no float logits of ``V``
        columns, or ``K`` over `MAX_K`).
    """
    from onnxq.runtime import create_session

    table = _table(head)
    if table is None or table.shape[1] > MAX_K or not gathers:
        return None
    vocab, k = table.shape
    copy = model.clone()
    nodes = {n.name: n for n in copy.graph}
    head_copy = nodes[head.name]
    delta = ir.Value(
        name="onnxq_tied_delta", shape=ir.Shape([k]), type=ir.TensorType(ir.DataType.FLOAT)
    )
    copy.graph.inputs.append(delta)
    ids = []
    for gather in gathers:
        g = nodes[gather.name]
        out = g.outputs[0]
        add = ir.node("Add", [out, delta], name=f"{g.name}_onnxq_delta")
        # Every reader of the lookup reads the perturbed value; the Add reads the lookup.
        out.replace_all_uses_with(add.outputs[0])
        add.replace_input_with(0, out)
        copy.graph.insert_after(g, add)
        ids.append(g.inputs[1])
    wanted = [head_copy.inputs[0], head_copy.outputs[0], *ids]
    present = {v.name for v in copy.graph.outputs}
    for value in wanted:
        if value.name not in present:
            copy.graph.outputs.append(value)
            present.add(value.name)
    names = [v.name for v in wanted]
    session = create_session(copy, provider=provider, optimization="basic")
    # Positions measured: the logits and their Fisher weights are [positions, V] floats,
    # held a few times over, so a large vocabulary measures fewer of them.
    max_tokens = max(1, min(max_tokens, MAX_LOGITS // vocab))
    zero = np.zeros(k, np.float32)
    runs: list[dict[str, np.ndarray]] = []
    base: list[list[np.ndarray]] = []
    tokens = 0
    for batch in feeds:
        runs.append({**batch, delta.name: zero})
        base.append(session.run(names, runs[-1]))
        tokens += np.asarray(base[-1][0]).size // k  # the head's rows (positions)
        if tokens >= max_tokens:
            break

    def run(offset: np.ndarray) -> list[list[np.ndarray]]:
        return [session.run(names[:1], {**f, delta.name: offset}) for f in runs]

    x = np.concatenate([np.asarray(r[0], np.float64).reshape(-1, k) for r in base])
    logits = np.concatenate([np.asarray(r[1], np.float32).reshape(-1, vocab) for r in base])
    if logits.shape[0] != x.shape[0]:
        return None
    counts = np.zeros(vocab, np.int64)
    for r in base:
        for array in r[2:]:
            counts += np.bincount(np.asarray(array).ravel().clip(0, vocab - 1), minlength=vocab)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # A step of a tenth of the table's typical value: large against float rounding, small
    # against the LayerNorms' scale (the response stays linear; checked in the tests).
    eps = 0.1 * float(np.sqrt(np.mean(table.astype(np.float64) ** 2)))
    top = np.argsort(-p, axis=1)[:, :TOP_TOKENS]
    p_top = np.take_along_axis(p, top, axis=1)
    rows_top = table[top]  # [T, TOP, K]
    response = np.empty((k, x.shape[0], TOP_TOKENS), np.float32)
    for i in range(k):
        offset = np.zeros(k, np.float32)
        offset[i] = eps
        moved = np.concatenate([np.asarray(r[0], np.float64).reshape(-1, k) for r in run(offset)])
        dx = ((moved - x) / eps).astype(np.float32)  # [T, K]: d x / d lookup_i
        response[i] = np.einsum("tk,tjk->tj", dx, rows_top)  # the logits it moves
    scaled = (response * np.sqrt(p_top)[None]).reshape(k, -1).astype(np.float64)
    mean = (response * p_top[None]).sum(axis=-1).astype(np.float64)  # [K, T]
    lookup = (scaled @ scaled.T - mean @ mean.T) / x.shape[0]
    return TiedSensitivity(x, (p * (1.0 - p)).astype(np.float32), (lookup + lookup.T) / 2, counts)


def _table(head: ir.Node) -> np.ndarray | None:
    """The head's ``E [V, K]`` (through its Transpose, or a Gemm's ``transB``)."""
    b = head.inputs[1]
    if b is None:
        return None
    producer = b.producer()
    if b.const_value is None and producer is not None and producer.op_type == "Transpose":
        source = producer.inputs[0]
        return source.const_value.numpy() if source is not None and source.const_value else None
    if b.const_value is None:
        return None
    array = b.const_value.numpy()
    trans_b = head.op_type == "Gemm" and head.attributes.get_int("transB", 0)
    return array if trans_b else array.T


def tied_gptq_pack(
    w: np.ndarray,
    quant: DefaultWeightOnlyQuantizer,
    sensitivity: TiedSensitivity,
    damp: float = DAMP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``W [K, N]`` (``E^T``) packed like ``quant.qbits_block_quant(W)``, weighted codes.

    The codes minimise the weighted objective of the module, row by row of ``E``.

    Returns:
        ``(packed, scales, zero_points)`` as ``qbits_block_quant`` returns them.
    """
    grid = ort_grid(w, quant)
    w, bits, block_size, step, zp = grid.w, grid.bits, grid.block_size, grid.step, grid.zp
    k, n = w.shape
    x = sensitivity.x
    plausible = sensitivity.weights.sum(axis=0)
    own = set(np.argsort(-plausible, kind="stable")[:OWN_ROWS].tolist())
    own |= set(np.flatnonzero(sensitivity.counts).tolist())
    own_rows = np.array(sorted(own), dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), own_rows)
    codes = np.empty((k, n), np.uint8)
    if rest.size:
        codes[:, rest] = gptq_codes(
            w[:, rest], x.T @ x, step[rest], zp[rest], bits, block_size, damp
        )
    for t in own_rows:
        hessian = (x * sensitivity.weights[:, t : t + 1]).T @ x
        hessian += sensitivity.counts[t] * sensitivity.lookup
        if not np.mean(np.diag(hessian)) > 0:
            hessian = x.T @ x
        codes[:, [t]] = gptq_codes(w[:, [t]], hessian, step[[t]], zp[[t]], bits, block_size, damp)
    return pack_codes(codes, bits, block_size), grid.scales, grid.zero_points
