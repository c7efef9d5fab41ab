"""The CLI group, its error handling and the options several commands share."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from onnxq.errors import EXIT_USAGE, OnnxqError

__all__ = ["command", "labelled_data", "main", "model_path"]

logger = logging.getLogger("onnxq")


class _Group(click.Group):
    """A click group that turns onnxq errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OnnxqError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(
                f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True
            )
            sys.exit(EXIT_USAGE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs.")
@click.version_option(package_name="onnxq")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """onnxq: compile ONNX models to fast, accurate int8 for ONNX Runtime."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def command(*args: Any, **kwargs: Any) -> Callable:
    """Registers a subcommand on the ``onnxq`` group (``click.command`` arguments)."""
    return main.command(*args, **kwargs)


def model_path(name: str = "model") -> Callable:
    """A required argument naming an ONNX file (existence is checked by ``io.load_model``)."""
    return click.argument(name, type=click.Path(dir_okay=False, path_type=str))


def labelled_data(fn: Callable) -> Callable:
    """The ``--data`` and ``--labels`` options of the commands that evaluate on data."""
    fn = click.option("--labels", "labels_key", metavar="KEY", help="Key of integer class labels.")(
        fn
    )
    return click.option(
        "--data",
        required=True,
        type=click.Path(dir_okay=False, path_type=str),
        help=".npz whose keys are the model input names (plus the labels).",
    )(fn)
