"""Executors that run independent tasks in-process, on a local process pool, or on Ray."""

from __future__ import annotations

import abc
import logging
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from onnxq.errors import InputError

__all__ = [
    "EXECUTORS",
    "THREADS_ENV",
    "Executor",
    "LocalExecutor",
    "PoolExecutor",
    "Progress",
    "RayExecutor",
    "make_executor",
]

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")

# Intra-op threads of ONNX Runtime sessions in a worker (`onnxq.runtime.create_session`):
# workers sharing a machine each get their share of its cores. ONNX Runtime's default is
# every core; with several workers its spinning threads then fight over them (on this
# 2-core machine under load, one thread calibrated twice as fast as two).
THREADS_ENV = "ONNXQ_THREADS"

Progress = Callable[[int, int | None], None]
"""Called with the tasks done and the total, as `onnxq.cli._progress.TerminalProgress.update`."""
Task = Callable[..., Any]


def _no_progress(done: int, total: int | None) -> None:
    return None


_NO_RAY = "--executor ray needs Ray, which is not installed: install onnxq[ray]"


class Executor(abc.ABC):
    """Runs independent tasks and returns their results in the order of their items.

    The library submits tasks through this interface only, so the same code runs
    in-process, on a process pool or on a Ray cluster. Tasks must be module-level
    functions (they are pickled by reference); large objects every task needs (a model,
    calibration shards) go through `put` once, not with every task.

    Attributes:
        workers: How many tasks run at once.
    """

    workers: int = 1

    def put(self, obj: Any) -> Any:
        """A handle to ``obj`` that `map` passes to tasks resolved (default: ``obj`` itself)."""
        return obj

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Sequence[Any] = (),
        return_exceptions: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        """Runs ``fn(item, *shared)`` for every item; returns the results in item order.

        Args:
            fn: A module-level function.
            items: One task per item (pickled with its task).
            shared: Arguments every task gets after its item; handles from `put` are
                resolved to their objects.
            return_exceptions: A failing task's exception is returned in its slot and the
                others run on (False: the first failure cancels the rest and is raised).
            progress: Called with the tasks done and their total after each one ends.

        Raises:
            KeyboardInterrupt: After cancelling every task still running or queued.
        """
        return self._map(
            fn, list(items), tuple(shared), return_exceptions, progress or _no_progress
        )

    @abc.abstractmethod
    def _map(self, fn: Task, items: list, shared: tuple, errors: bool, progress: Progress) -> list:
        """`map` with the items listed (``errors``: ``return_exceptions``)."""

    def close(self) -> None:
        """Releases the workers (idempotent)."""
        return  # in-process executors hold none

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Runs the tasks one after another in this process: needs nothing, the default."""

    def _map(self, fn: Task, items: list, shared: tuple, errors: bool, progress: Progress) -> list:
        results = []
        for item in items:
            try:
                results.append(fn(item, *shared))
            except Exception as e:
                if not errors:
                    raise
                results.append(e)
            progress(len(results), len(items))
        return results


# The shared arguments of the pool's current map, set once per worker process by
# `_pool_init` rather than pickled with every task.
_POOL_SHARED: tuple[Any, ...] = ()


def _pool_init(shared: tuple[Any, ...], threads: int) -> None:
    global _POOL_SHARED
    _POOL_SHARED = shared
    os.environ.setdefault(THREADS_ENV, str(threads))  # the user's setting wins
    # Ctrl-C reaches the whole process group: the parent alone handles it, terminating
    # the pool, so workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_task(fn: Callable[..., Any], item: Any) -> Any:
    return fn(item, *_POOL_SHARED)


class PoolExecutor(Executor):
    """Runs the tasks on a pool of local worker processes.

    Workers are spawned (not forked: the parent may hold ONNX Runtime thread pools), and
    get the shared arguments once each when the pool starts, and their share of this
    machine's cores for ONNX Runtime (`THREADS_ENV`). A pool is kept while later
    maps share the very same objects, as the rounds of a search do.

    Args:
        workers: Worker processes.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None
        self._shared_ids: tuple[int, ...] = ()
        self._shared: tuple[Any, ...] = ()  # held so the ids above stay unique

    def _pool_for(self, shared: tuple[Any, ...]) -> Any:
        ids = tuple(id(s) for s in shared)
        if self._pool is not None and ids != self._shared_ids:
            self.close()
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            threads = max(1, len(os.sched_getaffinity(0)) // self.workers)
            self._pool = context.Pool(
                self.workers, initializer=_pool_init, initargs=(shared, threads)
            )
            self._shared_ids, self._shared = ids, shared
        return self._pool

    def _map(self, fn: Task, items: list, shared: tuple, errors: bool, progress: Progress) -> list:
        if not items:
            return []
        pool = self._pool_for(shared)
        done: queue.SimpleQueue[tuple[int, bool, Any]] = queue.SimpleQueue()
        for index, item in enumerate(items):
            pool.apply_async(
                _pool_task,
                (fn, item),
                callback=lambda value, i=index: done.put((i, True, value)),
                error_callback=lambda error, i=index: done.put((i, False, error)),
            )
        results: list[Any] = [None] * len(items)
        try:
            for count in range(1, len(items) + 1):
                index, ok, value = done.get()
                if not ok and not errors:
                    raise value
                results[index] = value
                progress(count, len(items))
        except BaseException:
            # A failure or Ctrl-C: no task of this map may go on running.
            self._terminate()
            raise
        return results

    def _terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool, self._shared_ids, self._shared = None, (), ()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool, self._shared_ids, self._shared = None, (), ()


def _ray_task(fn: Callable[..., Any], item: Any, *shared: Any) -> Any:
    os.environ.setdefault(THREADS_ENV, "1")  # the one CPU the task asked Ray for
    return fn(item, *shared)


class RayExecutor(Executor):
    """Runs the tasks on Ray: an existing cluster, or a local instance it starts.

    Args:
        workers: CPUs of a local instance it starts (None: all of this machine's); on a
            cluster, at most this many tasks run at once (None: as many as it schedules).
        address: The cluster to attach to (None: ``RAY_ADDRESS``, else start a local one).
            When Ray is already initialised in this process, that instance is used.

    Raises:
        InputError: Ray is not installed.
    """

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise InputError(_NO_RAY) from None
        self._ray = ray
        self._requested = workers
        self._address = address
        self._started = False
        self._workers: int | None = None
        self._remote: Any = None

    def _connect(self) -> None:
        """Attaches to (or starts) Ray on first use: a run that submits nothing starts nothing."""
        if self._remote is not None:
            return
        ray = self._ray
        if not ray.is_initialized():
            address = self._address or os.environ.get("RAY_ADDRESS") or None
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if address is None and self._requested is not None:
                kwargs["num_cpus"] = self._requested
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError) as e:
                raise InputError(f"cannot attach to Ray at {address}: {e}") from None
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        requested = self._requested
        self._workers = max(1, min(requested, cpus) if requested is not None else cpus)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)

    @property  # type: ignore[override]
    def workers(self) -> int:
        self._connect()
        assert self._workers is not None
        return self._workers

    def put(self, obj: Any) -> Any:
        self._connect()
        return self._ray.put(obj)

    def _map(self, fn: Task, items: list, shared: tuple, errors: bool, progress: Progress) -> list:
        self._connect()
        ray = self._ray
        # Shared objects not already in the store go there once, not with every task.
        shared = [s if isinstance(s, ray.ObjectRef) else ray.put(s) for s in shared]
        fn_ref = ray.put(fn)
        results: list[Any] = [None] * len(items)
        index_of: dict[Any, int] = {}
        pending: list[Any] = []
        queued = iter(enumerate(items))
        count = 0
        try:
            while True:
                # Keep a window of tasks in flight: every task is not queued at once, so
                # a failure or Ctrl-C has little to cancel, and Ray never holds them all.
                for index, item in queued:
                    ref = self._remote.remote(fn_ref, item, *shared)
                    index_of[ref] = index
                    pending.append(ref)
                    if len(pending) >= 2 * self.workers:
                        break
                if not pending:
                    break
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    index = index_of.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        error = _cause(e)
                        if not errors:
                            raise error from None
                        results[index] = error
                    count += 1
                    progress(count, len(items))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False
        self._remote = None


def _cause(error: Exception) -> BaseException:
    """The task's own exception behind Ray's wrapper, when Ray has it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def make_executor(
    kind: str = "local", workers: int | None = None, address: str | None = None
) -> Executor:
    """The executor the ``--executor``, ``--workers`` and ``--ray-address`` flags ask for.

    Args:
        kind: ``local`` (in this process when ``workers`` <= 1, else a process pool) or
            ``ray``.
        workers: Tasks run at once (None: 1 locally; all CPUs of a Ray instance).
        address: Ray only: the cluster to attach to (default ``RAY_ADDRESS``, else a
            local Ray instance is started).

    Raises:
        InputError: An unknown kind, workers < 1, an address without Ray, or Ray is not
            installed.
    """
    if kind not in EXECUTORS:
        raise InputError(f"unknown executor {kind!r}; known: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if kind == "ray":
        return RayExecutor(workers, address)
    if address:
        raise InputError("--ray-address needs --executor ray")
    if workers is None or workers <= 1:
        return LocalExecutor()
    return PoolExecutor(workers)
