"""Tests on a real local Ray instance (few: starting Ray takes seconds on 2 cores)."""

import math
import operator

import pytest

from onnxq.executor import RayExecutor, make_executor


def test_ray_map_resolves_handles_and_returns_failures_in_their_slots(ray_instance):
    with make_executor("ray", 2) as executor:
        assert isinstance(executor, RayExecutor) and executor.workers == 2
        offset = executor.put(10)
        assert executor.map(operator.add, range(5), shared=(offset,)) == [10, 11, 12, 13, 14]
        results = executor.map(math.sqrt, [4.0, -1.0, 9.0], return_exceptions=True)
        assert results[0] == 2.0 and results[2] == 3.0
        assert isinstance(results[1], ValueError)
        with pytest.raises(ZeroDivisionError):
            executor.map(operator.truediv, [1, 0], shared=(0,))
    assert ray_instance.is_initialized()  # attached to the fixture's instance: left running
