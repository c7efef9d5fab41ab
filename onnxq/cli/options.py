"""Options several commands share, each declared once; commands pick their defaults and help."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from onnxq import io
from onnxq.cli._config import load_defaults
from onnxq.config import check_number
from onnxq.errors import InputError
from onnxq.executor import EXECUTORS

__all__ = [
    "PROVIDERS",
    "REPORT_HELP",
    "batch_size",
    "check_files",
    "config",
    "executor",
    "image_preprocessing",
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
    "threads",
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


class Numbers(click.ParamType):
    """Comma-separated numbers (``0.5,0.4,0.3``; a TOML list or one number too).

    One value stands for all ``count`` of them.
    """

    # Which TOML values `onnxq.cli._config` accepts for options of this type.
    config_types = (str, int, float, list)
    config_expected = "a number, a list of numbers or a comma-separated string"

    def __init__(self, kind: type, count: int, metavar: str) -> None:
        self.kind, self.count, self.name = kind, count, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        items = value.split(",") if isinstance(value, str) else value
        items = items if isinstance(items, list) else [items]
        try:
            numbers = tuple(_number(item, self.kind) for item in items)
        except ValueError:
            self.fail(f"expected {self.name} ({self.kind.__name__}s), got {value!r}", param, ctx)
        if len(numbers) == 1:
            numbers *= self.count
        if len(numbers) != self.count:
            self.fail(f"expected {self.count} values ({self.name}), got {value!r}", param, ctx)
        return numbers


class Fraction(click.ParamType):
    """A number, written as a decimal or a fraction such as ``1/255``."""

    name = "X"
    config_types = (str, int, float)
    config_expected = "a number or a fraction such as '1/255'"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return _number(value, float)
        except (ValueError, ZeroDivisionError):
            self.fail(f"expected a number or a fraction such as 1/255, got {value!r}", param, ctx)


def _number(item: Any, kind: type) -> Any:
    """``item`` (a number or its text; ``a/b`` for floats) as ``kind``; ValueError if not."""
    if isinstance(item, bool) or not isinstance(item, (str, int, float)):
        raise ValueError(item)
    if isinstance(item, str) and kind is float and "/" in item:
        top, _, bottom = item.partition("/")
        return float(top) / float(bottom)
    number = kind(item.strip() if isinstance(item, str) else item)
    if kind is int and number != float(item):
        raise ValueError(item)
    return number


def weight_only(defaults: Any, modes: Sequence[str]) -> Callable[[Callable], Callable]:
    """``--mode`` and the options of ``--mode weight-only`` (see `onnxq.passes.weight_only`).

    Args:
        defaults: The default `CompileConfig`.
        modes: The ``--mode`` choices.
    """
    wo = "--mode weight-only"
    mode_help = (
        "static: int8 QDQ from calibrated activation ranges (needs calibration data); "
        "dynamic: int8 weights of MatMul/Gemm/LSTM, activations quantized at run time (no "
        "calibration data; given some, it checks fidelity on it); weight-only: MatMul "
        "weights block-wise in --bits (ONNX Runtime's MatMulNBits), activations float (given "
        "calibration data: activation-aware scales, and layers whose output SQNR misses "
        "--min-sqnr go to 8 bits or fp32); auto: per MatMul/Gemm/LSTM/int8 op, whichever "
        "of static (only with calibration data), dynamic, weight-only or fp32 meets the "
        "fidelity floors and "
        "is fastest on this machine (timed on the first sample or --shape)."
    )
    table: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--mode",), {"type": click.Choice(modes), "default": defaults.mode, "help": mode_help}),
        (("--bits",), {"type": int, "default": defaults.bits, "help": f"{wo}: 4 or 8."}),
        (
            ("--block-size",),
            {
                "type": int,
                "default": defaults.block_size,
                "help": f"{wo}: weights per scale along K, a power of two >= 16 (32, 64, 128).",
            },
        ),
        (
            ("--tied-block-size",),
            {
                "type": int,
                "help": f"{wo}: block size of a weight shared with a token embedding (a tied "
                "LM head and its lookups): finer blocks for the largest weight.",
                "show_default": "--block-size",
            },
        ),
        (
            ("--accuracy-level",),
            {
                "type": int,
                "help": f"{wo}: MatMulNBits' accuracy_level (0-4; 4 computes in int8).",
                "show_default": "ONNX Runtime's default",
            },
        ),
        (
            ("--symmetric/--asymmetric",),
            {
                "default": defaults.symmetric,
                "help": f"{wo}: signed weights without zero points, or a zero point per block.",
            },
        ),
        (
            ("--shape", "shapes"),
            {
                "multiple": True,
                "metavar": "NAME=D0,D1,...",
                "help": f"{wo}, dynamic and auto: the input shape latency is timed on (repeat "
                "per input; default: the first calibration sample).",
            },
        ),
    ]

    def decorate(fn: Callable) -> Callable:
        for decls, kwargs in reversed(table):
            fn = click.option(*decls, **kwargs)(fn)
        return fn

    return decorate


def image_preprocessing(fn: Callable) -> Callable:
    """The options that turn a folder of images into model inputs (see `ImagePreprocess`)."""
    images = "Image data"
    decorators = [
        click.option(
            "--image-size",
            type=Numbers(int, 2, "H,W"),
            help=f"{images}: center-crop size (one number: square).",
            show_default="the model input's static H and W, else no crop",
        ),
        click.option(
            "--resize-shorter",
            type=_POSITIVE,
            metavar="N",
            help=f"{images}: resize the short side to N before the crop.",
            show_default="the least resize that covers --image-size, keeping the aspect",
        ),
        click.option(
            "--scale",
            type=Fraction(),
            default=1 / 255,
            help=f"{images}: multiply the pixel values (0-255) by this first (1: keep them).",
            show_default="1/255",
        ),
        click.option(
            "--mean",
            type=Numbers(float, 3, "R,G,B"),
            help=f"{images}: per-channel mean subtracted after --scale (RGB order), e.g. "
            "0.485,0.456,0.406.",
        ),
        click.option(
            "--std",
            type=Numbers(float, 3, "R,G,B"),
            help=f"{images}: per-channel std divided by after --mean (RGB order), e.g. "
            "0.229,0.224,0.225.",
        ),
        click.option(
            "--layout",
            type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
            help=f"{images}: the input's layout.",
            show_default="the model input's axis of size 3",
        ),
        click.option(
            "--channel-order",
            type=click.Choice(["RGB", "BGR"], case_sensitive=False),
            default="RGB",
            help=f"{images}: channel order the model takes.",
        ),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


def _number_in(**domain: Any) -> Callable:
    """An option callback refusing NaN, infinities and values outside ``domain``.

    Click's ``float`` and ``FloatRange`` accept ``nan`` (it fails no comparison), which
    would silently switch the check off; defaults from a config table are checked too.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                check_number("the value", value, **domain)
            except InputError as e:
                raise click.BadParameter(str(e)[len("the value ") :]) from None
        return value

    return callback


