"""The ``onnxq`` command line: one module per command, shared options in ``_common``."""

from __future__ import annotations

from onnxq.cli._common import main

__all__ = ["main"]

# Each command module registers itself on ``main`` when imported.
from onnxq.cli import compile as _compile  # noqa: E402,F401
