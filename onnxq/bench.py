"""Interleaved latency benchmarks with bootstrap confidence intervals, memory and placement."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq import runtime
from onnxq.bootstrap import bootstrap_median, bootstrap_speedup, ci95
from onnxq.calibration.data import open_calibration_data
from onnxq.errors import InputError
from onnxq.inputs import input_specs, random_inputs
from onnxq.io import load_model, model_file_size

__all__ = [
    "MEMORY_METHOD",
    "BenchResult",
    "LatencyStats",
    "ModelInfo",
    "benchmark",
    "int8_op",
    "parse_placement_profile",
    "physical_cores",
    "placement_warnings",
    "round_order",
]

logger = logging.getLogger(__name__)

MEMORY_METHOD = (
    "process peak RSS (VmHWM from /proc/self/status, reset through /proc/self/clear_refs) "
    "during session creation and the first warm-up, minus the RSS just before; best effort"
)

# Warm-up stops when the median of the last WARMUP_WINDOW runs moves less than this.
WARMUP_WINDOW = 5
WARMUP_TOLERANCE = 0.05
MAX_WARMUP_RUNS = 200
# Hard cap on timed rounds so a microsecond model under a long budget stays bounded.
MAX_ROUNDS = 20_000
PROFILE_RUNS = 3

_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclasses.dataclass
class LatencyStats:
    """Latency of one model at one batch size on one provider.

    Attributes:
        provider: Short provider name (``cpu``, ``cuda``).
        model: Path of the model file.
        batch: Batch size (leading dimension of the inputs).
        samples_ms: Per-round latencies in milliseconds, in round order (paired across models).
        warmup_runs: Runs made before timing started.
        seed: Seed of the bootstrap.
    """

    provider: str
    model: str
    batch: int
    samples_ms: np.ndarray
    warmup_runs: int
    seed: int = 0

    def median_ci(self) -> tuple[float, float]:
        """Returns the bootstrap 95% confidence interval of the median latency (ms)."""
        return ci95(bootstrap_median(self.samples_ms, seed=self.seed))

    def to_dict(self) -> dict:
        """Returns the JSON form: percentiles, mean, std, CI and throughput."""
        s = self.samples_ms
        p50, p90, p99 = (float(v) for v in np.percentile(s, [50, 90, 99]))
        return {
            "provider": self.provider,
            "model": self.model,
            "batch": self.batch,
            "runs": int(s.size),
            "warmup_runs": self.warmup_runs,
            "p50_ms": p50,
            "p50_ci95_ms": list(self.median_ci()),
            "p90_ms": p90,
            "p99_ms": p99,
            "mean_ms": float(s.mean()),
            "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
            "throughput_per_s": self.batch * 1000.0 / p50 if p50 > 0 else float("inf"),
            "samples_ms": [round(float(v), 6) for v in s],
        }


@dataclasses.dataclass
class ModelInfo:
    """Per-model facts that do not depend on the batch size.

    Attributes:
        provider: Short provider name.
        path: Model file.
        size_bytes: Size on disk, external data files included.
        peak_rss_delta_bytes: Memory growth while creating the session and warming up, or
            ``None`` where it cannot be measured.
        op_histogram: Op type counts of the graph ONNX Runtime runs after optimization.
        placement: For CUDA: per provider, the op types and counts of the nodes it ran.
        warnings: Placement problems (int8 nodes on CPU, memcpy nodes).
    """

    provider: str
    path: str
    size_bytes: int
    peak_rss_delta_bytes: int | None
    op_histogram: dict[str, int]
    placement: dict[str, dict[str, int]] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """Returns the JSON form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchResult:
    """Everything one ``benchmark`` call measured.

    Attributes:
        models: Model paths in the order given; the first is the baseline of the ratios.
        threads: Intra-op threads asked for, or ``None`` for ONNX Runtime's default.
        infos: One ``ModelInfo`` per provider and model.
        stats: One ``LatencyStats`` per provider, batch size and model.
        seed: Seed of the inputs and bootstraps.
    """

    models: list[str]
    threads: int | None
    infos: list[ModelInfo]
    stats: list[LatencyStats]
    seed: int = 0

    def find(self, model: str, batch: int, provider: str) -> LatencyStats:
        """Returns the stats of one model, batch size and provider."""
        for s in self.stats:
            if (s.model, s.batch, s.provider) == (model, batch, provider):
                return s
        raise KeyError((model, batch, provider))

    def speedup_replicates(self, stats: LatencyStats) -> np.ndarray:
        """Bootstrap replicates of first-model-median / this-median on paired rounds."""
        base = self.find(self.models[0], stats.batch, stats.provider)
        return bootstrap_speedup(base.samples_ms, stats.samples_ms, seed=self.seed)

    def to_dict(self) -> dict:
        """Returns the JSON report (see ``benchmark`` for its shape)."""
        results = []
        for s in self.stats:
            entry = s.to_dict()
            base = self.find(self.models[0], s.batch, s.provider)
            base_p50 = float(np.median(base.samples_ms))
            this_p50 = float(np.median(s.samples_ms))
            lo, hi = ci95(self.speedup_replicates(s))
            entry["speedup_vs_first"] = base_p50 / this_p50 if this_p50 > 0 else float("inf")
            entry["speedup_ci95"] = [lo, hi]
            entry["ratio_vs_first"] = this_p50 / base_p50 if base_p50 > 0 else float("inf")
            entry["ratio_ci95"] = [
                1.0 / hi if hi else float("inf"),
                1.0 / lo if lo else float("inf"),
            ]
            results.append(entry)
        return {
            "kind": "bench",
            "models": list(self.models),
            "threads": self.threads,
            "threads_effective": self.threads or physical_cores(),
            "cpu_count": os.cpu_count(),
            "seed": self.seed,
            "memory_method": MEMORY_METHOD,
            "model_info": [i.to_dict() for i in self.infos],
            "results": results,
        }


