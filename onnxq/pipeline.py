"""The compile pipeline: every step of a compile, in order, each with the reason it runs there.

Read ``build_pipeline`` top to bottom: it is the whole data path::

    cleanup -> fuse -> (prune) -> (user passes) -> (quantize: mark, calibrate, insert QDQ)
                                                 or (quantize --mode dynamic: dynamic int8)
                                                 or (--mode auto: mark, calibrate given data;
                                                     onnxq.auto chooses per unit)

Each step is an ordinary ``onnx_ir.passes`` pass; `onnxq.recording.run_pipeline` runs them
with onnx_ir's ``PassManager`` and records what each did; `onnxq.compiler.compile_model`
loads, runs, checks and saves. ``onnxq passes`` lists the steps with their reasons.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.calibration.collect import CalibrationProgress
from onnxq.calibration.data import CalibrationData
from onnxq.calibration.ranges_file import load_ranges
from onnxq.config import CompileConfig
from onnxq.errors import InputError
from onnxq.executor import Executor
from onnxq.numerics import numerics_for
from onnxq.passes.calibrate import CalibrateRangesPass
from onnxq.passes.cleanup import (
    MIN_OPSET,
    EliminateIdentityPass,
    FoldConstantsPass,
    InferShapesPass,
    RemoveNoOpsPass,
    UpgradeOpsetPass,
)
from onnxq.passes.dynamic import QuantizeDynamicPass
from onnxq.passes.fuse import FoldBatchNormPass, MarkFusedUnitsPass, PoolingToGlobalPass
from onnxq.passes.layernorm import PreventSkipLayerNormFusionPass, without_skip_layernorm
from onnxq.passes.prune import ApplyMasksPass, PruneChannelsPass, PruneWeightsPass
from onnxq.passes.qdq import InsertQDQPass
from onnxq.passes.weight_only import QuantizeWeightsNBitsPass
from onnxq.plugins import registered_passes
from onnxq.prune_spec import PruneSpec
from onnxq.recording import Step

__all__ = ["NEEDS_DATA", "available_passes", "build_pipeline", "listed_steps", "optimised_fp32"]

NEEDS_DATA = (
    "static int8 needs calibration data (a .npz keyed by the model's input names, axis 0 = "
    "samples; a folder of .npy/.npz files or images; or pkg.module:fn), or ranges saved by "
    "an earlier compile; or no quantization (fp32)"
)

# Why each pass a --prune request expands to runs (see PruneSpec.passes).
_PRUNE_WHY: dict[type[ir.passes.PassBase], str] = {
    PruneChannelsPass: "prune channels: remove the least important output channels "
    "after BN folding (a folded channel's norm carries BN's scale), before calibration",
    common_passes.RemoveUnusedNodesPass: "removed channels leave shape computations "
    "(Reshape's Concat) unused",
    PruneWeightsPass: "prune unstructured / 2:4: zero the smallest weights, after BN "
    "folding, before calibration",
    ApplyMasksPass: "prune mask: apply the given 0/1 masks, before calibration",
}
_USER_WHY = "user pass: after fusion, on a clean fp32 graph that is then calibrated and quantized"


def build_pipeline(
    config: CompileConfig,
    extra_passes: Sequence[ir.passes.PassBase] = (),
    *,
    opset: int = MIN_OPSET,
    calibration: CalibrationData | None = None,
    progress: CalibrationProgress | None = None,
    executor: Executor | None = None,
) -> list[Step]:
    """Returns the ordered steps that compile a model under ``config``.

    Args:
        config: The compile configuration.
        extra_passes: User passes, run after fusion and before quantization, so they see
            a clean fp32 graph and their result is calibrated and quantized.
        opset: The model's default-domain opset (older models are upgraded first).
        calibration: Calibration data, required to quantize unless ``config.ranges``;
            channel pruning uses it (when given) to compensate biases.
        progress: Called as calibration goes, with the samples done and the total.
        executor: Runs calibration's shards (default: one pass in this process).

    Raises:
        InputError: Quantizing without calibration data or ranges; a bad ``--prune``.
    """
    prune = _prune_passes(config, calibration)
    return [
        # ---- cleanup: later passes see weights as initializers, no no-ops, nodes in order
        *(
            [
                Step(
                    "cleanup",
                    UpgradeOpsetPass(),
                    "opset < 13: per-channel DequantizeLinear and the rewrite rules need "
                    "current op versions",
                )
            ]
            if opset < MIN_OPSET
            else []
        ),
        Step(
            "cleanup",
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
            "weights in Constant nodes become initializers, which fusion, quantization and "
            "ONNX Runtime's QDQ fusions look for",
        ),
        Step(
            "cleanup",
            FoldConstantsPass(),
            "fold weight arithmetic (e.g. torch prune's weight_orig * weight_mask) into "
            "plain weights",
        ),
        Step(
            "cleanup",
            RemoveNoOpsPass(),
            "no Dropout, x+0, x*1, no-op Cast/Transpose between the ops later passes match",
        ),
        Step(
            "cleanup",
            EliminateIdentityPass(),
            "no Identity between the ops later passes match (graph output names kept)",
        ),
        Step(
            "cleanup",
            common_passes.RemoveUnusedNodesPass(),
            "drop what folding and no-op removal left unused",
        ),
        Step(
            "cleanup",
            common_passes.RemoveUnusedFunctionsPass(),
            "drop model-local functions nothing calls",
        ),
        Step("cleanup", common_passes.RemoveUnusedOpsetsPass(), "drop opset imports nothing uses"),
        Step(
            "cleanup",
            common_passes.TopologicalSortPass(),
            "nodes in order: the pattern matchers and analyses walk the graph forwards",
        ),
        Step(
            "cleanup",
            InferShapesPass(),
            "element types on every value (quantization only touches float tensors); wrong "
            "declared output shapes repaired",
        ),
        Step(
            "cleanup",
            common_passes.NameFixPass(),
            "unique names: later passes key their analysis and reports on node and value names",
        ),
        # ---- fuse: exact rewrites that leave fewer, int8-friendlier ops
        Step(
            "fuse",
            FoldBatchNormPass(),
            "fold BN into Conv/ConvTranspose/Gemm weights: exact and free at run time",
        ),
        Step("fuse", common_passes.RemoveUnusedNodesPass(), "drop the folded BN's parameters"),
        # After BN folding: the fold refuses a weight or bias shared with another node.
        # The hashed variant fails on non-contiguous arrays in onnx_ir 1.1; the byte-keyed
        # one is exact and only sees small tensors.
        Step(
            "fuse",
            common_passes.DeduplicateInitializersPass(size_limit=4096),
            "merge equal small initializers (exporters emit many equal zero biases), once BN "
            "folding no longer needs them apart",
        ),
        Step(
            "fuse",
            common_passes.CommonSubexpressionEliminationPass(),
            "compute equal subexpressions once (merged initializers make more of them equal)",
        ),
        Step(
            "fuse",
            PoolingToGlobalPass(),
            "spatial ReduceMean as GlobalAveragePool, which has an int8 kernel",
        ),
        *_layernorm_steps(config),
        # ---- prune (--prune): changes the outputs by design; later steps compare with it
        *(
            Step(
                "prune",
                p,
                _PRUNE_WHY.get(type(p), "carries out the prune request"),
                preserves_outputs=False,
                resets_reference=True,
            )
            for p in prune
        ),
        # ---- user passes (--pass): must keep the outputs (--verify's tolerance) unless
        # the pass class says ``exact = False`` (then only the SQNR floor applies)
        *(
            Step("user", p, _USER_WHY, preserves_outputs=bool(getattr(p, "exact", True)))
            for p in extra_passes
        ),
        # ---- quantize (unless --no-quantize)
        *(_quantize_steps(config, calibration, progress, executor) if config.quantize else []),
    ]


def _layernorm_steps(config: CompileConfig) -> list[Step]:
    """Keeps ONNX Runtime's CPU SkipLayerNormalization out where it is measured slower.

    Not before static QDQ (``static``/``auto``): there the residual Add is an int8 unit
    (QLinearAdd), which a Sum would not be. Static int8 rewrites its fp32 Adds after QDQ
    insertion instead, and its fp32 baseline and fallback as this pipeline would
    (`onnxq.passes.layernorm.without_skip_layernorm`).
    """
    if not config.runs_on_cpu:
        return []
    if config.quantize and config.mode in ("static", "auto"):
        return []
    return [
        Step(
            "fuse",
            PreventSkipLayerNormFusionPass(),
            "residual Add before LayerNormalization as Sum where ONNX Runtime's CPU "
            "SkipLayerNormalization, which it would fuse them into, is measured slower here",
        )
    ]


def optimised_fp32(model: ir.Model, config: CompileConfig) -> ir.Model:
    """The fp32 ``model`` as ``--no-quantize`` writes it under ``config`` (may be itself).

    The pipelines that quantize activations statically skip `_layernorm_steps`; their
    fp32 baseline and fallback are this (a copy sharing the weights, when it differs).
    """
    return without_skip_layernorm(model) if config.runs_on_cpu else model


def _weight_only_steps(
    config: CompileConfig, calibration: CalibrationData | None = None
) -> list[Step]:
    """The weight-only steps (``--mode weight-only``): activations float.

    Given calibration data, each weight's scales (AWQ-style) and bits (4, 8 or fp32
    against the ``--min-sqnr`` floor) are chosen from the output error on the activations
    it multiplies; without, plain round-to-nearest at ``--bits``.
    """
    return [
        Step(
            "quantize",
            QuantizeWeightsNBitsPass(
                config.bits,
                config.block_size,
                symmetric=config.symmetric,
                accuracy_level=config.accuracy_level,
                exclude=config.exclude,
                calibration=calibration,
                tied_block_size=config.tied_block_size,
                min_sqnr_db=config.min_sqnr if calibration is not None else None,
                provider=config.provider,
            ),
            "MatMul weights block-wise in 4/8 bits (MatMulNBits) on the final fp32 graph: "
            "decode steps are bound by reading weights, which this shrinks (given data: "
            "activation-aware scales, bits by measured error)",
            preserves_outputs=False,
        ),
        _drop_replaced_weights(),
    ]


def _drop_replaced_weights() -> Step:
    return Step(
        "quantize",
        common_passes.RemoveUnusedNodesPass(),
        "drop the fp32 weights replaced by int8 ones: they must not be saved",
        preserves_outputs=False,
    )


def _dynamic_steps(config: CompileConfig) -> list[Step]:
    """The dynamic int8 steps (``--mode dynamic``): no calibration, weights ahead of time.

    No transformer fusion before it: onnxscript's ``ort_fusions.optimize_for_ort`` does
    fuse the zoo ``bert`` (4 MultiHeadAttention, 8 SkipLayerNormalization, 4 BiasGelu), but
    ONNX Runtime's own session optimiser already fuses the SkipLayerNorms, so fp32 gains
    nothing (10.5 vs 10.6 ms, 1 thread, seq 128), and dynamic int8 on the fused graph ran
    1.3x slower than on the unfused one (5.1 vs 3.8 ms): its MultiHeadAttention is slower
    here than ORT's FusedMatMul/Softmax path. See benchmarks/README.md. (ORT's fused
    SkipLayerNormalization itself is slow on CPU: `_layernorm_steps` keeps it out.)
    """
    return [
        Step(
            "quantize",
            QuantizeDynamicPass(
                numerics_for(config.target), exclude=config.exclude, op_types=config.op_types
            ),
            "dynamic int8 on the final fp32 graph: constant-weight MatMul/Gemm become "
            "DynamicQuantizeLinear + MatMulInteger (ONNX Runtime fuses them into "
            "DynamicQuantizeMatMul), LSTM DynamicQuantizeLSTM, embedding tables int8; activations "
            "quantized at run time",
            preserves_outputs=False,
        ),
        _drop_replaced_weights(),
        Step(
            "quantize",
            common_passes.NameFixPass(),
            "unique names for the nodes the rewrite added",
            preserves_outputs=False,
        ),
    ]


def _quantize_steps(
    config: CompileConfig,
    calibration: CalibrationData | None,
    progress: CalibrationProgress | None,
    executor: Executor | None,
) -> list[Step]:
    """The int8 steps, in order (a function only because they exist only when quantizing)."""
    if config.mode == "dynamic":
        return _dynamic_steps(config)
    if config.mode == "weight-only":
        return _weight_only_steps(config, calibration)
    if config.mode == "auto":
        # The candidates are built by onnxq.auto on clones of this (calibrated) model.
        return _calibration_steps(config, calibration, progress, executor) if calibration else []
    return [
        *_calibration_steps(config, calibration, progress, executor),
        Step(
            "quantize",
            InsertQDQPass(
                numerics_for(config.target), exclude=config.exclude, op_types=config.op_types
            ),
            "int8 QDQ where ONNX Runtime fuses int8 kernels",
            preserves_outputs=False,
        ),
        _drop_replaced_weights(),
        Step(
            "quantize",
            common_passes.TopologicalSortPass(),
            "keep the new Q/DQ nodes in order",
            preserves_outputs=False,
        ),
        Step(
            "quantize",
            common_passes.NameFixPass(),
            "unique names: a weight shared by two nodes gets one DequantizeLinear per use",
            preserves_outputs=False,
        ),
    ]


def _calibration_steps(
    config: CompileConfig,
    calibration: CalibrationData | None,
    progress: CalibrationProgress | None,
    executor: Executor | None,
) -> list[Step]:
    return [
        Step(
            "quantize",
            MarkFusedUnitsPass(),
            "mark conv+relu units on the final fp32 graph (pruning and user passes leave no "
            "stale marks): no Q/DQ inside a unit",
        ),
        Step(
            "quantize",
            _calibrate_pass(config, calibration, progress, executor),
            "ranges from the final fp32 activations, streamed (or preloaded)",
        ),
    ]


def _prune_passes(
    config: CompileConfig, calibration: CalibrationData | None
) -> list[ir.passes.PassBase]:
    if not config.prune:
        return []
    spec = PruneSpec.parse(config.prune, exclude=config.prune_exclude)
    if spec.compensate and calibration is None:
        raise InputError(f"--prune {config.prune}: compensate needs --calibration-data")
    return spec.passes(calibration, provider=config.provider)


def _calibrate_pass(
    config: CompileConfig,
    calibration: CalibrationData | None,
    progress: CalibrationProgress | None,
    executor: Executor | None,
) -> CalibrateRangesPass:
    if config.ranges:
        ranges, _ = load_ranges(config.ranges)
        return CalibrateRangesPass(ranges=ranges)
    if calibration is None:
        raise InputError(NEEDS_DATA)
    return CalibrateRangesPass(
        calibration,
        method=config.calibration_method,
        params={"percentile": config.percentile}
        if config.calibration_method == "percentile"
        else None,
        provider=config.provider,
        progress=progress,
        max_memory=config.max_memory_bytes,
        executor=executor,
    )


# ---------------------------------------------------------------------------- listing


class _ListingOnly:
    """Stands in for calibration data when the pipeline is only built to be listed."""

    def __repr__(self) -> str:
        return "<listing only>"


def listed_steps() -> list[tuple[str, type[ir.passes.PassBase], str]]:
    """Every pass a compile can run, in pipeline order: ``(stage, class, why)``.

    Built from ``build_pipeline`` itself (an old-opset int8 compile) so the listing cannot
    drift from what runs, plus every pass a ``--prune`` kind can add and the registered
    user passes.
    """
    steps = build_pipeline(
        CompileConfig(),
        opset=MIN_OPSET - 1,
        calibration=_ListingOnly(),  # type: ignore[arg-type]
    )
    rows = [(s.stage, type(s.pass_), s.why) for s in steps if s.stage != "quantize"]
    fp32 = CompileConfig(quantize=False)
    rows += [(s.stage, type(s.pass_), s.why) for s in _layernorm_steps(fp32)]
    rows += [("prune", cls, why) for cls, why in _PRUNE_WHY.items()]
    rows += [("user", cls, _USER_WHY) for cls in registered_passes().values()]
    rows += [(s.stage, type(s.pass_), s.why) for s in steps if s.stage == "quantize"]
    rows += [(s.stage, type(s.pass_), s.why) for s in _dynamic_steps(CompileConfig())[:1]]
    rows += [(s.stage, type(s.pass_), s.why) for s in _weight_only_steps(CompileConfig())[:1]]
    return rows


def available_passes() -> dict[str, tuple[str, str]]:
    """Returns ``{pass name: (stage, one-line description)}`` for every pass onnxq can run."""
    found: dict[str, tuple[str, str]] = {}
    for stage, cls, _ in listed_steps():
        found.setdefault(cls.__name__, (stage, _first_line(cls)))
    return found


def _first_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
