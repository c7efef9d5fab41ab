"""Progress on a terminal's stderr for the library's progress callbacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

__all__ = ["TerminalProgress", "terminal_progress"]


class TerminalProgress:
    """A bar when the total is known, else a running count of items.

    Args:
        label: What is progressing, e.g. ``calibrating``.
        unit: What is counted when the total is unknown, e.g. ``samples``.
    """

    _STEPS = 1000  # resolution of `fraction`

    def __init__(self, label: str, unit: str = "items") -> None:
        self.label = label
        self.unit = unit
        self._bar = None
        self._counting = False

    def update(self, done: int, total: int | None) -> None:
        """Shows ``done`` out of ``total`` (``None``: unknown total)."""
        if total is None:
            self._counting = True
            click.echo(f"\r{self.label}: {done} {self.unit}", nl=False, err=True)
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
        step = done - self._bar.pos
        # Callers report often: redraw only when the bar actually moves.
        if step > 0:
            self._bar.update(step)

    def fraction(self, done: float) -> None:
        """Shows a fraction done, from 0 to 1."""
        self.update(int(done * self._STEPS), self._STEPS)

    def close(self) -> None:
        """Finishes the bar or the counter's line."""
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        if self._counting:
            click.echo(err=True)


@contextlib.contextmanager
def terminal_progress(label: str, unit: str = "items") -> Iterator[TerminalProgress | None]:
    """Yields a `TerminalProgress` when stderr is a terminal, else ``None`` (no output)."""
    if not sys.stderr.isatty():
        yield None
        return
    progress = TerminalProgress(label, unit)
    try:
        yield progress
    finally:
        progress.close()