def physical_cores() -> int | None:
    """Physical cores this process may use: what ONNX Runtime's default thread count follows.

    Best effort: counts distinct (package, core) pairs of the allowed CPUs in
    ``/proc/cpuinfo``, else the logical CPU count.
    """
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, cpu, package = set(), None, None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                package = value
            elif key == "core id" and (allowed is None or cpu in allowed):
                cores.add((package, value))
    return len(cores) or (len(allowed) if allowed else os.cpu_count())


def int8_op(op_type: str) -> bool:
    """Tells whether an op type is part of an int8 quantized graph."""
    return op_type in _INT8_OPS or op_type.startswith("QLinear") or op_type.endswith("Integer")


def _read_status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


@contextlib.contextmanager
def _peak_rss_delta(out: list[int | None]):
    """Measures peak RSS growth inside the block; appends bytes (or ``None``) to ``out``."""
    before = _read_status_kb("VmRSS")
    try:
        # Writing 5 resets the peak (VmHWM) so earlier sessions do not hide this one's peak.
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    yield
    peak = _read_status_kb("VmHWM") if resettable else None
    out.append(None if before is None or peak is None else max(0, (peak - before) * 1024))


def _op_histogram(optimized_path: Path) -> dict[str, int]:
    proto = onnx.load(str(optimized_path), load_external_data=False)
    counts = collections.Counter(
        f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in proto.graph.node
    )
    return dict(counts.most_common())


