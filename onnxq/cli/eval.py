"""The ``onnxq eval`` command: accuracy and fidelity of a candidate against its reference."""

from __future__ import annotations

import click

from onnxq import io, report
from onnxq.cli import options
from onnxq.cli._reports import write_reports
from onnxq.evaluate import evaluate

__all__ = ["eval_command"]


@click.command("eval")
@options.model_path("reference")
@options.model_path("candidate")
@options.labelled_data
@options.batch_size(default=32, help="Rows per run.")
@options.per_layer("Also compare intermediate tensors the models share by name.")
@options.provider()
@options.report_options("json", "markdown", "html")
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
    options.check_files(
        [
            *io.model_inputs(reference, "reference model"),
            *io.model_inputs(candidate, "candidate model"),
            ("--data file", data),
        ],
        options.report_flags(reports),
    )
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
