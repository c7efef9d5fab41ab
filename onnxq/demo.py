"""The offline end-to-end demo: train, export, compile to int8, benchmark and gate a model."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxq import report
from onnxq.bench import benchmark
from onnxq.bootstrap import bootstrap_speedup, ci95
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import InputError
from onnxq.gate import Thresholds, run_gate
from onnxq.inputs import input_specs
from onnxq.io import load_model
from onnxq.placement import Decision, decide

if TYPE_CHECKING:
    from onnxq.models.digits import DigitsData

__all__ = [
    "CALIBRATION_SAMPLES",
    "DEFAULT_THRESHOLDS",
    "DemoPaths",
    "DemoResult",
    "ModelSummary",
    "run_demo",
]

logger = logging.getLogger(__name__)

# The digits net takes 1x8x8 images; the batch axis is exported dynamic.
INPUT_SHAPE = (1, 1, 8, 8)
CALIBRATION_SAMPLES = 256
LABELS_KEY = "label"
# The gate times batch 1 (the deployment's latency); the demo adds a batch-32 throughput run.
GATE_BATCH = 1
THROUGHPUT_BATCH = 32
# A correct int8 digits net keeps its accuracy (0 to 1 of the 360 test images flips), has an
# output SQNR near 40 dB, and runs faster than fp32 at batch 1 on AVX2 CPUs.
DEFAULT_THRESHOLDS = Thresholds(max_accuracy_drop=0.5, min_sqnr=25.0, min_speedup=1.0)


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Every file the demo writes, all inside one output folder.

    Attributes:
        out: The output folder.
    """

    out: Path

    @property
    def fp32(self) -> Path:
        """The exported fp32 model."""
        return self.out / "digits_fp32.onnx"

    @property
    def fp32_optimised(self) -> Path:
        """The optimised fp32 model (``compile --no-quantize``): int8's real baseline."""
        return self.out / "digits_fp32_optimised.onnx"

    @property
    def int8(self) -> Path:
        """The compiled int8 model."""
        return self.out / "digits_int8.onnx"

    @property
    def calibration(self) -> Path:
        """Calibration images keyed by the model input name."""
        return self.out / "calib.npz"

    @property
    def test(self) -> Path:
        """Held-out images (by input name) and their labels (``label``)."""
        return self.out / "test.npz"

    @property
    def compile_report(self) -> Path:
        """The compile report (JSON)."""
        return self.out / "compile.json"

    @property
    def bench(self) -> Path:
        """The batch-32 benchmark (JSON)."""
        return self.out / "bench.json"

    def gate_report(self, suffix: str) -> Path:
        """The gate report in one format: ``json``, ``md``, ``xml`` (JUnit) or ``html``."""
        return self.out / f"gate.{suffix}"


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """One row of the demo's comparison table.

    Attributes:
        name: ``fp32`` or ``int8``.
        top1: Top-1 accuracy on the test set, a fraction.
        p50_ms_batch1: Median latency at batch 1, in milliseconds.
        throughput_batch32: Samples per second at batch 32 (from the median latency).
        size_bytes: Model file size.
    """

    name: str
    top1: float
    p50_ms_batch1: float
    throughput_batch32: float
    size_bytes: int


