"""``onnxq export``: export a zoo model or a Torch model factory to ONNX."""

from __future__ import annotations

import click

from onnxq.cli import options
from onnxq.errors import InputError

__all__ = ["export"]


class _ExportCommand(click.Command):
    """Lists the zoo models under the help; torch is imported only when help is shown."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from onnxq.models import EXPORTABLE

        with formatter.section("Zoo models"):
            formatter.write_dl([(name, info.description) for name, info in EXPORTABLE.items()])
        super().format_epilog(ctx, formatter)


# Names users type -> torch dtype attribute names (torch is imported only when exporting).
_DTYPES = ("float32", "float16", "int64", "int32")


@click.command("export", cls=_ExportCommand)
@click.argument("spec")
@click.option(
    "--input-shape",
    help="Example input shape, batch first (e.g. 1,3,224,224); zoo models have a default.",
)
@click.option(
    "--input-dtype",
    type=click.Choice(_DTYPES),
    help="Element type of the input; default: the zoo model's, else float32.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write."
)
@click.option(
    "--exporter",
    type=click.Choice(["auto", "dynamo", "torchscript"]),
    default="auto",
    help="auto: dynamo, falling back to TorchScript if it fails.",
)
@click.option(
    "--dynamic-batch/--no-dynamic-batch",
    default=True,
    help="Make the batch axis (axis 0) symbolic.",
)
def export(
    spec: str,
    input_shape: str | None,
    input_dtype: str | None,
    output: str,
    exporter: str,
    dynamic_batch: bool,
) -> None:
    """Export SPEC, a zoo model name or package.module:callable, to an ONNX file."""
    # A zoo name is not a module spec: only package.module:callable has a source file.
    source = options.module_file(spec) if ":" in spec else None
    options.check_files([("source of " + spec, source)], {"-o": output})
    # Torch is optional and slow to import: load it only for this command.
    import torch

    from onnxq.export import export_torch, load_factory, parse_input_shape
    from onnxq.models import EXPORTABLE

    info = EXPORTABLE.get(spec)
    factory = load_factory(spec)
    if input_shape is not None:
        shape = parse_input_shape(input_shape)
    elif info is not None:
        shape = info.input_shape
    else:
        raise InputError(f"--input-shape is required for '{spec}' (it is not a zoo model)")
    if input_dtype is not None:
        dtype = getattr(torch, input_dtype)
    else:
        dtype = info.input_dtype if info is not None else torch.float32
    result = export_torch(
        factory(),
        shape,
        output,
        input_dtype=dtype,
        dynamic_batch=dynamic_batch,
        exporter=exporter,
        **(
            {"input_names": info.input_names, "sequence_axis": info.sequence_axis}
            if info is not None
            else {}
        ),
    )
    click.echo(f"wrote {result.path} ({result.exporter} exporter)")
    if result.fallback_reason:
        click.echo(
            f"note: the dynamo exporter failed, so TorchScript was used: {result.fallback_reason}"
        )