def parse_placement_profile(profile_path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Reads an ONNX Runtime profile and counts, per provider, the op types of nodes it ran.

    Each node is counted once, however many runs the profile covers.
    """
    events = json.loads(Path(profile_path).read_text())
    seen: dict[str, tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args:
            seen[ev.get("name", "")] = (args["provider"], args.get("op_name", "?"))
    placement: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for provider, op in seen.values():
        placement[provider][op] += 1
    return {p: dict(c.most_common()) for p, c in placement.items()}


def placement_warnings(placement: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Warns about int8 nodes that fell back to CPU and about inserted memcpy nodes."""
    warnings = []
    cpu_int8 = {
        op: n for op, n in placement.get(runtime.PROVIDERS["cpu"], {}).items() if int8_op(op)
    }
    if cpu_int8:
        warnings.append(f"int8 nodes fell back to CPU: {cpu_int8}")
    memcpy = sum(
        n for ops in placement.values() for op, n in ops.items() if op.startswith("Memcpy")
    )
    if memcpy:
        warnings.append(f"{memcpy} memcpy node(s) inserted between devices")
    return warnings


def _profile_placement(path: Path, provider: str, threads: int | None, feeds: dict) -> dict:
    session = runtime.create_session(path, provider=provider, threads=threads, profile=True)
    for _ in range(PROFILE_RUNS):
        session.run(None, feeds)
    profile = Path(session.end_profiling())
    try:
        return parse_placement_profile(profile)
    finally:
        profile.unlink(missing_ok=True)


class _Subject:
    """One model under test on one provider: its session and feeds per batch size."""

    def __init__(
        self,
        path: Path,
        provider: str,
        threads: int | None,
        optimized: Path,
        data: str | os.PathLike | None,
    ) -> None:
        self.path = path
        self.provider = provider
        self.threads = threads
        model = load_model(path)
        self.specs = input_specs(model)
        # Data other than the inputs (labels) may share the file: it is ignored.
        self.data = None if data is None else open_calibration_data(data, model, ignore_extra=True)
        # An onnx_ir graph is a reference cycle: left to the collector, the model (with its
        # weights, when they are in the file) stays in memory beside the sessions timed.
        del model
        gc.collect()
        self.optimized = optimized
        self.session: ort.InferenceSession | None = None
        self.memory_bytes: int | None = None
        self.feeds: dict[int, dict[str, np.ndarray]] = {}

    def prepare(self, batch: int, overrides: Mapping, seed: int) -> None:
        """Builds the feeds for a batch size: the data's first samples, or seeded random inputs.

        Raises:
            InputError: The data has fewer samples than the batch size.
        """
        if self.data is None:
            self.feeds[batch] = random_inputs(
                self.specs, batch=batch, overrides=overrides, seed=seed
            )
            return
        first = self.data.take(batch)
        if first.samples < batch:
            raise InputError(
                f"{self.path}: the data has {first.samples} rows, batch size {batch} needs more"
            )
        self.feeds[batch] = {n: np.ascontiguousarray(a) for n, a in first.items()}

    def run(self, batch: int) -> float:
        """Runs once and returns the latency in milliseconds."""
        feeds = self.feeds[batch]
        start = time.perf_counter()
        self.session.run(None, feeds)
        return (time.perf_counter() - start) * 1000.0

    def warm_up(self, batch: int) -> int:
        """Runs until the rolling median settles (bounded); returns the number of runs.

        The first call also creates the session; memory is measured around both, which is
        when the session allocates its weights and arena.
        """
        if self.session is not None:
            return self._settle(batch)
        memory: list[int | None] = []
        with _peak_rss_delta(memory):
            self.session = runtime.create_session(
                self.path,
                provider=self.provider,
                threads=self.threads,
                optimized_model_path=self.optimized,
            )
            runs = self._settle(batch)
        self.memory_bytes = memory[0]
        return runs

    def _settle(self, batch: int) -> int:
        try:
            times = [self.run(batch)]
        except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError, ValueError) as e:
            raise InputError(f"{self.path}: cannot run at batch size {batch}: {e}") from e
        previous = None
        while len(times) < MAX_WARMUP_RUNS:
            times.append(self.run(batch))
            if len(times) % WARMUP_WINDOW:
                continue
            current = float(np.median(times[-WARMUP_WINDOW:]))
            if previous is not None and abs(current - previous) <= WARMUP_TOLERANCE * previous:
                break
            previous = current
        return len(times)


def round_order(round_index: int, count: int) -> list[int]:
    """The order in which ``count`` models run in one round: rotated by one each round.

    Over ``count`` rounds every model runs once in every position and after every other
    model. (Alternating forward and reversed rounds, A B C C B A, would run the end models
    twice in a row at each turn, warm, and the middle ones never: measured 3-7% apart for
    two copies of one model.)
    """
    return [(i + round_index) % count for i in range(count)]


def _time_interleaved(
    subjects: list[_Subject],
    batch: int,
    min_runs: int,
    max_time: float,
    tick: Callable[[float], None],
) -> list[np.ndarray]:
    """Times the subjects in rounds until the budget and minimum are met.

    ``tick`` gets the fraction of the time budget used so far.
    """
    samples: list[list[float]] = [[] for _ in subjects]
    start = time.perf_counter()
    rounds = 0
    while rounds < MAX_ROUNDS:
        for i in round_order(rounds, len(subjects)):
            samples[i].append(subjects[i].run(batch))
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= min_runs and elapsed >= max_time:
            break
        tick(min(elapsed / max_time, 1.0) if max_time > 0 else 0.0)
    return [np.asarray(s) for s in samples]


