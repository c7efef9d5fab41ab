import math
import operator
import os
import sys
import time

import pytest

from onnxq.errors import EXIT_USAGE, InputError
from onnxq.executor import THREADS_ENV, LocalExecutor, PoolExecutor, make_executor


@pytest.mark.parametrize("workers", [None, 1, 2])
def test_local_map_keeps_item_order_and_resolves_shared(workers):
    seen = []
    with make_executor("local", workers) as executor:
        assert isinstance(executor, PoolExecutor if workers == 2 else LocalExecutor)
        shared = executor.put(10)
        results = executor.map(
            operator.add, range(7), shared=(shared,), progress=lambda d, t: seen.append((d, t))
        )
    assert results == [10 + i for i in range(7)]
    assert seen[-1] == (7, 7) and [d for d, _ in seen] == list(range(1, 8))


@pytest.mark.parametrize("workers", [1, 2])
def test_return_exceptions_puts_the_failure_in_its_slot(workers):
    with make_executor("local", workers) as executor:
        results = executor.map(math.sqrt, [4.0, -1.0, 9.0], return_exceptions=True)
    assert results[0] == 2.0 and results[2] == 3.0
    assert isinstance(results[1], ValueError)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_is_raised_without_return_exceptions(workers):
    with make_executor("local", workers) as executor, pytest.raises(ZeroDivisionError):
        executor.map(operator.truediv, [1, 0, 2], shared=(0,))


def test_pool_is_kept_across_maps_with_the_same_shared_objects():
    with make_executor("local", 2) as executor:
        shared = ([1, 2],)
        executor.map(operator.mul, [1], shared=shared)
        pool = executor._pool
        assert executor.map(operator.mul, [2, 0], shared=shared) == [[1, 2, 1, 2], []]
        assert executor._pool is pool
        assert executor.map(operator.mul, [1], shared=([5],)) == [[5]]
        assert executor._pool is not pool


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "dask"}, "unknown executor 'dask'"),
        ({"workers": 0}, "--workers must be >= 1"),
        ({"address": "ray://x:10001"}, "--ray-address needs --executor ray"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_executor(**kwargs)


def test_without_ray_the_error_says_install_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(InputError) as caught:
        make_executor("ray")
    assert "install onnxq[ray]" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE


def test_an_interrupt_terminates_the_pool():
    def interrupt(done, total):
        raise KeyboardInterrupt

    with make_executor("local", 2) as executor:
        executor.map(abs, [0])
        processes = list(executor._pool._pool)  # the same pool runs the next map
        with pytest.raises(KeyboardInterrupt):
            executor.map(time.sleep, [0, 30, 30], progress=interrupt)
        assert executor._pool is None
        assert not any(p.is_alive() for p in processes)


def test_pool_workers_get_their_share_of_the_cores_for_onnxruntime(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    with make_executor("local", 2) as executor:
        assert executor.map(os.getenv, [THREADS_ENV, THREADS_ENV]) == [str(share)] * 2
    monkeypatch.setenv(THREADS_ENV, "3")  # the user's setting wins
    with make_executor("local", 2) as executor:
        assert executor.map(os.getenv, [THREADS_ENV]) == ["3"]
