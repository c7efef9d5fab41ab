"""Option defaults from a ``pyproject.toml`` table, keyed like the command's flags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from onnxq.config import read_pyproject_section
from onnxq.errors import InputError

__all__ = ["checked_value", "config_keys", "load_defaults"]


def config_keys(command: click.Command) -> dict[str, click.Option]:
    """Config key -> option: each long flag without its dashes.

    ``--x/--no-x`` is the one key ``x``; short flags have no key.
    """
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.expose_value:
            for flag in param.opts:
                if flag.startswith("--"):
                    keys[flag[2:]] = param
    return keys


def load_defaults(
    ctx: click.Context, path: str, table: tuple[str, ...], renamed: Mapping[str, str]
) -> dict[str, Any]:
    """Reads ``table`` of the TOML file ``path`` as defaults of ``ctx.command``'s options.

    Keys are the flag names (``min-sqnr`` or ``min_sqnr`` for ``--min-sqnr``); sub-tables
    belong to other commands and are skipped. A missing file gives no defaults.

    Args:
        ctx: The command's context.
        path: The TOML file.
        table: Keys of the table, e.g. ``("tool", "onnxq")``.
        renamed: Old key -> current key; an old key still works, with a warning.

    Returns:
        Parameter name -> value, for ``ctx.default_map``.

    Raises:
        InputError: The file is not TOML, a key is unknown, or a value has the wrong type.
    """
    where = "[" + ".".join(table) + "]"
    known = config_keys(ctx.command)
    defaults: dict[str, Any] = {}
    for key, value in read_pyproject_section(path, table).items():
        if isinstance(value, dict):
            continue
        name = key.replace("_", "-")
        if name in renamed:
            click.echo(
                f"warning: {path}: {where} key '{key}' is deprecated; write '{renamed[name]}'",
                err=True,
            )
            name = renamed[name]
        if name not in known:
            raise InputError(
                f"{path}: unknown key '{key}' in {where}; known: {', '.join(sorted(known))}"
            )
        option = known[name]
        defaults[option.name] = _checked(ctx, option, value, f"{path}: {where} {key}")  # type: ignore[index]
    return defaults


def _checked(ctx: click.Context, option: click.Option, value: Any, where: str) -> Any:
    """The value, if it has the type the option takes; TOML types are not converted."""
    if option.multiple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise InputError(f"{where} must be a string or a list of strings, got {value!r}")
        for item in items:
            _check_one(ctx, option, item, where)
        return items
    _check_one(ctx, option, value, where)
    return value


def checked_value(ctx: click.Context, option: click.Option, value: Any, where: str) -> Any:
    """A TOML value for ``option``, type-checked and converted as the flag's value would be.

    Raises:
        InputError: Naming ``where``: the value has the wrong TOML type or does not convert.
    """
    value = option.type_cast_value(ctx, _checked(ctx, option, value, where))
    if option.callback is not None:  # e.g. the refusal of NaN thresholds
        try:
            value = option.callback(ctx, option, value)
        except click.BadParameter as e:
            raise InputError(f"{where}: {e.message}") from None
    return value


def _check_one(ctx: click.Context, option: click.Option, value: Any, where: str) -> None:
    kind = option.type
    accepted = getattr(kind, "config_types", None)
    if accepted is not None:  # a type that reads several TOML kinds (see onnxq.cli.options)
        expected = kind.config_expected  # type: ignore[attr-defined]
        ok = isinstance(value, accepted) and not isinstance(value, bool)
    elif option.is_flag:
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(kind, click.types.IntParamType):
        expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(kind, click.types.FloatParamType):
        expected = "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise InputError(f"{where} must be {expected}, got {value!r}")
    try:
        kind.convert(value, option, ctx)
    except click.BadParameter as e:
        raise InputError(f"{where}: {e.message}") from None
