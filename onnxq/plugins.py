"""User passes: the ``register_pass`` registry, plugin modules and ``pkg.module:Class`` specs."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterable

import onnx_ir as ir

from onnxq.errors import InputError

__all__ = [
    "ENTRY_POINT_GROUP",
    "load_pass",
    "load_plugins",
    "register_pass",
    "registered_passes",
    "resolve_pass",
]

logger = logging.getLogger(__name__)

# Installed packages declare plugin modules under this entry-point group, e.g. in
# pyproject.toml: [project.entry-points."onnxq.passes"] mine = "mypkg.passes".
ENTRY_POINT_GROUP = "onnxq.passes"

_USER_PASSES: dict[str, type[ir.passes.PassBase]] = {}


def register_pass(cls: type[ir.passes.PassBase]) -> type[ir.passes.PassBase]:
    """Registers a user pass class so ``onnxq passes`` lists it (usable as a decorator).

    A registered class can be named on the command line: ``onnxq compile --plugin
    pkg.module --pass ClassName``.
    """
    if not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
        raise TypeError(f"{cls!r} is not an onnx_ir.passes.PassBase subclass")
    _USER_PASSES[cls.__name__] = cls
    return cls


def registered_passes() -> dict[str, type[ir.passes.PassBase]]:
    """The user pass classes registered so far, by class name."""
    return dict(_USER_PASSES)


def load_plugins(modules: Iterable[str] = (), *, entry_points: bool = True) -> list[str]:
    """Imports plugin modules so their ``@register_pass`` classes are registered.

    Args:
        modules: Module names given by the user (``--plugin pkg.module``).
        entry_points: Also import the modules installed packages declare in the
            ``onnxq.passes`` entry-point group.

    Returns:
        The names of the modules imported.

    Raises:
        InputError: A module cannot be imported.
    """
    names = list(modules)
    if entry_points:
        names += [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise InputError(f"cannot import plugin '{name}': {e}") from None
        logger.info("Loaded plugin %s", name)
    return names


def resolve_pass(spec: str) -> ir.passes.PassBase:
    """Instantiates a user pass named by a registered class name or ``pkg.module:Class``.

    Raises:
        InputError: The name is neither registered nor an importable spec.
    """
    if ":" not in spec and spec in _USER_PASSES:
        return _USER_PASSES[spec]()
    if ":" not in spec:
        known = ", ".join(sorted(_USER_PASSES)) or "none (load one with --plugin pkg.module)"
        raise InputError(
            f"unknown pass '{spec}': expected package.module:ClassName or a registered "
            f"pass ({known})"
        )
    return load_pass(spec)


def load_pass(spec: str) -> ir.passes.PassBase:
    """Instantiates a user pass from ``package.module:ClassOrFactory``.

    Raises:
        InputError: The spec cannot be imported or does not produce an onnx_ir pass.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad pass spec '{spec}': expected package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import '{module_name}' for pass '{spec}': {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"'{attr}' not found in module '{module_name}' (or not callable)")
    pass_ = factory()
    if not isinstance(pass_, ir.passes.PassBase):
        raise InputError(f"'{spec}' did not produce an onnx_ir.passes.PassBase instance")
    return pass_
