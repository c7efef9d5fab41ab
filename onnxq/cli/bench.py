"""The ``onnxq bench`` command: interleaved latency benchmark of one or more models."""

from __future__ import annotations

import click

from onnxq import io, report
from onnxq.bench import benchmark
from onnxq.cli import options
from onnxq.cli._progress import terminal_progress
from onnxq.cli._reports import write_reports
from onnxq.errors import InputError

__all__ = ["bench", "parse_batch_sizes", "parse_shape_overrides"]


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """Parses ``1,8,32`` into a tuple of positive batch sizes.

    Raises:
        InputError: The text is not a comma-separated list of positive integers.
    """
    try:
        sizes = tuple(int(part) for part in text.split(","))
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError
    except ValueError:
        raise InputError(
            f"bad --batch-size '{text}': expected positive integers separated by commas, e.g. 1,8"
        ) from None
    return sizes


def parse_shape_overrides(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parses ``name=1,3,224,224`` items into a mapping.

    Raises:
        InputError: An item is not of that form.
    """
    overrides = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(
                f"bad --shape '{item}': expected NAME=D0,D1,... with positive integers"
            ) from None
        overrides[name] = shape
    return overrides


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@options.provider(extra={"all": "every available one"})
@options.batch_size(
    default="1", help="Comma-separated batch sizes, e.g. 1,8.", type=str, dest="batch_sizes"
)
@options.threads()
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=D0,D1,...",
    help="Concrete shape of an input with dynamic dimensions (repeatable).",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=str),
    help=".npz whose arrays (by input name) give the inputs; random otherwise.",
)
@options.time_budget(
    default=5.0, help="Seconds of timed runs per provider and batch size, all models together."
)
@click.option(
    "--min-runs",
    type=click.IntRange(min=2),
    default=20,
    help="Minimum timed rounds per batch size.",
)
@click.option("--seed", type=int, default=0, help="Seed of random inputs and bootstraps.")
@options.report_options("json", "html")
def bench(
    models: tuple[str, ...],
    provider: str,
    batch_sizes: str,
    threads: int | None,
    shapes: tuple[str, ...],
    data: str | None,
    time_budget: float,
    min_runs: int,
    seed: int,
    reports: dict[str, str | None],
) -> None:
    """Benchmark MODELS interleaved; ratios and speedups are relative to the first model."""
    sizes = parse_batch_sizes(batch_sizes)
    overrides = parse_shape_overrides(shapes)
    models_read = [item for m in models for item in io.model_inputs(m)]
    options.check_files([*models_read, ("--data file", data)], options.report_flags(reports))
    with terminal_progress("benchmarking") as progress:
        result = benchmark(
            list(models),
            provider=provider,
            batch_sizes=sizes,
            threads=threads,
            shapes=overrides,
            data=data,
            min_runs=min_runs,
            max_time=time_budget,
            seed=seed,
            progress=progress.fraction if progress else None,
        )
    data_dict = result.to_dict()
    click.echo(report.render_text(data_dict))
    write_reports(data_dict, reports)
