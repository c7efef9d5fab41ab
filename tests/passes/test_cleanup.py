"""Cleanup passes and no-op rules: each fires on its pattern, exactly, and not on clean graphs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq.config import CompileConfig
from onnxq.pipeline import build_pipeline

ONE = np.ones((), np.float32)
ZERO = np.zeros((), np.float32)


# The fp32 pipeline's passes, configured as compile runs them.
PIPELINE_STEPS = build_pipeline(CompileConfig(quantize=False))


def cleanup_passes(opset: int = 13) -> list[ir.passes.PassBase]:
    """The cleanup stage of the pipeline, for a model of ``opset``."""
    return [
        s.pass_
        for s in build_pipeline(CompileConfig(quantize=False), opset=opset)
        if s.stage == "cleanup"
    ]


def cleanup_pass(name: str) -> ir.passes.PassBase:
    """The first pipeline pass whose class name starts with ``name``."""
    return next(s.pass_ for s in PIPELINE_STEPS if s.name.startswith(name))


def count_op(op_type: str) -> Callable[[ir.Model], int]:
    return lambda model: sum(n.op_type == op_type for n in model.graph)


def count_nodes(model: ir.Model) -> int:
    return len(model.graph)


def count_initializers(model: ir.Model) -> int:
    return len(model.graph.initializers)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A graph with one pattern a cleanup pass removes, and what must shrink."""

    pass_name: str
    graph: str
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    measure: Callable[[ir.Model], int] = count_nodes
    opset: int = 17


def _unary(body: str, out: str = "float[2,3] y") -> str:
    return f"net (float[2,3] x) => ({out}) {{\n{body}\n}}"


NO_OP_PATTERNS = {
    # Opset < 12 only: from opset 12 on, ratio is an input and FoldConstantsPass removes it.
    "dropout_ratio_0_opset10": Pattern(
        "RemoveNoOpsPass",
        _unary("d = Dropout <ratio = 0.0> (x)\n y = Relu (d)"),
        measure=count_op("Dropout"),
        opset=10,
    ),
    "add_0": Pattern("RemoveNoOpsPass", _unary("y = Add (x, z)"), {"z": ZERO}, count_op("Add")),
    "0_add": Pattern("RemoveNoOpsPass", _unary("y = Add (z, x)"), {"z": ZERO}, count_op("Add")),
    "mul_by_1": Pattern("RemoveNoOpsPass", _unary("y = Mul (x, o)"), {"o": ONE}, count_op("Mul")),
    "1_mul": Pattern("RemoveNoOpsPass", _unary("y = Mul (o, x)"), {"o": ONE}, count_op("Mul")),
    "sub_0": Pattern("RemoveNoOpsPass", _unary("y = Sub (x, z)"), {"z": ZERO}, count_op("Sub")),
    "div_by_1": Pattern("RemoveNoOpsPass", _unary("y = Div (x, o)"), {"o": ONE}, count_op("Div")),
    "cast_same_type": Pattern(
        "RemoveNoOpsPass", _unary("y = Cast <to = 1> (x)"), measure=count_op("Cast")
    ),
    "expand_same_shape": Pattern(
        "RemoveNoOpsPass",
        _unary("y = Expand (x, s)"),
        {"s": np.array([2, 3], np.int64)},
        count_op("Expand"),
    ),
    "transpose_identity_perm": Pattern(
        "RemoveNoOpsPass",
        _unary("y = Transpose <perm = [0, 1]> (x)"),
        measure=count_op("Transpose"),
    ),
    "transpose_transpose": Pattern(
        "RemoveNoOpsPass",
        _unary("t = Transpose <perm = [1, 0]> (x)\n y = Transpose <perm = [1, 0]> (t)"),
        measure=count_op("Transpose"),
    ),
    "reshape_reshape": Pattern(
        "RemoveNoOpsPass",
        _unary("r = Reshape (x, s1)\n y = Reshape (r, s2)", out="float[6] y"),
        {"s1": np.array([3, 2], np.int64), "s2": np.array([6], np.int64)},
        count_op("Reshape"),
    ),
}

