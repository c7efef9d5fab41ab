"""``onnxq compile``, ``onnxq passes`` and ``onnxq inspect``."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable

import click
import onnx_ir as ir

from onnxq import io
from onnxq.cli._common import command, model_path
from onnxq.cli._reports import check_report_paths, report_options, write_reports
from onnxq.compiler import CompileReport, compile_model
from onnxq.config import CALIBRATION_METHODS, TARGETS, CompileConfig
from onnxq.errors import InputError
from onnxq.passes.fuse import MarkFusedUnitsPass
from onnxq.passes.results import FoldBatchNormResult
from onnxq.pipeline import available_passes, build_pipeline, listed_steps
from onnxq.plugins import load_plugins, resolve_pass
from onnxq.prune_search import SearchResult, is_auto, search_sparsity
from onnxq.recording import run_pipeline


def _split(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """Flattens repeated and comma-separated option values; None when not given."""
    items = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
    return items or None


def plugin_option() -> Callable:
    """``--plugin pkg.module`` (repeatable): import it so its registered passes exist."""
    return click.option(
        "--plugin",
        "plugins",
        multiple=True,
        metavar="MODULE",
        help="Import this module first: its @register_pass classes can be named by --pass "
        "and are listed by 'onnxq passes' (repeat).",
    )


@command("compile")
@model_path()
@click.option("-o", "--output", required=True, help="Output .onnx path (must differ from MODEL).")
@click.option("--no-quantize", is_flag=True, help="Optimise in fp32 only (no int8).")
@click.option("--dynamic", is_flag=True, help="Dynamic int8 (not available yet: says how).")
@click.option(
    "--calibration-data", "calibration", help="Calibration data: .npz, folder or pkg.mod:fn."
)
@click.option("--method", "calibration_method", type=click.Choice(CALIBRATION_METHODS))
@click.option("--percentile", type=float, help="Percentile kept by --method percentile.")
@click.option("--max-samples", type=int, help="Use at most this many calibration samples.")
@click.option("--batch-size", type=int, help="Calibration batch size.")
@click.option("--ranges", help="Load activation ranges (JSON) instead of calibrating.")
@click.option("--save-ranges", help="Save the calibrated ranges (JSON) for later --ranges.")
@click.option("--target", type=click.Choice(TARGETS), help="Deployment target (default auto).")
@click.option("--exclude", multiple=True, help="Node name or regex kept fp32 (repeat or a,b).")
@click.option("--op-types", multiple=True, help="Quantize only these op types (a,b).")
@click.option(
    "--prune",
    help="Prune first: channels:0.3[:l2][:compensate], unstructured:0.5[:global], 2:4 or "
    "mask:FILE.npz (compensate: biases absorb removed channels' means; needs data). "
    "channels:auto searches the sparsity (--max-accuracy-drop).",
)
@click.option("--prune-exclude", multiple=True, help="Node, regex or op type never pruned (a,b).")
@click.option(
    "--max-accuracy-drop",
    type=float,
    metavar="POINTS",
    help="With --prune KIND:auto: largest top-1 drop (percentage points) the search accepts.",
)
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False, path_type=str),
    metavar="FILE.npz",
    help="With --prune KIND:auto: data the search measures top-1 on (needs --labels).",
)
@click.option("--labels", "labels_key", metavar="KEY", help="Key of the labels in --eval-data.")
@click.option("--min-sqnr", type=float, help="Fail when int8 vs fp32 SQNR (dB) is below this.")
@click.option(
    "--provider", type=click.Choice(["cpu", "cuda"]), help="Run calibration and checks on it."
)
@click.option(
    "--check-samples",
    "verify_samples",
    type=int,
    help="Samples the deployed int8 model is checked on against fp32 (default 32; 0: skip).",
)
@click.option("--no-latency-check", is_flag=True, help="Skip timing fp32 vs int8 after compile.")
@click.option("--verify", is_flag=True, default=None, help="Check outputs after every pass.")
@click.option("--tolerance", type=float, help="--verify tolerance for exact passes (relative).")
@click.option(
    "--pass",
    "user_passes",
    multiple=True,
    help="Extra pass: pkg.module:Class, or a registered pass's name (repeat).",
)
@plugin_option()
@click.option("--report", type=click.Path(dir_okay=False), help="Write the compile report as JSON.")
@report_options("markdown", "html")
def compile_command(
    model: str,
    output: str,
    no_quantize: bool,
    dynamic: bool,
    no_latency_check: bool,
    user_passes: tuple[str, ...],
    plugins: tuple[str, ...],
    report: str | None,
    reports: dict[str, str | None],
    max_accuracy_drop: float | None,
    eval_data: str | None,
    labels_key: str | None,
    **options,
) -> None:
    """Compile MODEL (fp32 ONNX) into an optimised, by default int8, ONNX model."""
    if dynamic:
        raise InputError(
            "dynamic int8 is not available yet; static int8 needs calibration data "
            "(--calibration-data calib.npz keyed by input names), or use --no-quantize"
        )
    if no_quantize:
        options["quantize"] = False
    if no_latency_check:
        options["check_latency"] = False
    options["exclude"] = _split(options["exclude"])
    options["op_types"] = _split(options["op_types"])
    options["prune_exclude"] = _split(options["prune_exclude"])
    config = CompileConfig.from_sources(options)
    check_report_paths({"report": report, **reports})
    load_plugins(plugins)
    extra = [resolve_pass(spec) for spec in user_passes]
    search = _search_prune(model, config, max_accuracy_drop, eval_data, labels_key)
    if search is not None:
        # The final compile (int8 included) prunes at the sparsity found, or not at all.
        config = dataclasses.replace(config, prune=search.spec)
    result = compile_model(model, output, config, extra_passes=extra)
    if search is not None:
        result.prune_search = search.to_dict()
        click.echo(_search_line(search))
    write_reports(result.to_dict(), {"json": report, **reports})
    _echo_summary(output, result)


def _search_prune(
    model: str,
    config: CompileConfig,
    max_drop: float | None,
    eval_data: str | None,
    labels_key: str | None,
) -> SearchResult | None:
    """Runs the sparsity search when ``--prune`` asks for ``auto``; checks its flags first."""
    if not is_auto(config.prune):
        if max_drop is not None or eval_data or labels_key:
            raise InputError(
                "--max-accuracy-drop, --eval-data and --labels only apply to "
                "--prune KIND:auto (e.g. channels:auto)"
            )
        return None
    if max_drop is None:
        raise InputError(f"--prune {config.prune} needs --max-accuracy-drop POINTS (top-1 budget)")
    if not eval_data:
        raise InputError(f"--prune {config.prune} needs --eval-data FILE.npz to measure top-1 on")
    if not labels_key:
        raise InputError("--eval-data needs --labels KEY: the search compares top-1 accuracy")
    return search_sparsity(model, config.prune, eval_data, labels_key, max_drop, config)


def _search_line(search: SearchResult) -> str:
    tried = ", ".join(f"{s:g}: {100 * top1:.1f}%" for s, top1 in search.tried)
    if search.spec is None:
        return (
            f"prune search: no tried sparsity keeps the drop <= {search.max_drop_points:g} "
            f"points, not pruned (top-1 {100 * search.accuracy_fp32:.1f}%; tried {tried})"
        )
    return (
        f"prune search: {search.spec} (top-1 {100 * search.accuracy_pruned:.1f}% vs "
        f"{100 * search.accuracy_fp32:.1f}%, drop {search.drop_points:.1f} <= "
        f"{search.max_drop_points:g} points; tried {tried})"
    )


def _echo_summary(output: str, result: CompileReport) -> None:
    click.echo(
        f"wrote {output}: {result.nodes_before} -> {result.nodes_after} nodes, "
        f"{result.size_before / 1e6:.2f} -> {result.size_after / 1e6:.2f} MB"
    )
    fusion = result.fusion.get("note")
    if fusion:
        click.echo(f"batchnorm: {fusion}")
    for name, details in (result.pruning or {}).items():
        if details.get("note"):
            click.echo(f"prune ({name}): {details['note']}")
    if result.numerics is not None:
        numerics = result.numerics
        click.echo(
            f"int8: {len(result.quantized_nodes or [])} nodes quantized, "
            f"{len(result.not_quantized or {})} kept fp32; target {numerics['target']} "
            f"({numerics['reason']}), weights {numerics['weight_range']}"
        )
    fidelity = result.fidelity or {}
    if fidelity.get("checked") is False:
        click.echo(f"fidelity vs fp32: NOT CHECKED ({fidelity['reason']})")
    elif fidelity:
        click.echo(
            f"fidelity vs fp32 on {fidelity['samples']} samples: "
            f"min SQNR {fidelity['min_sqnr_db']:.1f} dB (floor {fidelity['floor_db']:g})"
        )
    if result.latency is not None:
        latency = result.latency
        click.echo(
            f"latency batch 1: fp32 {latency['fp32_p50_ms']:.3f} ms, int8 "
            f"{latency['int8_p50_ms']:.3f} ms ({latency['speedup']:.2f}x)"
        )


@command("passes")
@plugin_option()
def passes_command(plugins: tuple[str, ...]) -> None:
    """List every pass onnxq can run, in pipeline order: stage, description and why."""
    load_plugins(plugins)
    whys: dict[str, list[tuple[str, str]]] = {}
    for stage, cls, why in listed_steps():
        whys.setdefault(cls.__name__, []).append((stage, why))
    for name, (stage, doc) in available_passes().items():
        click.echo(f"{stage:8s} {name:40s} {doc}".rstrip())
        # A pass that runs at several points has one reason per point, in pipeline order.
        for where, why in whys[name]:
            at = "" if where == stage else f"(again in {where}) "
            click.echo(f"{'':8s}   why: {at}{why}")


def _describe_values(values) -> list[str]:
    return [f"{v.name}: {v.dtype} {list(v.shape) if v.shape is not None else '?'}" for v in values]


@command("inspect")
@model_path()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(model: str, as_json: bool) -> None:
    """Show MODEL's inputs, outputs, opsets, op histogram, parameters and what onnxq fuses."""
    ir_model = io.load_model(model)
    ops = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(ir_model.graph))
    params, nbytes = io.parameter_stats(ir_model)
    info = {
        "inputs": _describe_values(ir_model.graph.inputs),
        "outputs": _describe_values(ir_model.graph.outputs),
        "opsets": dict(ir_model.opset_imports),
        "ops": dict(ops.most_common()),
        "parameters": params,
        "parameter_bytes": nbytes,
        "fusion": _fusion_preview(model),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("inputs", "outputs"):
        click.echo(f"{key}:")
        for line in info[key]:
            click.echo(f"  {line}")
    click.echo(f"opsets: {info['opsets']}")
    click.echo(f"parameters: {params:,} ({nbytes / 1e6:.2f} MB)")
    click.echo("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    click.echo("onnxq would fuse: " + ", ".join(f"{k}={v}" for k, v in info["fusion"].items()))


def _fusion_preview(path: str) -> dict:
    """Runs cleanup and fusion on a fresh copy and summarises what they found."""
    copy = io.load_model(path)
    copy, records = run_pipeline(copy, build_pipeline(CompileConfig(quantize=False)))
    folded = next(r.details for r in records if isinstance(r.result, FoldBatchNormResult))
    units = MarkFusedUnitsPass()(copy).details
    return {
        "batchnorm_folded": folded["batchnorm_before"] - folded["batchnorm_after"],
        "conv_activation_units": units["conv_act"],
        "matmul_bias_units": units["linear_bias"],
    }
