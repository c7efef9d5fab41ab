"""``onnxq inspect``: what a model holds and what onnxq would fuse in it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import onnx_ir as ir

from onnxq import io
from onnxq.cli import options
from onnxq.config import CompileConfig
from onnxq.errors import InputError
from onnxq.passes.fuse import MarkFusedUnitsPass
from onnxq.passes.results import FoldBatchNormResult
from onnxq.pipeline import build_pipeline
from onnxq.recording import run_pipeline
from onnxq.report import render_text

__all__ = ["inspect_command"]


def _dim(dim: int | ir.SymbolicDim) -> int | str | None:
    """A dimension as JSON: its size, its name, or None when it has neither."""
    return dim if isinstance(dim, int) else dim.value


def _describe_values(values: Iterable[ir.Value]) -> list[dict[str, Any]]:
    return [
        {
            "name": v.name,
            "dtype": v.dtype.name if v.dtype is not None else None,
            "shape": [_dim(d) for d in v.shape] if v.shape is not None else None,
        }
        for v in values
    ]


def _value_line(value: dict[str, Any]) -> str:
    shape = value["shape"]
    if shape is None:
        return f"{value['name']}: {value['dtype'] or '?'} ?"
    dims = ", ".join("?" if d is None else str(d) for d in shape)
    return f"{value['name']}: {value['dtype'] or '?'} [{dims}]"


@click.command("inspect")
@options.model_path()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(model: str, as_json: bool) -> None:
    """Show MODEL's inputs, outputs, opsets, op histogram, parameters and what onnxq fuses.

    Given a JSON report (``compile --report``, ``eval``, ``bench``, ``gate``) instead,
    show its tables: fidelity criteria, fp32 islands, coverage, timings.
    """
    if Path(model).suffix.lower() == ".json":
        _inspect_report(model, as_json)
        return
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
        "fusion": _fusion_preview(model, has_conv="Conv" in ops),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("inputs", "outputs"):
        click.echo(f"{key}:")
        for value in info[key]:
            click.echo(f"  {_value_line(value)}")
    click.echo(f"opsets: {info['opsets']}")
    click.echo(f"parameters: {params:,} ({nbytes / 1e6:.2f} MB)")
    click.echo("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    click.echo("onnxq would fuse: " + ", ".join(f"{k}={v}" for k, v in info["fusion"].items()))


def _inspect_report(path: str, as_json: bool) -> None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the report: {e}") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise InputError(f"{path}: not an onnxq report (no 'kind')")
    click.echo(json.dumps(data, indent=2) if as_json else render_text(data))


def _fusion_preview(path: str, *, has_conv: bool) -> dict[str, int]:
    """Runs cleanup and fusion on a fresh copy and summarises what they found."""
    copy = io.load_model(path)
    copy, records = run_pipeline(copy, build_pipeline(CompileConfig(quantize=False)))
    folded = next(r.details for r in records if isinstance(r.result, FoldBatchNormResult))
    units = MarkFusedUnitsPass()(copy).details
    preview = {"batchnorm_folded": folded["batchnorm_before"] - folded["batchnorm_after"]}
    # Conv + activation units mean nothing for a model without Conv (e.g. a transformer).
    if has_conv:
        preview["conv_activation_units"] = units["conv_act"]
    preview["matmul_bias_units"] = units["linear_bias"]
    return preview