PASS_PATTERNS = {
    "dropout": Pattern(
        "FoldConstantsPass", _unary("d = Dropout (x)\n y = Relu (d)"), measure=count_op("Dropout")
    ),
    "dropout_training_false": Pattern(
        "FoldConstantsPass",
        _unary("d = Dropout (x, ratio, train)\n y = Relu (d)"),
        {"ratio": np.full((), 0.5, np.float32), "train": np.array(False)},
        count_op("Dropout"),
    ),
    "fold_constants": Pattern(
        "FoldConstantsPass",
        _unary("c = Add (a, b)\n y = Mul (x, c)"),
        {"a": np.full(3, 2.0, np.float32), "b": np.arange(3, dtype=np.float32)},
        count_op("Add"),
    ),
    "identity": Pattern(
        "EliminateIdentityPass", _unary("i = Identity (x)\n y = Relu (i)"), measure=count_nodes
    ),
    "duplicate_initializers": Pattern(
        "Deduplicate",  # whichever initializer deduplication the pipeline uses
        _unary("a = Mul (x, w1)\n b = Mul (x, w2)\n y = Add (a, b)"),
        {"w1": np.arange(3, dtype=np.float32), "w2": np.arange(3, dtype=np.float32)},
        count_initializers,
    ),
    "common_subexpression": Pattern(
        "CommonSubexpressionEliminationPass",
        _unary("a = Relu (x)\n b = Relu (x)\n y = Add (a, b)"),
        measure=count_op("Relu"),
    ),
    "dead_node": Pattern(
        "RemoveUnusedNodesPass", _unary("dead = Neg (x)\n y = Relu (x)"), measure=count_nodes
    ),
    "unused_initializer": Pattern(
        "RemoveUnusedNodesPass",
        _unary("y = Relu (x)"),
        {"unused": np.arange(4, dtype=np.float32)},
        count_initializers,
    ),
}


@pytest.mark.parametrize(
    "pattern",
    list(NO_OP_PATTERNS.values()) + list(PASS_PATTERNS.values()),
    ids=list(NO_OP_PATTERNS) + list(PASS_PATTERNS),
)
def test_pass_removes_its_pattern_exactly(pattern, build_onnx, to_ir_model, assert_same_outputs):
    proto = build_onnx(pattern.graph, pattern.weights, opset=pattern.opset)
    before = pattern.measure(to_ir_model(proto))

    result = cleanup_pass(pattern.pass_name)(to_ir_model(proto))

    assert result.modified
    assert pattern.measure(result.model) < before
    assert_same_outputs(proto, result.model, tol=1e-6)


def test_noop_model_reduces_to_its_relu(noop_model, to_ir_model, op_types_of, assert_same_outputs):
    model = to_ir_model(noop_model)
    for pass_ in cleanup_passes():
        model = pass_(model).model

    assert op_types_of(model) == ["Relu"]
    assert not model.graph.initializers  # the unused one is gone, 0 and 1 folded away
    assert_same_outputs(noop_model, model, tol=1e-6)


def test_constant_node_weights_become_initializers(
    constant_weights_model, to_ir_model, op_types_of, assert_same_outputs
):
    model = to_ir_model(constant_weights_model)

    result = cleanup_pass("LiftConstantsToInitializersPass")(model)

    assert result.modified
    assert "Constant" not in op_types_of(model)
    (conv,) = [n for n in model.graph if n.op_type == "Conv"]
    assert all(v.name in model.graph.initializers for v in conv.inputs[1:])
    assert model.graph.initializers["w"].const_value.shape == (3, 2, 3, 3)
    assert_same_outputs(constant_weights_model, model, tol=0.0)


def test_topological_order_is_restored(unsorted_model, to_ir_model, op_types_of):
    assert op_types_of(unsorted_model) == ["Sqrt", "Abs", "Neg"]
    model = to_ir_model(unsorted_model)

    result = cleanup_pass("TopologicalSortPass")(model)

    assert result.modified
    assert op_types_of(model) == ["Neg", "Abs", "Sqrt"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)  # checks the order


def test_unused_opset_is_removed(build_onnx, to_ir_model):
    proto = build_onnx(_unary("y = Relu (x)"))
    proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model = to_ir_model(proto)

    result = cleanup_pass("RemoveUnusedOpsetsPass")(model)

    assert result.modified
    assert "com.microsoft" not in model.opset_imports
    assert model.opset_imports[""] == 17


