"""Fleet compile: many models compiled and gated as independent tasks on an executor."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxq import io
from onnxq.compiler import compile_model
from onnxq.config import CompileConfig
from onnxq.errors import OnnxqError
from onnxq.executor import Executor, Progress
from onnxq.gate import Thresholds, run_gate

__all__ = [
    "ERROR",
    "FAIL",
    "PASS",
    "FleetModel",
    "GateSpec",
    "compile_and_gate",
    "fleet_report",
    "remove_scratch",
    "run_fleet",
]

logger = logging.getLogger(__name__)

# A model's outcome: compiled (and gated, if asked) and written; compiled but its gate
# failed (not written); or not compiled at all (an error). JUnit calls the last two
# <failure> and <error>.
PASS, FAIL, ERROR = "pass", "fail", "error"


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """The release gate one fleet model must pass before it is written (see `run_gate`).

    Attributes:
        thresholds: The thresholds; at least one is set.
        data: The ``.npz`` the compiled model is judged on against its input.
        labels_key: Key of the labels in ``data`` (needed for ``max_accuracy_drop``).
        batch_size: Batch size of the latency measurement.
        provider: Execution provider of the evaluation and timing.
        time_budget: Seconds of interleaved timing for the latency thresholds.
        per_layer: Add per-layer errors to the report.
    """

    thresholds: Thresholds
    data: str
    labels_key: str | None = None
    batch_size: int = 1
    provider: str = "cpu"
    time_budget: float = 5.0
    per_layer: bool = False


@dataclasses.dataclass(frozen=True)
class FleetModel:
    """One model of a fleet: small and picklable, as it travels to a worker.

    Paths are absolute (or as the worker can open them): workers may run elsewhere, in
    another working directory, so a remote Ray cluster needs them on shared storage.

    Attributes:
        name: Unique name in the fleet (the JUnit test case's).
        model: The fp32 ONNX model.
        output: Where the compiled model is written.
        config: Its compile configuration.
        gate: Its gate, or None to write every model that compiles.
    """

    name: str
    model: str
    output: str
    config: CompileConfig
    gate: GateSpec | None = None


def compile_and_gate(job: FleetModel, log_level: int | None = None) -> dict[str, Any]:
    """Compiles one model, gates it and publishes it only when it passes (an executor task).

    The model is compiled into a hidden scratch folder beside its output, so a failed,
    gated-out or interrupted model leaves nothing at the output path, and the gate judges
    exactly the bytes that are then renamed into place.

    Args:
        job: The model.
        log_level: The driver's logging level, for a worker process (whose imports may
            have configured logging otherwise: ONNX Runtime's quantizer sets INFO).

    Returns:
        The model's entry of the fleet report: ``name``, ``model``, ``output``, ``status``
        (`PASS`, `FAIL` or `ERROR`), ``reason`` (one line; None when it passed),
        ``written``, ``seconds``, ``worker`` (host:pid), ``compile`` (the compile report)
        and ``gate`` (the gate report) when they ran.
    """
    if log_level is not None:
        logging.getLogger().setLevel(log_level)
    start = time.perf_counter()
    entry: dict[str, Any] = {
        "name": job.name,
        "model": job.model,
        "output": job.output,
        "status": ERROR,
        "reason": None,
        "written": False,
        "compile": None,
        "gate": None,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    output = Path(job.output)
    try:
        with io.temp_beside(output, folder=True) as scratch:
            # The output's own name, so an external-data file keeps the name it is referred by.
            staged = scratch / output.name
            compiled = compile_model(job.model, staged, job.config).to_dict()
            entry["compile"] = {**compiled, "output": job.output}
            if job.gate is not None:
                gate = _gate(job, staged)
                entry["gate"] = {**gate, "candidate": job.output}
                if gate["status"] != PASS:
                    failed = [c["message"] for c in gate["checks"] if c["status"] != PASS]
                    entry.update(status=FAIL, reason="gate: " + "; ".join(failed))
            if entry["status"] != FAIL:
                _publish(scratch, staged, output)
                entry.update(status=PASS, written=True)
    except OnnxqError as e:
        entry["reason"] = " ".join(str(e).split())
    except Exception as e:
        # A bug or a runtime failure on this model only: the others go on.
        logger.exception("%s: compile failed", job.name)
        entry["reason"] = " ".join(f"{type(e).__name__}: {e}".split())
    entry["seconds"] = time.perf_counter() - start
    logger.info("%s: %s %s", job.name, entry["status"], entry["reason"] or "")
    return entry


def _gate(job: FleetModel, candidate: Path) -> dict[str, Any]:
    spec = job.gate
    assert spec is not None
    return run_gate(
        job.model,
        candidate,
        spec.data,
        spec.thresholds,
        labels_key=spec.labels_key,
        batch_size=spec.batch_size,
        provider=spec.provider,
        time_budget=spec.time_budget,
        per_layer=spec.per_layer,
    )


def _publish(scratch: Path, staged: Path, output: Path) -> None:
    """Renames the compiled model (external data first, the model last) to its output."""
    for extra in sorted(scratch.glob(f"{glob.escape(output.name)}?*")):  # e.g. NAME.data
        os.replace(extra, output.with_name(extra.name))
    os.replace(staged, output)


def run_fleet(
    models: Sequence[FleetModel],
    executor: Executor,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compiles and gates every model as one task each; returns the fleet report.

    One model's failure does not stop the others. On an interrupt the executor cancels
    every task; the scratch folders of workers that died without cleaning up are removed.

    Args:
        models: The fleet (unique names and outputs; see `onnxq.cli._manifest`).
        executor: An `onnxq.executor.Executor` (local or Ray).
        progress: Passed to ``executor.map``: told as tasks finish.

    Returns:
        ``{"kind": "fleet", "status": "pass"|"fail", "summary", "seconds", "counts",
        "models": [entry per model, in manifest order (see `compile_and_gate`)]}``.
    """
    start = time.perf_counter()
    try:
        results = executor.map(
            compile_and_gate,
            list(models),
            shared=(logging.getLogger().getEffectiveLevel(),),
            return_exceptions=True,
            progress=progress,
        )
    except BaseException:
        remove_scratch(models)
        raise
    entries = [
        r if isinstance(r, dict) else _lost(job, r) for job, r in zip(models, results, strict=True)
    ]
    return fleet_report(entries, time.perf_counter() - start)


def remove_scratch(models: Sequence[FleetModel], wait: float = 5.0) -> None:
    """Removes the scratch folders that workers killed midway left beside the outputs.

    A cancelled worker may take a moment to die, and a live process's files are kept
    (`onnxq.io.remove_stale_temps`), so this retries for up to ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        for job in models:
            io.remove_stale_temps(job.output)
        left = [tmp for job in models for tmp in io.temps_beside(job.output)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        logger.warning("could not remove the scratch files of running workers: %s", left)


def _lost(job: FleetModel, error: BaseException) -> dict[str, Any]:
    """The entry of a task that raised instead of returning (e.g. its worker died)."""
    io.remove_stale_temps(job.output)
    return {
        "name": job.name,
        "model": job.model,
        "output": job.output,
        "status": ERROR,
        "reason": " ".join(f"{type(error).__name__}: {error}".split()),
        "written": False,
        "compile": None,
        "gate": None,
        "worker": None,
        "seconds": None,
    }


def fleet_report(entries: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The fleet report of the models' entries: status, counts and a one-line summary."""
    counts = {s: sum(e["status"] == s for e in entries) for s in (PASS, FAIL, ERROR)}
    not_passing = [f"{e['name']} ({e['status']})" for e in entries if e["status"] != PASS]
    summary = f"{counts[PASS]} of {len(entries)} models pass" + (
        f"; not passing: {', '.join(not_passing)}" if not_passing else ""
    )
    return {
        "kind": "fleet",
        "status": FAIL if not_passing else PASS,
        "summary": summary,
        "seconds": seconds,
        "counts": counts,
        "models": entries,
    }
