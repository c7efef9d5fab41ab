"""The ``onnxq gate`` command: exit 0 when every release threshold holds, 1 when one does not."""

from __future__ import annotations

import click

from onnxq import report
from onnxq.cli._common import command, labelled_data, model_path
from onnxq.cli._reports import check_report_paths, report_options, write_reports
from onnxq.errors import GateFailedError
from onnxq.gate import resolve_thresholds, run_gate

__all__ = ["gate"]


@command("gate")
@model_path("reference")
@model_path("candidate")
@labelled_data
@click.option(
    "--max-accuracy-drop",
    type=float,
    metavar="POINTS",
    help="Largest allowed top-1 accuracy drop, in percentage points.",
)
@click.option("--min-sqnr", type=float, metavar="DB", help="Smallest allowed output SQNR (dB).")
@click.option(
    "--min-speedup",
    type=float,
    metavar="X",
    help="Smallest allowed speedup (reference / candidate median latency).",
)
@click.option(
    "--max-latency-ms", type=float, metavar="MS", help="Largest allowed candidate median latency."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Batch size of the latency measurement.",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--time-budget",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds of interleaved timing for the latency thresholds.",
)
@click.option("--per-layer", is_flag=True, help="Add per-layer errors to the reports.")
@report_options("json", "markdown", "junit", "html")
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
    """Judge CANDIDATE against REFERENCE; thresholds also come from pyproject.toml.

    Latency thresholds are judged on the 95% bootstrap confidence interval: a check whose
    interval straddles the threshold is inconclusive, and fails the gate.
    """
    thresholds = resolve_thresholds(
        {
            "max_accuracy_drop": max_accuracy_drop,
            "min_sqnr": min_sqnr,
            "min_speedup": min_speedup,
            "max_latency_ms": max_latency_ms,
        }
    )
    check_report_paths(reports)
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
