"""The ``onnxq demo`` command: the whole flow on the built-in digits net, offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from onnxq import report
from onnxq.cli import options
from onnxq.demo import GATE_BATCH, THROUGHPUT_BATCH, DemoResult, run_demo
from onnxq.errors import GateFailedError
from onnxq.gate import Thresholds
from onnxq.recipes import RECIPES, RecipeResult, run_recipe

if TYPE_CHECKING:
    from onnxq.training.loop import Progress

__all__ = ["demo"]

# How each gate threshold reads in the verdict line.
_THRESHOLD_TEXT = {
    "max_accuracy_drop": "top-1 drop <= {:g} points",
    "min_sqnr": "SQNR >= {:g} dB",
    "min_speedup": f"speedup >= {{:g}}x at batch {GATE_BATCH}",
    "max_latency_ms": f"p50 <= {{:g}} ms at batch {GATE_BATCH}",
}


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=str),
    default="demo-out",
    help="Folder for the models, data and reports (created if missing).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Training epochs.")
@options.time_budget(default=3.0, help="Seconds of interleaved timing per batch size.")
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=None,
    help="Run a training recipe instead and show the `onnxq compare` table of what it made.",
)
def demo(out: str, epochs: int, time_budget: float, recipe: str | None) -> None:
    """Train the digits net, compile it to int8, benchmark, evaluate and gate it, offline.

    Exits 0 when the int8 model passes the gate, 1 when it does not. With --recipe, runs
    that recipe (each under two minutes on two cores) and exits 0 once its table is shown:
    ptq (post-training int8), qat (4-bit weights on a quarter-width net, post-training
    vs quantization-aware), distill (a half-width student with and without
    distillation), prune-finetune (channels:0.3 in Torch, fine-tuned) and transfer (a 0-4
    backbone adapted to digits 5-9).
    """
    if recipe is not None:
        _run_recipe(recipe, out, epochs, time_budget)
        return
    result = run_demo(
        out,
        epochs=epochs,
        time_budget=time_budget,
        on_step=lambda message: click.echo(f"- {message}", err=True),
    )
    click.echo(_table(result))
    click.echo()
    click.echo(_speedup_line(result))
    click.echo(_verdict_line(result))
    for check in result.gate["checks"]:
        if check["status"] != "pass":
            click.echo(f"  {check['name']}: {check['message']}")
    click.echo(_reports_line(result))
    click.echo(f"done in {result.seconds:.1f} s")
    if result.status != "pass":
        raise GateFailedError(result.gate["summary"])


def _run_recipe(name: str, out: str, epochs: int, time_budget: float) -> None:
    def epoch_line(progress: Progress) -> None:
        # About ten lines per training run, and always its last epoch.
        every = max(1, progress.epochs // 10)
        if progress.epoch_done and (
            progress.epoch % every == 0 or progress.epoch == progress.epochs
        ):
            click.echo(
                f"  epoch {progress.epoch}/{progress.epochs}: loss {progress.epoch_loss:.4f}",
                err=True,
            )

    result: RecipeResult = run_recipe(
        name,
        out,
        epochs=epochs,
        time_budget=time_budget,
        on_step=lambda message: click.echo(f"- {message}", err=True),
        on_progress=epoch_line,
    )
    for line in result.output.notes:
        click.echo(line)
    if result.output.notes:
        click.echo()
    click.echo(report.render_text(result.compare))
    names = ", ".join(p.name for p in result.reports.values())
    click.echo(f"models and reports in {result.reports['json'].parent}/: {names}")
    click.echo(f"done in {result.seconds:.1f} s")


def _table(result: DemoResult) -> str:
    header = (
        f"{'model':<6} {'top-1':>7} {f'p50 ms (batch {GATE_BATCH})':>17} "
        f"{f'samples/s (batch {THROUGHPUT_BATCH})':>21} {'size':>9}"
    )
    lines = [header, "-" * len(header)]
    for m in result.models():
        lines.append(
            f"{m.name:<6} {100 * m.top1:>6.2f}% {m.p50_ms_batch1:>17.3f} "
            f"{m.throughput_batch32:>21,.0f} {m.size_bytes / 1024:>6.1f} KB"
        )
    return "\n".join(lines)


def _speedup_line(result: DemoResult) -> str:
    def parts(speedups: dict[int, tuple[float, list[float]]]) -> str:
        return ", ".join(
            f"{value:.2f}x at batch {batch} (95% CI {lo:.2f}-{hi:.2f})"
            for batch, (value, (lo, hi)) in speedups.items()
        )

    decision = result.latency_decision()
    writes = "int8" if decision.choice == "int8" else "the optimised fp32 model"
    return (
        f"int8 speedup over fp32 as exported: {parts(result.speedups())}\n"
        f"int8 speedup over onnxq's optimised fp32: {parts(result.speedups_vs_optimised())}\n"
        f"latency check at batch {GATE_BATCH}: {decision.reason}; with it, onnxq compile "
        f"writes {writes}"
    )


def _describe(thresholds: Thresholds) -> str:
    return ", ".join(
        text.format(getattr(thresholds, name))
        for name, text in _THRESHOLD_TEXT.items()
        if getattr(thresholds, name) is not None
    )


def _verdict_line(result: DemoResult) -> str:
    return (
        f"gate {result.status.upper()} ({_describe(result.thresholds)}): {result.gate['summary']}"
    )


def _reports_line(result: DemoResult) -> str:
    out = result.paths.out
    names = ", ".join(p.name for p in result.reports.values())
    extras = ", ".join(Path(p).name for p in (result.paths.compile_report, result.paths.bench))
    batches = f"batch-{GATE_BATCH}/{THROUGHPUT_BATCH}"
    return f"reports in {out}/: {names} (gate); {extras} (compile, {batches} bench)"
