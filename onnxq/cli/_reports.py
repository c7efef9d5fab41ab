"""Writing the report files that ``--json``, ``--markdown``, ``--junit`` and ``--html`` ask for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from onnxq import report
from onnxq.errors import InputError

__all__ = ["REPORT_WRITERS", "check_report_paths", "write_reports"]

# Option name -> writer.
REPORT_WRITERS: dict[str, Callable[[Mapping, str], None]] = {
    "json": report.write_json,
    "markdown": report.write_markdown,
    "junit": report.write_junit,
    "html": report.write_html,
}


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
            REPORT_WRITERS[fmt](data, path)
