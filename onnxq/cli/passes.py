"""``onnxq passes``: every pass onnxq can run, in pipeline order, with why it runs there."""

from __future__ import annotations

import click

from onnxq.cli import options
from onnxq.pipeline import available_passes, listed_steps
from onnxq.plugins import load_plugins

__all__ = ["passes_command"]


@click.command("passes")
@options.plugins()
def passes_command(plugins: tuple[str, ...]) -> None:
    """List every pass onnxq can run, in pipeline order: stage, description and why."""
    load_plugins(plugins)
    whys: dict[str, list[tuple[str, str]]] = {}
    for stage, cls, why in listed_steps():
        whys.setdefault(cls.__name__, []).append((stage, why))
    for name, (stage, doc) in available_passes().items():
        click.echo(f"{stage:8s} {name:40s} {doc}".rstrip())
        # A pass that runs at several points has one reason per point, in pipeline order.
        for where, why in whys[name]:
            at = "" if where == stage else f"(again in {where}) "
            click.echo(f"{'':8s}   why: {at}{why}")
