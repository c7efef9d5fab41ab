"""``onnxq compile-many``: compile and gate a fleet of models in parallel, with one summary."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import click

from onnxq import report
from onnxq.cli import options
from onnxq.cli._manifest import read_manifest
from onnxq.cli._progress import terminal_progress
from onnxq.cli._reports import write_reports
from onnxq.errors import GateFailedError
from onnxq.executor import make_executor
from onnxq.fleet import PASS, remove_scratch, run_fleet

__all__ = ["compile_many"]


@click.command("compile-many")
@click.argument(
    "manifest", type=click.Path(dir_okay=False, path_type=str), default="pyproject.toml"
)
@options.executor
@options.report_options(
    "json", "markdown", "junit", helps={"junit": "Write JUnit XML, one testcase per model."}
)
def compile_many(
    manifest: str,
    executor: str,
    workers: int | None,
    ray_address: str | None,
    reports: dict[str, str | None],
) -> None:
    """Compile and gate the models of MANIFEST (TOML, or a pyproject's [tool.onnxq.fleet]).

    Models run in parallel on the executor. Each has its own paths, calibration data,
    compile settings (the keys of 'onnxq compile's config) and gate thresholds (the keys of
    'onnxq gate's); paths are relative to the manifest. A model is written only when it
    compiles and passes its gate; one model's failure does not stop the others. Exit 0 when
    every model passes, 1 when one fails to compile or misses its gate, 2 for a bad manifest
    (checked before any work).
    """
    fleet = read_manifest(manifest)
    options.check_files(
        fleet.inputs,
        {**fleet.outputs, **options.report_flags(reports)},
    )
    at_once = f", {workers} at a time" if workers else ""
    click.echo(f"compiling {len(fleet.models)} models ({executor} executor{at_once})", err=True)
    try:
        with make_executor(executor, workers, ray_address) as pool, _progress() as progress:
            result = run_fleet(fleet.models, pool, progress=progress)
    finally:
        # Workers the executor killed (Ctrl-C) could not remove their scratch folders.
        remove_scratch(fleet.models)
    write_reports(result, reports)
    click.echo(report.render_text(result))
    for entry in result["models"]:
        if entry["status"] != PASS:
            click.echo(f"{entry['name']}: {entry['status'].upper()}: {entry['reason']}")
    click.echo(f"fleet {result['status'].upper()}: {result['summary']}")
    if result["status"] != PASS:
        raise GateFailedError(result["summary"])


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[int, int | None], None]]:
    """A bar on a terminal; otherwise one line per model done (a CI log's progress)."""
    with terminal_progress("models", "models") as bar:
        if bar is not None:
            yield bar.update
            return

        def line(done: int, total: int | None) -> None:
            click.echo(f"models done: {done} of {total}", err=True)

        yield line