def executor(fn: Callable) -> Callable:
    """``--executor``, ``--workers`` and ``--ray-address``: where independent tasks run.

    The command gets them as ``executor``, ``workers`` and ``ray_address``, for
    `onnxq.executor.make_executor`.
    """
    decorators = [
        click.option(
            "--executor",
            type=click.Choice(EXECUTORS),
            default="local",
            help="Where parallel work (calibration shards, search candidates) runs: local "
            "(this process, or a process pool with --workers) or ray (the onnxq[ray] extra).",
        ),
        click.option(
            "--workers",
            type=_POSITIVE,
            metavar="N",
            help="Tasks run at once.",
            show_default="1 locally; every CPU of a local Ray instance",
        ),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            help="--executor ray: the cluster to attach to.",
            show_default="RAY_ADDRESS, else a local Ray instance is started",
        ),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


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
        "--time-budget",
        type=float,
        default=default,
        metavar="SECONDS",
        callback=_number_in(low=0),
        help=help,
    )


def threads() -> Callable:
    """``--threads N``: intra-op threads of the timed sessions."""
    return click.option("--threads", type=_POSITIVE, help="Intra-op threads (default: ORT's).")


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
    # Checked where it is used (the gate's Thresholds, the prune search's request).
    return click.option("--max-accuracy-drop", type=float, metavar="POINTS", help=help)


def min_sqnr(*, default: float | None, help: str) -> Callable:
    """``--min-sqnr DB``: the lowest acceptable output SQNR."""
    return click.option(
        "--min-sqnr", type=float, default=default, metavar="DB", callback=_number_in(), help=help
    )


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


def report_options(*formats: str, helps: Mapping[str, str] | None = None) -> Callable:
    """Adds ``--<format> PATH`` options; the command gets them as one ``reports`` dict.

    ``helps`` replaces a format's help text (default: `REPORT_HELP`).
    """
    helps = {**REPORT_HELP, **(helps or {})}

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["reports"] = {f: kwargs.pop(f"{f}_path") for f in formats}
            return fn(*args, **kwargs)

        for fmt in reversed(formats):
            wrapper = click.option(
                f"--{fmt}", f"{fmt}_path", metavar="PATH", type=_PATH, help=helps[fmt]
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


def module_file(spec: str | None) -> str | None:
    """The source file of the module a ``pkg.module[:name]`` spec names, if it has one.

    Code the user gives by module name (``--metric``, ``--plugin``, ``--pass``, data from
    ``pkg.module:fn``) is an input too: ``-o metric.py`` must not overwrite it. A spec that
    is a path, or names no findable module, has no file here (its own loader reports it).
    """
    if not spec or os.path.exists(spec):
        return None
    module = spec.split(":", 1)[0]
    if not all(part.isidentifier() for part in module.split(".")):
        return None
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that fails to import, "a..b"
        return None
    origin = found.origin if found is not None else None
    return origin if origin and os.path.isfile(origin) else None


def report_flags(reports: Mapping[str, str | None]) -> dict[str, str | None]:
    """The ``reports`` of `report_options` keyed by their flags, for `check_files`."""
    return {f"--{fmt}": path for fmt, path in reports.items()}
