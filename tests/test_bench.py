from __future__ import annotations

import itertools
import os

import numpy as np
import onnx
import pytest
from classifier_fixtures import write_pair
from onnx import TensorProto, helper

from onnxq import runtime
from onnxq.bench import (
    benchmark,
    int8_op,
    parse_placement_profile,
    placement_warnings,
)
from onnxq.errors import InputError

FAST = {"min_runs": 5, "max_time": 0.05}


def test_benchmark_two_models_interleaved(tmp_path):
    ref, cand, _ = write_pair(tmp_path)
    result = benchmark([ref, cand], batch_sizes=(1, 3), **FAST)
    report = result.to_dict()
    assert [(r["model"], r["batch"]) for r in report["results"]] == [
        (str(ref), 1),
        (str(cand), 1),
        (str(ref), 3),
        (str(cand), 3),
    ]
    for r in report["results"]:
        assert r["runs"] >= FAST["min_runs"]
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        lo, hi = r["p50_ci95_ms"]
        assert lo <= r["p50_ms"] <= hi
        assert len(r["samples_ms"]) == r["runs"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
        lo, hi = r["speedup_ci95"]
        assert lo <= r["speedup_vs_first"] <= hi
        assert r["ratio_vs_first"] == pytest.approx(1 / r["speedup_vs_first"])
    first = report["results"][0]
    assert first["speedup_vs_first"] == 1.0 and first["speedup_ci95"] == [1.0, 1.0]
    # Interleaving gives both models the same number of paired rounds.
    assert report["results"][0]["runs"] == report["results"][1]["runs"]
    info = report["model_info"][0]
    assert info["size_bytes"] == ref.stat().st_size
    # ORT fuses MatMul + Add into Gemm: the histogram is of the optimized graph.
    assert info["op_histogram"] == {"Gemm": 1, "Softmax": 1}
    assert info["placement"] is None
    assert report["memory_method"]


def test_benchmark_takes_inputs_from_data(tmp_path):
    ref, _, data = write_pair(tmp_path)
    result = benchmark([ref], data=data, batch_sizes=(4,), **FAST)
    assert result.stats[0].batch == 4
    with pytest.raises(InputError, match="rows"):
        benchmark([ref], data=data, batch_sizes=(1000,), **FAST)


def test_benchmark_input_errors(tmp_path):
    ref, _, _ = write_pair(tmp_path)
    with pytest.raises(InputError, match="at least one model"):
        benchmark([])
    with pytest.raises(InputError, match="positive"):
        benchmark([ref], batch_sizes=(0,))
    with pytest.raises(InputError, match="no such file"):
        benchmark([tmp_path / "missing.onnx"])


@pytest.mark.skipif("cuda" in runtime.available_providers(), reason="CUDA is available")
def test_benchmark_cuda_unavailable_is_an_input_error(tmp_path):
    ref, _, _ = write_pair(tmp_path)
    with pytest.raises(InputError, match="CUDA is unavailable"):
        benchmark([ref], provider="cuda")


def test_benchmark_dynamic_dims_need_shapes(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(InputError, match="--shape x="):
        benchmark([path], **FAST)
    result = benchmark([path], shapes={"x": (2, 5)}, **FAST)
    assert result.stats[0].samples_ms.size >= FAST["min_runs"]


def test_placement_from_profile_and_warnings(tmp_path):
    ref, _, _ = write_pair(tmp_path)
    session = runtime.create_session(ref, optimization="disable", profile=True)
    session.run(None, {"x": np.zeros((2, 8), np.float32)})
    profile = session.end_profiling()
    try:
        placement = parse_placement_profile(profile)
    finally:
        os.unlink(profile)
    assert placement == {"CPUExecutionProvider": {"MatMul": 1, "Add": 1, "Softmax": 1}}
    assert placement_warnings(placement) == []
    bad = {
        "CUDAExecutionProvider": {"Conv": 2, "MemcpyToHost": 1},
        "CPUExecutionProvider": {"QLinearConv": 1, "MatMulInteger": 2},
    }
    warnings = placement_warnings(bad)
    assert len(warnings) == 2
    assert "QLinearConv" in warnings[0] and "memcpy" in warnings[1]


def test_int8_op():
    assert all(map(int8_op, ["QLinearConv", "MatMulInteger", "DequantizeLinear"]))
    assert not any(map(int8_op, ["Conv", "MatMul", "Softmax"]))


@pytest.mark.parametrize("count", [2, 3, 4])
def test_round_order_gives_every_model_every_position(count):
    from onnxq.bench import round_order

    rounds = [round_order(r, count) for r in range(count)]
    for position in range(count):
        assert sorted(order[position] for order in rounds) == list(range(count))
    # Across round boundaries no model runs twice in a row (with three or more models), so
    # no model is timed warm from its own previous run more often than another.
    if count > 2:
        sequence = [i for order in rounds * 2 for i in order]
        assert all(a != b for a, b in itertools.pairwise(sequence))


def test_models_read_for_their_inputs_are_freed_before_the_sessions(tmp_path, monkeypatch):
    import gc

    import onnx_ir as ir

    ref, cand, _ = write_pair(tmp_path)
    create = runtime.create_session
    graphs_at_creation = []

    def graphs() -> int:
        return sum(isinstance(o, ir.Graph) for o in gc.get_objects())

    def counting(*args, **kwargs):
        graphs_at_creation.append(graphs())
        return create(*args, **kwargs)

    monkeypatch.setattr(runtime, "create_session", counting)
    gc.collect()
    before = graphs()
    # With automatic collection off, only an explicit collection frees an onnx_ir graph
    # (a reference cycle): the files' models, weights included, must not outlive reading.
    gc.disable()
    try:
        benchmark([ref, cand], **FAST)
    finally:
        gc.enable()
    assert graphs_at_creation and max(graphs_at_creation) == before
