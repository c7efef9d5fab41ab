"""Writing the report files that ``--json``, ``--markdown``, ``--junit`` and ``--html`` ask for."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from onnxq import report

__all__ = ["REPORT_WRITERS", "write_reports"]

# Option name -> writer.
REPORT_WRITERS: dict[str, Callable[[Mapping, str], None]] = {
    "json": report.write_json,
    "markdown": report.write_markdown,
    "junit": report.write_junit,
    "html": report.write_html,
}


def write_reports(data: Mapping, reports: Mapping[str, str | None]) -> None:
    """Writes the report in every format that was given a path."""
    for fmt, path in reports.items():
        if path is not None:
            REPORT_WRITERS[fmt](data, path)
