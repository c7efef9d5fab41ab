"""onnxq: an ONNX deployment compiler for ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"
