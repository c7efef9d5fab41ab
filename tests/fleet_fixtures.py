"""A fleet of three tiny classifiers and its manifest, for the fleet compile tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
from classifier_fixtures import classifier, dataset, weights

# Fast settings: the latency timing and the mixed-precision search are not what is tested.
DEFAULTS = """
    [defaults]
    latency-check = false
    tune-budget = 0
    check-samples = 8
"""


def write_fleet(folder: Path, gate: str = "min-sqnr = 10") -> Path:
    """Writes models a, b and c, their data, ``out/`` and ``fleet.toml`` under ``folder``.

    a and b compile and pass ``gate`` (on their calibration data); c's calibration data is
    keyed by a name the model has no input of, so c fails to compile.

    Returns:
        The manifest.
    """
    (folder / "out").mkdir()
    for seed, name in enumerate("abc"):
        onnx.save(classifier(*weights(seed)), folder / f"{name}.onnx")
        x, y = dataset(seed)
        np.savez(folder / f"{name}_calib.npz", **{"x" if name != "c" else "features": x})
        np.savez(folder / f"{name}_eval.npz", x=x, y=y)
    entries = "".join(
        textwrap.dedent(
            f"""
            [[models]]
            model = "{name}.onnx"
            output = "out/{name}.int8.onnx"
            calibration-data = "{name}_calib.npz"
            [models.gate]
            {gate}
            """
        )
        for name in "abc"
    )
    manifest = folder / "fleet.toml"
    manifest.write_text(textwrap.dedent(DEFAULTS) + entries)
    return manifest


def visible_files(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones included, relative to it (sorted)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
