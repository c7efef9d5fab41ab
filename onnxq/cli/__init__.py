"""The ``onnxq`` command line: one module per command, shared options in ``_common``."""

from __future__ import annotations

from onnxq.cli._common import main

__all__ = ["main"]

# Each command module registers itself on ``main`` when imported.
from onnxq.cli import bench as _bench  # noqa: F401
from onnxq.cli import compile as _compile  # noqa: F401
from onnxq.cli import demo as _demo  # noqa: F401
from onnxq.cli import eval as _eval  # noqa: F401
from onnxq.cli import export as _export  # noqa: F401
from onnxq.cli import gate as _gate  # noqa: F401
