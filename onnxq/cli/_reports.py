"""Report-file options and progress bars shared by the compile, bench, eval and gate commands."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from onnxq import report
from onnxq.errors import InputError

__all__ = [
    "REPORT_FORMATS",
    "check_report_paths",
    "progress_callback",
    "report_options",
    "write_reports",
]

# Option name -> writer; the option's destination is ``<name>_path``.
REPORT_FORMATS: dict[str, Callable[[Mapping, str], None]] = {
    "json": report.write_json,
    "markdown": report.write_markdown,
    "junit": report.write_junit,
    "html": report.write_html,
}

_HELP = {
    "json": "Write the full report as JSON.",
    "markdown": "Write a Markdown summary.",
    "junit": "Write JUnit XML, one testcase per threshold.",
    "html": "Write a self-contained HTML report with plots.",
}


def report_options(*formats: str) -> Callable:
    """Adds ``--<format> PATH`` options; the command gets them as one ``reports`` dict."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["reports"] = {f: kwargs.pop(f"{f}_path") for f in formats}
            return fn(*args, **kwargs)

        for fmt in reversed(formats):
            wrapper = click.option(
                f"--{fmt}",
                f"{fmt}_path",
                metavar="PATH",
                type=click.Path(dir_okay=False, path_type=str),
                help=_HELP[fmt],
            )(wrapper)
        return wrapper

    return decorate


def check_report_paths(reports: Mapping[str, str | None]) -> None:
    """Fails early, before any long run, when a report cannot be written where asked.

    Raises:
        InputError: A report path's folder does not exist or the path is a folder.
    """
    for fmt, path in reports.items():
        if path is None:
            continue
        p = Path(path)
        if not p.parent.is_dir():
            raise InputError(f"--{fmt} {path}: folder '{p.parent}' does not exist")
        if p.is_dir():
            raise InputError(f"--{fmt} {path}: is a folder; give a file name")


def write_reports(data: Mapping, reports: Mapping[str, str | None]) -> None:
    """Writes the report in every format that was given a path."""
    for fmt, path in reports.items():
        if path is not None:
            REPORT_FORMATS[fmt](data, path)


@contextlib.contextmanager
def progress_callback(label: str) -> Iterator[Callable[[float], None] | None]:
    """Yields a fraction-done callback drawing a bar on a terminal's stderr, else ``None``."""
    if not sys.stderr.isatty():
        yield None
        return
    steps = 1000
    with click.progressbar(length=steps, label=label, file=sys.stderr) as bar:

        def update(fraction: float) -> None:
            step = int(fraction * steps) - bar.pos
            # Called once per timed round: redraw only when the bar actually moves.
            if step > 0:
                bar.update(step)

        yield update