def test_unused_function_is_removed(build_onnx, to_ir_model):
    proto = build_onnx(_unary("y = Relu (x)"))
    proto.functions.append(
        onnx.helper.make_function(
            "local",
            "Twice",
            ["a"],
            ["b"],
            [onnx.helper.make_node("Add", ["a", "a"], ["b"])],
            [onnx.helper.make_opsetid("", 17)],
        )
    )
    proto.opset_import.append(onnx.helper.make_opsetid("local", 1))
    model = to_ir_model(proto)

    result = cleanup_pass("RemoveUnusedFunctionsPass")(model)

    assert result.modified
    assert not model.functions


def test_unnamed_nodes_get_unique_names(build_onnx, to_ir_model):
    model = to_ir_model(build_onnx(_unary("a = Neg (x)\n b = Abs (a)\n y = Relu (b)")))
    assert not any(n.name for n in model.graph)

    result = cleanup_pass("NameFixPass")(model)

    names = [n.name for n in model.graph]
    assert result.modified
    assert all(names) and len(set(names)) == len(names)


@pytest.fixture
def clean_model(build_onnx) -> onnx.ModelProto:
    """Named, sorted, shape-inferred nodes, initializer weights, no no-ops, nothing unused."""
    model = build_onnx(
        """
        net (float[1,2,5,5] x) => (float[1,3,5,5] y) {
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            [relu] r = Relu (c)
            [scale] y = Mul (r, s)
        }
        """,
        {
            "w": np.full((3, 2, 3, 3), 0.25, np.float32),
            "b": np.arange(3, dtype=np.float32),
            "s": np.float32(0.5) * np.ones((1, 3, 1, 1), np.float32),
        },
    )
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


@pytest.mark.parametrize("step", PIPELINE_STEPS, ids=lambda s: f"{s.stage}-{s.name}")
def test_pass_leaves_a_clean_graph_alone(step, clean_model, to_ir_model):
    model = to_ir_model(clean_model)
    before = onnx.printer.to_text(ir.to_proto(model))

    result = step.pass_(model)

    assert not result.modified
    assert onnx.printer.to_text(ir.to_proto(result.model)) == before


def test_cleanup_keeps_every_graph_output_name(build_onnx, to_ir_model):
    proto = build_onnx(
        """
        net (float[2,3] x) => (float[2,3] y, float[2,3] z) {
            y = Relu (x)
            z = Identity (y)
        }
        """
    )
    model = to_ir_model(proto)
    for step in PIPELINE_STEPS:
        step.pass_(model)

    assert [v.name for v in model.graph.outputs] == ["y", "z"]


def test_opset_upgrade_runs_only_below_13(build_onnx, to_ir_model):
    from onnxq.passes.cleanup import UpgradeOpsetPass

    assert not any(isinstance(p, UpgradeOpsetPass) for p in cleanup_passes(13))
    model = to_ir_model(
        build_onnx("net (float[2,3] x) => (float[2,3] y) { y = Relu (x) }", opset=11)
    )
    upgrade = UpgradeOpsetPass()
    result = upgrade(model)
    assert result.modified and result.model.opset_imports[""] == 13
    assert result.details["note"] == "upgraded the model from opset 11 to 13"


_IF_OF_OUTER_VALUES = """
    net (float[2,3] x, bool c) => (float[2,3] y) {
        a = Relu (x)
        b = Sigmoid (x)
        y = If (c) <
            then_branch = t () => (float[2,3] ty) { ty = Identity (a) },
            else_branch = e () => (float[2,3] ey) { r = Relu (b)  ey = Identity (r) }
        >
    }
"""


def test_branch_output_of_an_outer_value_keeps_its_identity(build_onnx, to_ir_model):
    # ONNX Runtime refuses a subgraph output that is an outer-scope value ("returned
    # directly"): the then-branch's Identity of `a` must stay. The else-branch's Identity
    # of its own Relu goes as anywhere else.
    proto = build_onnx(_IF_OF_OUTER_VALUES)
    model = to_ir_model(proto)
    for step in PIPELINE_STEPS:
        step.pass_(model)

    branches = next(n for n in model.graph if n.op_type == "If").attributes
    then_ops = [n.op_type for n in branches["then_branch"].as_graph()]
    else_ops = [n.op_type for n in branches["else_branch"].as_graph()]
    assert (then_ops, else_ops) == (["Identity"], ["Relu"])
    # The outer values are neither renamed after a branch output nor dropped.
    assert [(n.op_type, n.outputs[0].name) for n in model.graph][:2] == [
        ("Relu", "a"),
        ("Sigmoid", "b"),
    ]
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    reference = ort.InferenceSession(proto.SerializeToString())
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_allclose(session.run(None, feeds)[0], reference.run(None, feeds)[0])


