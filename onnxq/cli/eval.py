"""The ``onnxq eval`` command: accuracy and fidelity of a candidate against its reference."""

from __future__ import annotations

import click

from onnxq import report
from onnxq.cli._common import command, labelled_data, model_path
from onnxq.cli._reports import check_report_paths, report_options, write_reports
from onnxq.evaluate import evaluate

__all__ = ["eval_command"]


@command("eval")
@model_path("reference")
@model_path("candidate")
@labelled_data
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Rows per run."
)
@click.option(
    "--per-layer", is_flag=True, help="Also compare intermediate tensors the models share by name."
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@report_options("json", "markdown", "html")
def eval_command(
    reference: str,
    candidate: str,
    data: str,
    labels_key: str | None,
    batch_size: int,
    per_layer: bool,
    provider: str,
    reports: dict[str, str | None],
) -> None:
    """Compare CANDIDATE with REFERENCE on a data set: accuracy, SQNR, cosine, agreement."""
    check_report_paths(reports)
    result = evaluate(
        reference,
        candidate,
        data,
        labels_key=labels_key,
        batch_size=batch_size,
        per_layer=per_layer,
        provider=provider,
    ).to_dict()
    click.echo(report.render_text(result))
    write_reports(result, reports)
