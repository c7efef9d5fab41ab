"""``python -m onnxq``."""

from __future__ import annotations

from onnxq.cli import main

if __name__ == "__main__":
    main()