def _shape_gather_model(index_is_input: bool) -> onnx.ModelProto:
    """Reshape x[N, 3, 4] to [dim_i(x), -1], the index ``i`` an initializer (maybe an input)."""
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    inputs = [onnx.helper.make_tensor_value_info("x", f, [2, 3, 4])]
    if index_is_input:
        inputs.append(onnx.helper.make_tensor_value_info("i", i64, [1]))
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Shape", ["x"], ["s"]),
            onnx.helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
            onnx.helper.make_node("Concat", ["d", "rest"], ["t"], axis=0),
            onnx.helper.make_node("Reshape", ["x", "t"], ["y"]),
        ],
        "g",
        inputs,
        [onnx.helper.make_tensor_value_info("y", f, None)],
        [
            onnx.numpy_helper.from_array(np.array([0], np.int64), "i"),
            onnx.numpy_helper.from_array(np.array([-1], np.int64), "rest"),
        ],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 14)])


def test_fold_constants_folds_a_gather_of_a_shape(to_ir_model):
    model = to_ir_model(_shape_gather_model(index_is_input=False))
    cleanup_pass("FoldConstants")(model)
    assert "Gather" not in [n.op_type for n in model.graph]


def test_fold_constants_keeps_an_overridable_initializer(to_ir_model):
    # Found by tests/test_fuzz_compile.py: the index was folded in and its initializer
    # dropped, leaving 'i' a required input nobody feeds.
    model = to_ir_model(_shape_gather_model(index_is_input=True))
    cleanup_pass("FoldConstants")(model)
    assert "Gather" in [n.op_type for n in model.graph]
    assert "i" in model.graph.initializers and model.graph.initializers["i"].is_graph_input()
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert session.run(None, {"x": x})[0].shape == (2, 12)
    # The default is still the caller's to override.
    assert session.run(None, {"x": x, "i": np.array([1], np.int64)})[0].shape == (3, 8)


def _tied_head_model(vocab: int, shared: bool) -> onnx.ModelProto:
    """An LM-head-like graph: logits = h @ Transpose(E), E also embedding the ids if shared."""
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    nodes = [
        onnx.helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["h", "Et"], ["logits"]),
    ]
    inputs = [onnx.helper.make_tensor_value_info("h", f, [1, 64])]
    outputs = [onnx.helper.make_tensor_value_info("logits", f, [1, vocab])]
    if shared:
        nodes.append(onnx.helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0))
        inputs.append(onnx.helper.make_tensor_value_info("ids", i64, [1, 4]))
        outputs.append(onnx.helper.make_tensor_value_info("emb", f, [1, 4, 64]))
    weights = np.random.default_rng(0).standard_normal((vocab, 64)).astype(np.float32)
    graph = onnx.helper.make_graph(
        nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(weights, "E")]
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


def test_fold_constants_does_not_copy_a_large_shared_constant(to_ir_model):
    # A 4 MB embedding tied to the head: folding its Transpose would keep both copies.
    proto = _tied_head_model(vocab=16384, shared=True)
    model = to_ir_model(proto)
    before = _initializer_bytes(model)
    cleanup_pass("FoldConstants")(model)
    assert "Transpose" in [n.op_type for n in model.graph]
    assert _initializer_bytes(model) == before
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"h": np.ones((1, 64), np.float32), "ids": np.array([[1, 2, 3, 4]], np.int64)}
    for got, want in zip(session.run(None, feeds), reference.run(None, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(("vocab", "shared"), [(16384, False), (64, True)])
def test_fold_constants_folds_an_unshared_or_small_constant(vocab, shared, to_ir_model):
    # Unshared: the fold replaces the constant (no copy). Small: a copy costs little.
    model = to_ir_model(_tied_head_model(vocab=vocab, shared=shared))
    cleanup_pass("FoldConstants")(model)
    assert "Transpose" not in [n.op_type for n in model.graph]
