"""The ``onnxq gate`` command: exit 0 when every release threshold holds, 1 when one does not."""

from __future__ import annotations

import click

from onnxq import io, report
from onnxq.cli import options
from onnxq.cli._reports import write_reports
from onnxq.errors import GateFailedError, InputError
from onnxq.gate import Thresholds, run_gate

__all__ = ["gate"]


@click.command("gate")
@options.model_path("reference")
@options.model_path("candidate")
@options.labelled_data
@options.max_accuracy_drop("Largest allowed top-1 accuracy drop, in percentage points.")
@options.min_sqnr(default=None, help="Smallest allowed output SQNR (dB).")
@click.option(
    "--min-speedup",
    type=float,
    metavar="X",
    help="Smallest allowed speedup (reference / candidate median latency).",
)
@click.option(
    "--max-latency-ms", type=float, metavar="MS", help="Largest allowed candidate median latency."
)
@options.batch_size(default=1, help="Batch size of the latency measurement.")
@options.provider()
@options.time_budget(default=5.0, help="Seconds of interleaved timing for the latency thresholds.")
@options.per_layer("Add per-layer errors to the reports.")
@options.report_options("json", "markdown", "junit", "html")
@options.config(("tool", "onnxq", "gate"))
def gate(
    reference: str,
    candidate: str,
    data: str,
    labels_key: str | None,
    max_accuracy_drop: float | None,
    min_sqnr: float | None,
    min_speedup: float | None,
    max_latency_ms: float | None,
    batch_size: int,
    provider: str,
    time_budget: float,
    per_layer: bool,
    reports: dict[str, str | None],
) -> None:
    """Judge CANDIDATE against REFERENCE; thresholds also come from [tool.onnxq.gate].

    Latency thresholds are judged on the 95% bootstrap confidence interval: a check whose
    interval straddles the threshold is inconclusive, and fails the gate.
    """
    # The defaults already hold [tool.onnxq.gate] (see options.config).
    thresholds = Thresholds(
        max_accuracy_drop=max_accuracy_drop,
        min_sqnr=min_sqnr,
        min_speedup=min_speedup,
        max_latency_ms=max_latency_ms,
    )
    if thresholds.is_empty():
        raise InputError(
            "no gate thresholds: give at least one of --max-accuracy-drop, --min-sqnr, "
            "--min-speedup, --max-latency-ms (or set them in pyproject.toml [tool.onnxq.gate])"
        )
    options.check_files(
        [
            *io.model_inputs(reference, "reference model"),
            *io.model_inputs(candidate, "candidate model"),
            ("--data file", data),
        ],
        options.report_flags(reports),
    )
    result = run_gate(
        reference,
        candidate,
        data,
        thresholds,
        labels_key=labels_key,
        batch_size=batch_size,
        provider=provider,
        time_budget=time_budget,
        per_layer=per_layer,
    )
    write_reports(result, reports)
    click.echo(report.render_text({"checks": result["checks"]}))
    click.echo(f"gate {result['status'].upper()}: {result['summary']}")
    if result["status"] != "pass":
        raise GateFailedError(result["summary"])
