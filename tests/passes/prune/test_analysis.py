"""Channel dataflow analysis: layouts, residual groups and blocked spaces, graph untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_builders import build_model, seeded

from onnxq.passes.prune.analysis import ChannelAnalysis, Layout, Segment, analyze_channels
from onnxq.passes.prune.weights import Exclusions


def _analyze(proto: onnx.ModelProto, exclude: tuple[str, ...] = ()):
    """The analysis of an inferred copy of ``proto``, checking the graph is left as it was."""
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    before = ir.to_proto(model).SerializeToString()
    analysis = analyze_channels(model.graph, Exclusions(exclude))
    assert ir.to_proto(model).SerializeToString() == before  # the analysis never edits
    return model, analysis


def _space(analysis: ChannelAnalysis, name: str) -> int:
    return next(i for i, s in enumerate(analysis.spaces) if s.node.name == name)


def _layout(model: ir.Model, analysis: ChannelAnalysis, node_name: str) -> Layout:
    node = next(n for n in model.graph if n.name == node_name)
    return analysis.layouts[node.outputs[0]]


def _residual() -> onnx.ModelProto:
    n = seeded(20)
    return build_model(
        """
        net (float[1,4,8,8] x) => (float[1,2] y) {
            [c1] a = Conv (x, w1)
            [r1] ra = Relu (a)
            [c2] b = Conv (ra, w2)
            [c3] s = Conv (x, w3)
            [add] t = Add (b, s)
            [gap] g = GlobalAveragePool (t)
            [flat] f = Flatten (g)
            [fc] y = Gemm <transB = 1> (f, wf)
        }
        """,
        {"w1": n(8, 4, 1, 1), "w2": n(8, 8, 1, 1), "w3": n(8, 4, 1, 1), "wf": n(2, 8)},
    )


def test_residual_add_ties_its_producers_into_one_group():
    model, analysis = _analyze(_residual())
    assert [s.node.name for s in analysis.spaces] == ["c1", "c2", "c3", "fc"]
    groups = sorted(
        sorted(analysis.spaces[m].node.name for m in g) for g in analysis.groups().values()
    )
    assert groups == [["c1"], ["c2", "c3"], ["fc"]]
    assert analysis.blocked == {_space(analysis, "fc"): "reaches graph output 'y'"}
    # The Add passes its first input's layout on; Relu and pooling keep channels in place.
    assert _layout(model, analysis, "add").spaces == [_space(analysis, "c2")]
    assert _layout(model, analysis, "r1") == _layout(model, analysis, "c1")
    # The consumers that lose input channels: c2 (of c1) and the Gemm head (of the group).
    assert sorted(p.node.name for p in analysis.consumers) == ["c2", "fc"]


def test_concat_joins_layouts_end_to_end():
    n = seeded(21)
    proto = build_model(
        """
        net (float[1,3,6,6] x) => (float[1,5,6,6] y) {
            [c1] a = Conv (x, w1)
            [c2] b = Conv (x, w2)
            [cat] c = Concat <axis = 1> (a, x, b)
            [c3] y = Conv (c, w3)
        }
        """,
        {"w1": n(6, 3, 1, 1), "w2": n(4, 3, 1, 1), "w3": n(5, 13, 1, 1)},
    )
    model, analysis = _analyze(proto)
    c1, c2 = _space(analysis, "c1"), _space(analysis, "c2")
    layout = _layout(model, analysis, "cat")
    assert layout.segments == (Segment(c1, 6), Segment(None, 3), Segment(c2, 4))
    assert layout.width == 13
    removed = {c1: np.array([0, 5]), c2: np.array([1])}
    np.testing.assert_array_equal(layout.removed(removed), [0, 5, 6 + 3 + 1])


def test_flatten_repeats_each_channel_per_position():
    n = seeded(22)
    proto = build_model(
        """
        net (float[1,3,4,4] x) => (float[1,3] y) {
            [c1] a = Conv (x, w1)
            [pool] p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
            [flat] f = Flatten (p)
            [fc] y = Gemm (f, wf)
        }
        """,
        {"w1": n(5, 3, 1, 1), "wf": n(20, 3)},
    )
    model, analysis = _analyze(proto)
    c1 = _space(analysis, "c1")
    layout = _layout(model, analysis, "flat")
    assert (layout.axis, layout.segments) == (1, (Segment(c1, 5, inner=4),))
    np.testing.assert_array_equal(layout.removed({c1: np.array([1])}), [4, 5, 6, 7])


@pytest.mark.parametrize(
    ("op", "reason"),
    [("Softmax <axis = 1>", "reaches Softmax 'op'"), ("Relu", None)],
)
def test_unknown_op_blocks_the_space_a_known_one_does_not(op, reason):
    n = seeded(23)
    proto = build_model(
        f"""
        net (float[1,3,4,4] x) => (float[1,2,4,4] y) {{
            [c1] a = Conv (x, w1)
            [op] s = {op} (a)
            [c2] y = Conv (s, w2)
        }}
        """,
        {"w1": n(6, 3, 1, 1), "w2": n(2, 6, 1, 1)},
    )
    _, analysis = _analyze(proto)
    assert analysis.blocked.get(_space(analysis, "c1")) == reason


def test_excluded_producer_makes_no_space():
    model, analysis = _analyze(_residual(), exclude=("c1",))
    assert [s.node.name for s in analysis.spaces] == ["c2", "c3", "fc"]
    assert all(p.node.name != "c2" for p in analysis.consumers)  # its input stays whole
    assert _layout(model, analysis, "add").spaces == [_space(analysis, "c2")]


def test_value_used_inside_a_subgraph_blocks_its_space():
    n = seeded(24)
    graph = onnx.parser.parse_graph(
        """
        net (float[1,3,4,4] x, bool c) => (float[1,4,4,4] y) {
            [c1] a = Conv (x, w1)
            y = If (c) <
                then_branch = t () => (float[1,4,4,4] ty) { ty = Identity (a) },
                else_branch = e () => (float[1,4,4,4] ey) { ey = Relu (a) }
            >
        }
        """
    )
    graph.initializer.append(onnx.numpy_helper.from_array(n(4, 3, 1, 1), "w1"))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    _, analysis = _analyze(proto)
    assert analysis.blocked == {_space(analysis, "c1"): "used inside a subgraph"}