def benchmark(
    models: Sequence[str | os.PathLike],
    *,
    provider: str = "cpu",
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    data: str | os.PathLike | None = None,
    min_runs: int = 20,
    max_time: float = 5.0,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> BenchResult:
    """Times models interleaved on the deployment path (all ONNX Runtime optimizations).

    For each provider and batch size, every model is warmed up until its rolling median
    settles, then the models run in rotating rounds (A B C, B C A, ...) so drift in machine speed
    hits all of them alike; ratios to the first model use bootstrap resampling of paired rounds.

    The JSON form (``BenchResult.to_dict``) is ``{"kind": "bench", "models", "threads",
    "threads_effective", "cpu_count", "seed", "memory_method", "model_info": [ModelInfo...],
    "results": [{provider, model, batch, runs, warmup_runs, p50_ms, p50_ci95_ms, p90_ms,
    p99_ms, mean_ms, std_ms, throughput_per_s, samples_ms, speedup_vs_first, speedup_ci95,
    ratio_vs_first, ratio_ci95}]}``.

    Args:
        models: Model files; the first is the baseline of the speedups.
        provider: ``cpu``, ``cuda`` or ``all`` (every available provider).
        batch_sizes: Batch sizes to time (dynamic or size-1 leading axes take them).
        threads: Intra-op threads; ``None`` keeps ONNX Runtime's default.
        shapes: Concrete shapes for inputs with dynamic dimensions (these take precedence over
            the batch size).
        data: Inputs as for calibration (`open_calibration_data`), e.g. an ``.npz`` with one
            array per input name (other keys are ignored); its first samples are the inputs.
        min_runs: Minimum timed rounds per batch size.
        max_time: Seconds of timed rounds per provider and batch size (all models together).
        seed: Seed of the random inputs and of the bootstraps.
        progress: Called with the fraction done (0..1), for a progress bar.

    Raises:
        InputError: No model, a bad batch size, an unavailable provider, missing shapes or data.
    """
    if not models:
        raise InputError("give at least one model to benchmark")
    if not batch_sizes or any(b <= 0 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    paths = [Path(m) for m in models]
    providers = runtime.expand_providers(provider)
    infos: list[ModelInfo] = []
    stats: list[LatencyStats] = []
    steps = len(providers) * len(batch_sizes)
    done = 0

    def tick(fraction: float = 0.0) -> None:
        if progress is not None:
            progress(min(1.0, (done + fraction) / steps))

    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
        for prov in providers:
            subjects = [
                _Subject(p, prov, threads, Path(tmp) / f"{prov}-{i}.onnx", data)
                for i, p in enumerate(paths)
            ]
            _check_shape_names(shapes or {}, subjects)
            for batch in batch_sizes:
                for sub in subjects:
                    sub.prepare(batch, shapes or {}, seed)
                warm = [sub.warm_up(batch) for sub in subjects]
                samples = _time_interleaved(
                    subjects,
                    batch,
                    min_runs,
                    max_time,
                    tick,
                )
                for sub, s, w in zip(subjects, samples, warm, strict=True):
                    stats.append(LatencyStats(prov, str(sub.path), batch, s, w, seed))
                done += 1
                tick()
            infos.extend(_model_info(sub, threads, batch_sizes[0]) for sub in subjects)
    return BenchResult([str(p) for p in paths], threads, infos, stats, seed)


def _check_shape_names(shapes: Mapping[str, tuple[int, ...]], subjects: list[_Subject]) -> None:
    """Refuses a shape for an input no model has (a typo would be ignored, not applied).

    Raises:
        InputError: Naming the first such input and the inputs the models have.
    """
    names = {spec.name for sub in subjects for spec in sub.specs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise InputError(
            f"shape given for '{unknown[0]}', which is no input of the model(s); "
            f"inputs: {', '.join(sorted(names))}"
        )


def _model_info(sub: _Subject, threads: int | None, batch: int) -> ModelInfo:
    info = ModelInfo(
        provider=sub.provider,
        path=str(sub.path),
        size_bytes=model_file_size(sub.path),
        peak_rss_delta_bytes=sub.memory_bytes,
        op_histogram=_op_histogram(sub.optimized) if sub.optimized.exists() else {},
    )
    if sub.provider != "cpu":
        info.placement = _profile_placement(sub.path, sub.provider, threads, sub.feeds[batch])
        info.warnings = placement_warnings(info.placement)
        for warning in info.warnings:
            logger.warning("%s on %s: %s", sub.path, sub.provider, warning)
    return info
