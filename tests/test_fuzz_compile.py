"""``onnxq compile`` on seeded random small graphs: it exits cleanly and what it writes runs."""

from __future__ import annotations

import pytest
from graph_fuzz import check_compile, invoke_cli, random_case

# Seeds of the suite's run; benchmarks/fuzz_compile.py runs many more.
SEEDS = range(30)
# The latency step times each model for seconds: a few seeds keep it.
LATENCY_SEEDS = {1, 10, 19}


@pytest.mark.parametrize("quantize", [True, False], ids=["int8", "fp32"])
@pytest.mark.parametrize("seed", SEEDS)
def test_compile_random_graph(tmp_path, seed, quantize):
    case = random_case(seed)
    latency = seed in LATENCY_SEEDS and quantize
    outcome = check_compile(case, tmp_path, invoke_cli, quantize=quantize, latency=latency)
    assert not outcome.problems, f"{case.description}: {outcome.problems}"


def test_generator_is_seeded_and_varied():
    first, again = random_case(3), random_case(3)
    assert first.model.SerializeToString() == again.model.SerializeToString()
    cases = [random_case(seed) for seed in SEEDS]
    ops = {node.op_type for case in cases for node in case.model.graph.node}
    assert {"Conv", "MatMul", "Gemm", "Concat", "Reshape", "Transpose", "Softmax"} <= ops
    assert {"ConvTranspose", "LayerNormalization", "Resize", "Gather", "Split"} <= ops
    assert len({case.model.opset_import[0].version for case in cases}) >= 4
    # The suite's seeds meet the exporter quirks that found bugs.
    described = " ".join(case.description for case in cases)
    for quirk in ("passthrough", "initializer-inputs", "dynamic-spatial", "batch N", "batch 1"):
        assert quirk in described