@dataclasses.dataclass
class DemoResult:
    """What one demo run measured and wrote.

    Attributes:
        paths: The files written.
        thresholds: The gate thresholds used.
        compile: The compile report (``compile_model``'s dict).
        gate: The gate report (``run_gate``'s dict).
        bench: The batch-32 benchmark report (``BenchResult.to_dict()``).
        reports: Report files written, by format.
        seconds: Wall time of the whole run.
    """

    paths: DemoPaths
    thresholds: Thresholds
    compile: dict[str, Any]
    gate: dict[str, Any]
    bench: dict[str, Any]
    reports: dict[str, Path]
    seconds: float

    @property
    def status(self) -> str:
        """The gate verdict, ``pass`` or ``fail``."""
        return self.gate["status"]

    def models(self) -> list[ModelSummary]:
        """The fp32 and int8 rows of the comparison table."""
        accuracy = self.gate["eval"]["accuracy"]
        rows = []
        for name, path, role, size in (
            ("fp32", self.paths.fp32, "reference", self.compile["size_before"]),
            ("int8", self.paths.int8, "candidate", self.compile["size_after"]),
        ):
            rows.append(
                ModelSummary(
                    name=name,
                    top1=accuracy[role]["top1"],
                    p50_ms_batch1=_result(self.gate["bench"], path, GATE_BATCH)["p50_ms"],
                    throughput_batch32=_result(self.bench, path, THROUGHPUT_BATCH)[
                        "throughput_per_s"
                    ],
                    size_bytes=size,
                )
            )
        return rows

    def speedups(self) -> dict[int, tuple[float, list[float]]]:
        """int8 over fp32 median-latency speedup and its 95% CI, by batch size."""
        return {
            batch: (entry["speedup_vs_first"], entry["speedup_ci95"])
            for batch, entry in (
                (GATE_BATCH, _result(self.gate["bench"], self.paths.int8, GATE_BATCH)),
                (THROUGHPUT_BATCH, _result(self.bench, self.paths.int8, THROUGHPUT_BATCH)),
            )
        }

    def speedups_vs_optimised(self) -> dict[int, tuple[float, list[float]]]:
        """int8 over onnxq's optimised fp32 (BN folded, cleaned up), by batch size.

        The exported file's speedup can be mostly BatchNormalization folding; this one is
        what int8 itself buys. Both come from the demo's benchmark (all three timed
        interleaved, paired rounds).
        """
        return {
            batch: (float(np.median(fp32) / np.median(int8)), list(ci95(replicates)))
            for batch in (GATE_BATCH, THROUGHPUT_BATCH)
            for fp32, int8 in [self._samples(batch)]
            for replicates in [bootstrap_speedup(fp32, int8)]
        }

    def latency_decision(self) -> Decision:
        """What ``onnxq compile``'s latency step decides from the demo's batch-1 timings."""
        fp32, int8 = self._samples(GATE_BATCH)
        return decide(fp32, {"int8": int8})

    def _samples(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-round latencies of the optimised fp32 and the int8 model at ``batch``."""
        return tuple(
            np.asarray(_result(self.bench, path, batch)["samples_ms"])
            for path in (self.paths.fp32_optimised, self.paths.int8)
        )


def _result(bench: dict[str, Any], model: Path, batch: int) -> dict[str, Any]:
    """The entry of a bench report for one model file and batch size."""
    return next(r for r in bench["results"] if Path(r["model"]) == model and r["batch"] == batch)


def _prepare_folder(out: str | os.PathLike) -> DemoPaths:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path}: exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return DemoPaths(path)


def _train_and_export(paths: DemoPaths, epochs: int) -> DigitsData:
    """Trains the digits net and exports it with the dynamo exporter; returns its data split."""
    try:
        # Torch and scikit-learn are optional and slow to import: only the demo needs them.
        from onnxq.export import export_torch
        from onnxq.models.digits import train_digits
    except ImportError as e:
        raise InputError(
            f"onnxq demo needs torch and scikit-learn ({e}): pip install 'onnxq[torch]'"
        ) from e
    model, data = train_digits(epochs=epochs)
    export_torch(model, INPUT_SHAPE, paths.fp32, exporter="dynamo")
    return data


def _write_data(paths: DemoPaths, data: DigitsData) -> None:
    """Writes calibration (training images) and test (held-out images and labels) files."""
    name = input_specs(load_model(paths.fp32))[0].name
    # Calibrating on training images keeps the test set unseen by every compile decision.
    np.savez(paths.calibration, **{name: data.x_train[:CALIBRATION_SAMPLES]})
    np.savez(paths.test, **{name: data.x_test, LABELS_KEY: data.y_test})


def _compile(paths: DemoPaths) -> dict[str, Any]:
    # The optimised fp32 model is what int8 must beat. The int8 compile skips its latency
    # step (which could write fp32 instead): the demo shows int8 and times all three.
    compile_model(paths.fp32, paths.fp32_optimised, CompileConfig(quantize=False))
    config = CompileConfig(calibration=str(paths.calibration), check_latency=False)
    result = compile_model(paths.fp32, paths.int8, config).to_dict()
    report.write_json(result, paths.compile_report)
    return result


def _gate(paths: DemoPaths, thresholds: Thresholds, time_budget: float) -> dict[str, Any]:
    """Evaluates accuracy and SQNR on the test set and times batch 1, then judges."""
    return run_gate(
        paths.fp32,
        paths.int8,
        paths.test,
        thresholds,
        labels_key=LABELS_KEY,
        batch_size=GATE_BATCH,
        time_budget=time_budget,
    )


def _throughput(paths: DemoPaths, time_budget: float) -> dict[str, Any]:
    result = benchmark(
        [paths.fp32, paths.fp32_optimised, paths.int8],
        batch_sizes=(GATE_BATCH, THROUGHPUT_BATCH),
        data=paths.test,
        max_time=time_budget,
    ).to_dict()
    report.write_json(result, paths.bench)
    return result


def _combined_report(
    gate: dict[str, Any], compile_: dict[str, Any], bench: dict[str, Any]
) -> dict[str, Any]:
    """The gate report plus the compile passes and the batch-32 timings, for the HTML page."""
    results = gate["bench"]["results"] + bench["results"]
    return {
        **gate,
        "kind": "demo",
        "bench": {**gate["bench"], "results": results},
        "passes": compile_["passes"],
        "coverage": compile_["coverage"],
    }


def _write_reports(
    paths: DemoPaths, gate: dict[str, Any], compile_: dict[str, Any], bench: dict[str, Any]
) -> dict[str, Path]:
    written = {
        "json": paths.gate_report("json"),
        "markdown": paths.gate_report("md"),
        "junit": paths.gate_report("xml"),
    }
    report.write_json(gate, written["json"])
    report.write_markdown(gate, written["markdown"])
    report.write_junit(gate, written["junit"])
    # Without matplotlib the page would hold only the tables the Markdown report has.
    if importlib.util.find_spec("matplotlib") is not None:
        written["html"] = paths.gate_report("html")
        report.write_html(_combined_report(gate, compile_, bench), written["html"])
    else:
        logger.warning("matplotlib is not installed: no HTML report (pip install 'onnxq[plot]')")
    return written


def run_demo(
    out: str | os.PathLike = "demo-out",
    *,
    epochs: int = 10,
    time_budget: float = 3.0,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    on_step: Callable[[str], None] | None = None,
) -> DemoResult:
    """Runs the whole onnxq flow on the built-in digits net, offline, writing into ``out``.

    Trains the net (deterministic, CPU), exports it to ONNX, writes calibration and test
    data, compiles it to int8, times fp32 and int8 interleaved at batch 1 (in the gate) and
    batch 32, evaluates both on the test set and judges the int8 model against
    ``thresholds``. Nothing is cached or written outside ``out``.

    Args:
        out: Output folder (created if missing; earlier demo files are overwritten).
        epochs: Training epochs.
        time_budget: Seconds of interleaved timing per batch size.
        thresholds: Gate thresholds.
        on_step: Called with a one-line description as each step starts.

    Returns:
        The reports and file paths; ``status`` is the gate's verdict.

    Raises:
        InputError: ``out`` is not a folder, bad arguments, or torch is not installed.
        VerificationError: The int8 model is too far from fp32 to be written at all.
    """
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    if time_budget < 0:
        raise InputError(f"time budget must be >= 0, got {time_budget}")
    step = on_step or (lambda message: logger.info("%s", message))
    start = time.perf_counter()
    paths = _prepare_folder(out)
    step(f"training the digits net ({epochs} epochs) and exporting it to {paths.fp32}")
    data = _train_and_export(paths, epochs)
    _write_data(paths, data)
    step(f"compiling to int8 with calibration on {CALIBRATION_SAMPLES} training images")
    compiled = _compile(paths)
    step(f"evaluating on {len(data.y_test)} test images and timing batch {GATE_BATCH}")
    gate = _gate(paths, thresholds, time_budget)
    step(f"timing fp32, optimised fp32 and int8 at batch {GATE_BATCH} and {THROUGHPUT_BATCH}")
    bench = _throughput(paths, time_budget)
    reports = _write_reports(paths, gate, compiled, bench)
    return DemoResult(
        paths=paths,
        thresholds=thresholds,
        compile=compiled,
        gate=gate,
        bench=bench,
        reports=reports,
        seconds=time.perf_counter() - start,
    )
