"""``onnxq compile``, ``onnxq passes`` and ``onnxq inspect``."""

from __future__ import annotations

import json
from collections import Counter

import click
import onnx_ir as ir

from onnxq import io
from onnxq.cli._common import command, model_path
from onnxq.config import CALIBRATION_METHODS, TARGETS, CompileConfig
from onnxq.pipeline import available_passes, build_pipeline, compile_model, load_pass, run_pipeline


def _write_json(path: str, data: dict) -> None:
    with io.atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


@command("compile")
@model_path()
@click.option("-o", "--output", required=True, help="Output .onnx path (must differ from MODEL).")
@click.option("--no-quantize", is_flag=True, help="Optimise in fp32 only (no int8).")
@click.option(
    "--calibration-data", "calibration", help="Calibration data: .npz, folder or pkg.mod:fn."
)
@click.option("--method", "calibration_method", type=click.Choice(CALIBRATION_METHODS))
@click.option("--target", type=click.Choice(TARGETS), help="Deployment target (default auto).")
@click.option("--verify", is_flag=True, default=None, help="Check outputs after every pass.")
@click.option("--tolerance", type=float, help="--verify tolerance for exact passes (relative).")
@click.option("--pass", "user_passes", multiple=True, help="Extra pass pkg.module:Class (repeat).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the compile report as JSON.")
def compile_command(
    model: str,
    output: str,
    no_quantize: bool,
    user_passes: tuple[str, ...],
    report: str | None,
    **options,
) -> None:
    """Compile MODEL (fp32 ONNX) into an optimised, by default int8, ONNX model."""
    if no_quantize:
        options["quantize"] = False
    config = CompileConfig.from_sources(options)
    extra = [load_pass(spec) for spec in user_passes]
    result = compile_model(model, output, config, extra_passes=extra)
    if report:
        _write_json(report, result)
    fusion = result["fusion"].get("note")
    click.echo(f"wrote {output}: {result['nodes_before']} -> {result['nodes_after']} nodes")
    if fusion:
        click.echo(f"batchnorm: {fusion}")


@command("passes")
def passes_command() -> None:
    """List every pass onnxq can run, with its stage and description."""
    for name, (stage, doc) in available_passes().items():
        click.echo(f"{stage:8s} {name:40s} {doc}")


def _param_stats(model: ir.Model) -> tuple[int, int]:
    count = size = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                count += value.const_value.size
                size += value.const_value.nbytes
    return count, size


def _describe_values(values) -> list[str]:
    return [f"{v.name}: {v.dtype} {list(v.shape) if v.shape is not None else '?'}" for v in values]


@command("inspect")
@model_path()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(model: str, as_json: bool) -> None:
    """Show MODEL's inputs, outputs, opsets, op histogram, parameters and what onnxq fuses."""
    ir_model = io.load_model(model)
    ops = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(ir_model.graph))
    params, nbytes = _param_stats(ir_model)
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
    _, records = run_pipeline(copy, build_pipeline(CompileConfig(quantize=False)))
    preview: dict = {}
    for record in records:
        if record.name == "FoldBatchNormPass":
            preview["batchnorm_folded"] = (
                record.details["batchnorm_before"] - record.details["batchnorm_after"]
            )
        elif record.name == "MarkFusedUnitsPass":
            preview["conv_activation_units"] = record.details["conv_act"]
            preview["matmul_bias_units"] = record.details["linear_bias"]
    return preview
