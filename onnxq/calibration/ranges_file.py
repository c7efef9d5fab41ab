"""The ranges file: calibrated tensor ranges as versioned JSON, written by --save-ranges."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxq.errors import InputError
from onnxq.io import atomic_write

__all__ = ["RANGES_FORMAT", "load_ranges", "save_ranges"]

logger = logging.getLogger(__name__)

RANGES_FORMAT = "onnxq.ranges"
_RANGES_VERSION = 1


def save_ranges(
    path: str | os.PathLike, ranges: Mapping[str, tuple[float, float]], meta: Mapping[str, Any]
) -> Path:
    """Writes tensor ranges to a JSON file atomically.

    Args:
        path: Destination file.
        ranges: ``(lo, hi)`` by tensor name.
        meta: JSON-serializable facts about how they were made (method, samples, model).

    Returns:
        The path written.
    """
    path = Path(path)
    document = {
        "format": RANGES_FORMAT,
        "version": _RANGES_VERSION,
        "meta": dict(meta),
        "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in ranges.items()},
    }
    with atomic_write(path, "w") as f:
        json.dump(document, f, indent=1, allow_nan=False)
        f.write("\n")
    logger.info("Saved %d ranges to %s", len(ranges), path)
    return path


def load_ranges(path: str | os.PathLike) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Reads a ranges file written by `save_ranges`.

    Returns:
        ``(ranges, meta)``: ``(lo, hi)`` floats by tensor name, and the metadata.

    Raises:
        InputError: The file is missing, not JSON, or not a valid ranges file.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise InputError(f"{path}: no such ranges file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a valid ranges JSON file: {e}") from e
    if not isinstance(document, dict) or document.get("format") != RANGES_FORMAT:
        raise InputError(f'{path}: not an onnxq ranges file (no "format": "{RANGES_FORMAT}")')
    if document.get("version") != _RANGES_VERSION:
        raise InputError(
            f"{path}: ranges file version {document.get('version')!r} is not supported "
            f"(expected {_RANGES_VERSION})"
        )
    meta, raw = document.get("meta", {}), document.get("ranges")
    if not isinstance(meta, dict) or not isinstance(raw, dict):
        raise InputError(f'{path}: "meta" and "ranges" must be JSON objects')
    return {name: _parse_range(path, name, item) for name, item in raw.items()}, meta


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _parse_range(path: Path, name: str, item: Any) -> tuple[float, float]:
    if (
        not isinstance(item, list)
        or len(item) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
    ):
        raise InputError(f"{path}: range of '{name}' must be [lo, hi] numbers, got {item!r}")
    lo, hi = float(item[0]), float(item[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"{path}: range of '{name}' must be finite with lo <= hi, got {item!r}")
    return lo, hi
