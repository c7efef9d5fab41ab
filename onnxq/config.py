"""Compile configuration: a frozen dataclass built from CLI flags and ``[tool.onnxq]``."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx.defs

from onnxq.calibration.data import COVER, FROM_MODEL, ImagePreprocess
from onnxq.calibration.memory import parse_size
from onnxq.errors import InputError

__all__ = [
    "CALIBRATION_METHODS",
    "MODES",
    "TARGETS",
    "CompileConfig",
    "check_number",
    "read_pyproject_section",
]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
TARGETS = ("auto", "avx2", "avx512", "vnni", "arm", "cuda")
# static: calibrated int8 QDQ; dynamic: int8 weights, activations quantized at run time
# (no calibration data); weight-only: MatMul weights in 4/8-bit blocks, activations float;
MODES = ("static", "dynamic", "weight-only", "auto")


def check_number(
    what: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
) -> None:
    """Refuses a threshold that is not a finite number in ``[low, high]`` (``(low`` if open).

    NaN compares false with everything, so a ``value < low`` test alone would let
    ``nan`` through and switch the check it sets off; infinities make a check vacuous.

    Raises:
        TypeError: The value is not a number (`CompileConfig.from_sources` reports it).
        InputError: Naming ``what``, its domain and the value given.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if low is not None and high is not None:
        domain = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    elif low is not None:
        domain = f"{'>' if open_low else '>='} {low:g}"
    else:
        domain = f"<= {high:g}" if high is not None else ""
    if not math.isfinite(value):
        raise InputError(
            f"{what} must be a finite number{' ' * bool(domain)}{domain}, got {value!r}"
        )
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        raise InputError(f"{what} must be {domain}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Everything that decides what ``compile`` does.

    Attributes:
        quantize: Emit an int8 model; False optimises in fp32 only.
        mode: ``static`` (int8 QDQ from calibrated ranges), ``dynamic`` (int8 weights,
            activations quantized at run time: no calibration data needed) or
            ``weight-only`` (MatMul weights block-wise in ``bits``, activations float: see
            `onnxq.passes.weight_only`) or ``auto`` (per unit, whichever of those or fp32
            is faithful and fastest here: see `onnxq.auto`).
        bits: Weight-only: bits per weight, 4 or 8.
        block_size: Weight-only: weights per scale along K, a power of two >= 16.
        tied_block_size: Weight-only: block size of a weight shared with a token embedding
            (a tied LM head and its lookups; None: ``block_size``).
        accuracy_level: Weight-only: MatMulNBits' ``accuracy_level`` (0-4; None: ONNX
            Runtime's default).
        symmetric: Weight-only: no zero points (False: one zero point per block).
        verify: Check every pass: ONNX checker plus outputs against the previous stage.
        tolerance: Largest max-abs difference an exact pass may introduce, relative to the
            range of each output (``max(|ref|)``, at least 1).
        calibration: Calibration data (``.npz``, folder, or ``pkg.module:fn``).
        calibration_method: One of ``minmax``, ``percentile``, ``entropy``, ``mse``.
        percentile: Percentile kept by the ``percentile`` method.
        max_samples: Use at most this many calibration samples.
        batch_size: Calibration batch size (at most: the memory plan may lower it).
        max_memory: Memory calibration may use, e.g. ``4GB`` or a byte count (None: half
            the available memory, at most 16 GB); see `onnxq.calibration.memory`.
        ranges: Load activation ranges from this JSON instead of calibrating.
        save_ranges: Save the calibrated ranges to this JSON.
        target: Deployment CPU/GPU; ``auto`` detects this machine's instruction set.
        exclude: Node names or regular expressions that stay fp32.
        op_types: Quantize only these op types (empty: every supported op).
        prune: Pruning request, e.g. ``channels:0.3`` (None: no pruning).
        prune_exclude: Node names, regular expressions or op types never pruned.
        min_sqnr: Lowest SQNR (dB) of int8 vs fp32 outputs (and of each packed part).
        min_agreement: Lowest top-1 agreement of class-score outputs with fp32, in [0, 1].
        metric: A user fidelity metric ``pkg.module:fn`` the int8 model must satisfy.
        tune_budget: Seconds the mixed-precision search may spend keeping layers fp32
            when all-int8 misses the criteria (0: no search); a safety net over
            ``tune_trials``, which bounds it deterministically.
        tune_trials: End-to-end checks the mixed-precision search may make.
        require_int8: Fail (exit 1) instead of writing fp32 when no int8 placement meets
            the criteria.
        verify_samples: Calibration samples the deployed int8 model is checked on (0: no
            check, reported as unchecked).
        check_latency: Place int8 for latency: keep fp32 the units ONNX Runtime does not
            fuse, time int8 against onnxq's optimised fp32 at batch 1, and write the
            optimised fp32 model when int8 is not faster (False: QDQ as inserted, untimed).
        provider: Execution provider used for calibration and verification.
        image_size: Size ``(height, width)`` images are center-cropped to (None: the
            model input's static H and W). Image folders only, as the settings below.
        resize_shorter: Resize each image's short side to this before cropping (None:
            resize by the least factor that covers the crop, keeping the aspect).
        mean: Per-channel mean subtracted after scaling (RGB order), or None.
        std: Per-channel standard deviation divided by after the mean (RGB order), or None.
        scale: Factor pixel values (0-255) are multiplied by first, e.g. 1/255.
        layout: ``NCHW`` or ``NHWC`` (None: where the model input's 3 channels are).
        channel_order: ``RGB`` or ``BGR``, the channel order the model takes.
    """

    quantize: bool = True
    mode: str = "static"
    bits: int = 4
    block_size: int = 32
    tied_block_size: int | None = None
    accuracy_level: int | None = None
    symmetric: bool = False
    verify: bool = False
    tolerance: float = 1e-4
    calibration: str | None = None
    calibration_method: str = "minmax"
    percentile: float = 99.999
    max_samples: int | None = None
    batch_size: int = 16
    max_memory: str | int | None = None
    ranges: str | None = None
    save_ranges: str | None = None
    target: str = "auto"
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    prune: str | None = None
    prune_exclude: tuple[str, ...] = ()
    min_sqnr: float = 20.0
    min_agreement: float = 0.99
    metric: str | None = None
    tune_budget: float = 600.0
    tune_trials: int = 32
    require_int8: bool = False
    verify_samples: int = 32
    check_latency: bool = True
    provider: str = "cpu"
    image_size: tuple[int, int] | None = None
    resize_shorter: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    scale: float = 1 / 255
    layout: str | None = None
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise InputError(
                f"unknown calibration method '{self.calibration_method}'; "
                f"choose from {', '.join(CALIBRATION_METHODS)}"
            )
        if self.bits not in (4, 8):
            raise InputError(f"weight-only bits must be 4 or 8, got {self.bits!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(
                f"weight-only block size must be a power of two >= 16, got {self.block_size!r}"
            )
        tied = self.tied_block_size
        if tied is not None and (tied < 16 or tied & (tied - 1)):
            raise InputError(
                f"weight-only tied block size must be a power of two >= 16, got {tied!r}"
            )
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise InputError(f"accuracy level must be 0-4, got {self.accuracy_level!r}")
        if self.target not in TARGETS:
            raise InputError(f"unknown target '{self.target}'; choose from {', '.join(TARGETS)}")
        self._check_mode()
        check_number("percentile", self.percentile, low=0, high=100, open_low=True)
        check_number("tolerance", self.tolerance, low=0)
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        check_number("min SQNR (dB)", self.min_sqnr)
        check_number("min agreement", self.min_agreement, low=0, high=1, open_low=True)
        check_number("tune budget (seconds)", self.tune_budget, low=0)
        check_number("tune trials", self.tune_trials, low=0)
        if self.verify_samples < 0:
            raise InputError(f"check samples must be >= 0, got {self.verify_samples}")
        if self.max_samples is not None and self.max_samples < 1:
            raise InputError(f"max samples must be >= 1, got {self.max_samples}")
        if self.max_memory is not None:
            parse_size(self.max_memory)
        unknown = [t for t in self.op_types if not onnx.defs.has(t)]
        if unknown:
            raise InputError(
                f"--op-types: '{unknown[0]}' is no ONNX operator, so it can match no node "
                "(op types are spelled as in ONNX, e.g. Conv, MatMul, Gemm)"
            )
        self.image_preprocess  # noqa: B018 - validates the image settings now, not mid-compile

    def _check_mode(self) -> None:
        """Refuses unknown modes and settings that contradict the mode."""
        if self.mode not in MODES:
            raise InputError(f"unknown mode '{self.mode}'; choose from {', '.join(MODES)}")
        if self.mode == "weight-only" and not self.quantize:
            raise InputError("--mode weight-only quantizes: it contradicts --no-quantize")
        if self.mode not in ("dynamic", "auto"):
            return
        if not self.quantize:
            raise InputError(f"--mode {self.mode} quantizes: it contradicts --no-quantize")
        if self.mode == "auto" and not self.check_latency:
            raise InputError(
                "--mode auto chooses from latency measured on this machine: it contradicts "
                "--no-latency-check (pick --mode static, dynamic or weight-only instead)"
            )
        if self.ranges or self.save_ranges:
            what = (
                "computes activation ranges at run time"
                if self.mode == "dynamic"
                else ("calibrates from --calibration-data")
            )
            raise InputError(
                f"--mode {self.mode} {what}: --ranges and --save-ranges apply to --mode static only"
            )
        if self.target == "cuda" or self.provider != "cpu":
            raise InputError(
                f"--mode {self.mode} emits ONNX Runtime's CPU int8 kernels "
                "(DynamicQuantizeMatMul, MatMulNBits): use --target cuda and GPU providers "
                "with --mode static"
            )

    @property
    def image_preprocess(self) -> ImagePreprocess:
        """How an image folder given as calibration data becomes model inputs."""
        return ImagePreprocess(
            resize=self.resize_shorter or COVER,
            crop=self.image_size or FROM_MODEL,
            mean=self.mean,
            std=self.std,
            layout=self.layout,
            channel_order=self.channel_order,
            scale=self.scale,
        )

    @property
    def runs_on_cpu(self) -> bool:
        """Whether the model is deployed on ONNX Runtime's CPU provider (not a CUDA target).

        There ``Add -> LayerNormalization`` is kept from becoming SkipLayerNormalization where
        its CPU kernel measures slower (`onnxq.passes.layernorm`); on CUDA it is the fast one.
        """
        return self.provider == "cpu" and self.target != "cuda"

    @property
    def max_memory_bytes(self) -> int | None:
        """``max_memory`` in bytes, or None for the default budget."""
        return None if self.max_memory is None else parse_size(self.max_memory)

    @classmethod
    def from_sources(
        cls, overrides: Mapping[str, Any], pyproject: str | os.PathLike | None = "pyproject.toml"
    ) -> CompileConfig:
        """Builds a config from ``[tool.onnxq]`` in ``pyproject``, then ``overrides``.

        Overrides whose value is ``None`` (a flag not given) leave the file's value.

        Raises:
            InputError: The file has an unknown key or a value of the wrong kind.
        """
        values: dict[str, Any] = {}
        section = read_pyproject_section(pyproject, ("tool", "onnxq"))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in section.items():
            if not isinstance(value, dict):  # sub-tables such as [tool.onnxq.gate]
                name = key.replace("-", "_")
                if name not in fields:
                    raise InputError(f"[tool.onnxq] in {pyproject}: unknown key '{key}'")
                values[name] = tuple(value) if isinstance(value, list) else value
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as e:
            raise InputError(f"bad compile configuration: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Returns the configuration as JSON-ready values."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def read_pyproject_section(path: str | os.PathLike | None, keys: tuple[str, ...]) -> dict[str, Any]:
    """Returns the nested table ``keys`` of a TOML file, or ``{}`` when absent.

    Raises:
        InputError: The file exists but is not valid TOML.
    """
    if path is None or not Path(path).is_file():
        return {}
    try:
        with open(path, "rb") as f:
            table: Any = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML (invalid TOML syntax: {e})") from None
    for key in keys:
        table = table.get(key, {}) if isinstance(table, dict) else {}
    return table if isinstance(table, dict) else {}
