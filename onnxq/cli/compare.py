"""The ``onnxq compare`` command: the compression evaluation table of a reference and candidates."""

from __future__ import annotations

import click

from onnxq import io, report
from onnxq.cli import options
from onnxq.cli._progress import terminal_progress
from onnxq.cli._reports import write_reports
from onnxq.cli.bench import parse_batch_sizes
from onnxq.compare import compare

__all__ = ["compare_command"]


@click.command("compare")
@options.model_path("reference")
@click.argument(
    "candidates", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str)
)
@options.labelled_data
@options.provider()
@options.batch_size(
    default="1,8", help="Comma-separated batch sizes timed.", type=str, dest="batch_sizes"
)
@options.threads()
@options.time_budget(default=2.0, help="Seconds of interleaved timing per batch size.")
@options.report_options("json", "markdown", "html")
def compare_command(
    reference: str,
    candidates: tuple[str, ...],
    data: str,
    labels_key: str | None,
    provider: str,
    batch_sizes: str,
    threads: int | None,
    time_budget: float,
    reports: dict[str, str | None],
) -> None:
    """Size, parameters, MACs, accuracy, fidelity and latency of CANDIDATES against REFERENCE.

    Accuracy needs --labels; speedups are relative to REFERENCE; the Pareto column names
    the fronts (top-1 against batch-1 latency and against size) a model is on.
    """
    timing = {"batch_sizes": parse_batch_sizes(batch_sizes), "threads": threads}
    models_read = [
        *io.model_inputs(reference, "reference model"),
        *(item for c in candidates for item in io.model_inputs(c, "candidate model")),
    ]
    options.check_files([*models_read, ("--data file", data)], options.report_flags(reports))
    with terminal_progress("timing") as progress:
        timing["progress"] = progress.fraction if progress else None
        result = compare(
            reference,
            list(candidates),
            data,
            labels_key=labels_key,
            provider=provider,
            max_time=time_budget,
            **timing,
        )
    click.echo(report.render_text(result))
    write_reports(result, reports)
