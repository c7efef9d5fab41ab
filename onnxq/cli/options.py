"""Options several commands share, each declared once; commands pick their defaults and help."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from onnxq import io
from onnxq.cli._config import load_defaults

__all__ = [
    "PROVIDERS",
    "REPORT_HELP",
    "batch_size",
    "check_files",
    "config",
    "labelled_data",
    "labels",
    "max_accuracy_drop",
    "min_sqnr",
    "model_path",
    "per_layer",
    "plugins",
    "provider",
    "report_flags",
    "report_options",
    "time_budget",
]

PROVIDERS = ("cpu", "cuda")

_PROVIDER_HELP = (
    "Execution provider: cpu (ONNX Runtime's CPUExecutionProvider) or cuda "
    "(CUDAExecutionProvider; needs onnxruntime-gpu and a GPU)"
)

REPORT_HELP = {
    "json": "Write the full report as JSON.",
    "markdown": "Write a Markdown summary.",
    "junit": "Write JUnit XML, one testcase per threshold.",
    "html": "Write a self-contained HTML report with plots.",
}

_PATH = click.Path(dir_okay=False, path_type=str)
# ctx.meta key of the TOML file the --config callback read defaults from.
_CONFIG_READ = "onnxq.config_file"
_POSITIVE = click.IntRange(min=1)


def model_path(name: str = "model") -> Callable:
    """A required argument naming an ONNX file (existence is checked by ``io.load_model``)."""
    return click.argument(name, type=_PATH)


def provider(*, default: str = "cpu", extra: dict[str, str] | None = None) -> Callable:
    """``--provider``; ``extra`` adds choices (name -> what it means)."""
    extra = extra or {}
    help_text = _PROVIDER_HELP + "".join(f"; {k}: {v}" for k, v in extra.items()) + "."
    return click.option(
        "--provider", type=click.Choice(PROVIDERS + tuple(extra)), default=default, help=help_text
    )


def time_budget(*, default: float, help: str) -> Callable:
    """``--time-budget SECONDS`` of timed runs."""
    return click.option(
        "--time-budget", type=click.FloatRange(min=0), default=default, metavar="SECONDS", help=help
    )


def batch_size(
    *,
    default: Any,
    help: str,
    type: Any = _POSITIVE,
    dest: str = "batch_size",
) -> Callable:
    """``--batch-size``: rows per ONNX Runtime run."""
    return click.option("--batch-size", dest, type=type, default=default, help=help)


def per_layer(help: str) -> Callable:
    """``--per-layer``: also compare intermediate tensors."""
    return click.option("--per-layer", is_flag=True, help=help)


def labels(help: str = "Key of the integer class labels in the data file.") -> Callable:
    """``--labels KEY``, passed to the command as ``labels_key``."""
    return click.option("--labels", "labels_key", metavar="KEY", help=help)


def labelled_data(fn: Callable) -> Callable:
    """The ``--data`` and ``--labels`` options of the commands that evaluate on data."""
    fn = labels()(fn)
    return click.option(
        "--data",
        required=True,
        type=_PATH,
        help=".npz whose keys are the model input names (plus the labels).",
    )(fn)


def max_accuracy_drop(help: str) -> Callable:
    """``--max-accuracy-drop POINTS``: a top-1 budget in percentage points."""
    return click.option("--max-accuracy-drop", type=float, metavar="POINTS", help=help)


def min_sqnr(*, default: float | None, help: str) -> Callable:
    """``--min-sqnr DB``: the lowest acceptable output SQNR."""
    return click.option("--min-sqnr", type=float, default=default, metavar="DB", help=help)


def plugins() -> Callable:
    """``--plugin pkg.module`` (repeatable): import it so its registered passes exist."""
    return click.option(
        "--plugin",
        "plugins",
        multiple=True,
        metavar="MODULE",
        help="Import this module first: its @register_pass classes can be named by --pass "
        "and are listed by 'onnxq passes' (repeat).",
    )


def report_options(*formats: str) -> Callable:
    """Adds ``--<format> PATH`` options; the command gets them as one ``reports`` dict."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["reports"] = {f: kwargs.pop(f"{f}_path") for f in formats}
            return fn(*args, **kwargs)

        for fmt in reversed(formats):
            wrapper = click.option(
                f"--{fmt}", f"{fmt}_path", metavar="PATH", type=_PATH, help=REPORT_HELP[fmt]
            )(wrapper)
        return wrapper

    return decorate


def config(table: tuple[str, ...], renamed: dict[str, str] | None = None) -> Callable:
    """``--config PATH``: option defaults from a TOML table, as black reads ``[tool.black]``.

    The eager callback runs before the other options are read and fills the command's
    ``default_map``, so flags given on the command line still win. Without ``--config``,
    ``./pyproject.toml`` is read when it exists.

    Args:
        table: The table's keys, e.g. ``("tool", "onnxq", "gate")``.
        renamed: Old key -> flag name; old keys still work, with a warning.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        path = value or "pyproject.toml"
        defaults = load_defaults(ctx, path, table, renamed or {})
        if Path(path).is_file():
            ctx.meta[_CONFIG_READ] = path
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    name = "[" + ".".join(table) + "]"
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False, path_type=str),
        is_eager=True,
        expose_value=False,
        callback=callback,
        show_default="./pyproject.toml if present",
        help=f"TOML file whose {name} table sets defaults; keys are named like the flags.",
    )


def check_files(
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    outputs: Mapping[str, str | os.PathLike | None],
) -> None:
    """Refuses, before any work, outputs that would overwrite an input or each other.

    The TOML file ``--config`` read (or ``./pyproject.toml``) counts as an input.

    Args:
        inputs: ``(what, path)`` of every file the command reads (`onnxq.io.model_inputs`
            lists a model with its external-data files).
        outputs: Flag -> path of every file it writes (``None``: not asked for).

    Raises:
        InputError: See `onnxq.io.check_paths`.
    """
    ctx = click.get_current_context(silent=True)
    config_file = ctx.meta.get(_CONFIG_READ) if ctx is not None else None
    io.check_paths([*inputs, ("config file", config_file)], outputs.items())


def report_flags(reports: Mapping[str, str | None]) -> dict[str, str | None]:
    """The ``reports`` of `report_options` keyed by their flags, for `check_files`."""
    return {f"--{fmt}": path for fmt, path in reports.items()}
