"""Seeded random small valid ONNX graphs, and a check of ``onnxq compile`` on one of them.

Shared by ``tests/test_fuzz_compile.py`` (a few dozen graphs in the normal suite) and
``benchmarks/fuzz_compile.py`` (a longer run).
"""

from __future__ import annotations

import dataclasses
import math
import re
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSETS = tuple(range(13, 20))

# The --no-quantize model must equal the input on ONNX Runtime up to this max-abs
# difference, relative to each output's range (max |reference|, at least 1): the default
# --tolerance of compile's exact passes. Not bitwise, because exact rewrites still change
# float rounding (BatchNormalization folded into Conv weights, Mul/Add constants folded,
# Gemm<->MatMul+Add, ONNX Runtime picking other kernels for the rewritten graph).
FP32_TOLERANCE = 1e-4

# Internal errors the CLI reports as one line: an exception the CLI caught (see
# onnxq.cli._group) or one a pass raised (onnxq.recording names the pass and the
# exception type). On a valid graph either is a bug, not a statement about the input.
_UNEXPECTED = re.compile(r"run with --debug for the traceback|pass \w+ failed: \w+:")


@dataclasses.dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # concrete, axis 0 = batch
    vocabulary: int | None = None  # int64 token ids in [0, vocabulary); float when None


class GraphBuilder:
    """Grows a random graph of float tensors whose shapes it tracks exactly."""

    def __init__(self, rng: np.random.Generator, opset: int, batch: int, dynamic: bool) -> None:
        self.rng, self.opset, self.batch, self.dynamic = rng, opset, batch, dynamic
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[_Tensor] = []
        self.live: list[_Tensor] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape: int, scale: float = 0.5) -> str:
        return self.const((scale * self.rng.standard_normal(shape)).astype(np.float32))

    def add_input(self) -> _Tensor:
        rng = self.rng
        kind = rng.choice(["image", "matrix", "sequence", "tokens"], p=[0.45, 0.2, 0.25, 0.1])
        if kind == "tokens":
            # Token ids into an embedding table, as a language model's input.
            length, vocabulary, width = (int(v) for v in rng.integers(2, 9, size=3))
            ids = _Tensor(f"in{len(self.inputs)}", (self.batch, length), vocabulary)
            self.inputs.append(ids)
            table = self.weight(vocabulary, width)
            return self.node("Gather", [table, ids.name], (self.batch, length, width), axis=0)
        if kind == "image":
            rest = (int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        elif kind == "matrix":
            rest = (int(rng.integers(1, 17)),)
        else:
            rest = (int(rng.integers(2, 6)), int(rng.integers(2, 9)))
        tensor = _Tensor(f"in{len(self.inputs)}", (self.batch, *rest))
        self.inputs.append(tensor)
        self.live.append(tensor)
        return tensor

    def node(self, op: str, inputs: Sequence[str], shape: tuple[int, ...], **attrs) -> _Tensor:
        return self.multi(op, inputs, [shape], **attrs)[0]

    def multi(
        self, op: str, inputs: Sequence[str], shapes: Sequence[tuple[int, ...]], **attrs
    ) -> list[_Tensor]:
        outs = [_Tensor(self.name(op.lower()), tuple(int(d) for d in s)) for s in shapes]
        self.nodes.append(
            helper.make_node(
                op, list(inputs), [o.name for o in outs], name=f"n_{outs[0].name}", **attrs
            )
        )
        self.live.extend(outs)
        return outs

    def pick(self, ranks: Sequence[int] | None = None) -> _Tensor | None:
        """A recent live tensor (favouring the newest: chains rather than fans)."""
        options = [t for t in self.live if ranks is None or len(t.shape) in ranks]
        if not options:
            return None
        weights = np.arange(1, len(options) + 1, dtype=float) ** 2
        return options[int(self.rng.choice(len(options), p=weights / weights.sum()))]

    # Each op returns the new tensor, or None when no live tensor fits it.

    def unary(self) -> _Tensor | None:
        x = self.pick()
        op = str(self.rng.choice(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Abs", "Neg"]))
        return self.node(op, [x.name], x.shape)

    def clip(self) -> _Tensor | None:
        x = self.pick()
        lo = float(self.rng.uniform(-1, 0))
        bounds = [self.const(np.array(lo, np.float32), "lo")]
        if self.rng.random() < 0.8:
            bounds.append(self.const(np.array(lo + float(self.rng.uniform(0.5, 6)), np.float32)))
        return self.node("Clip", [x.name, *bounds], x.shape)

    def binary(self) -> _Tensor | None:
        x = self.pick()
        op = str(self.rng.choice(["Add", "Mul", "Sub"]))
        same = [t for t in self.live if t.shape == x.shape and t is not x]
        if same and self.rng.random() < 0.5:
            other = same[int(self.rng.integers(len(same)))].name
        elif len(x.shape) == 4 and self.rng.random() < 0.6:
            other = self.weight(x.shape[1], 1, 1)  # per channel, as after a conv
        else:
            other = self.weight(*x.shape[-1:])
        return self.node(op, [x.name, other], x.shape)

    def conv(self) -> _Tensor | None:
        x = self.pick([4])
        if x is None:
            return None
        rng = self.rng
        _, c, h, w = x.shape
        k = int(rng.choice([1, 3])) if min(h, w) >= 3 else 1
        stride = int(rng.choice([1, 1, 2]))
        pad = int(rng.integers(0, k // 2 + 1))
        group = c if c > 1 and rng.random() < 0.2 else 1
        m = group * int(rng.integers(1, 4)) if group > 1 else int(rng.integers(1, 7))
        ho, wo = ((d + 2 * pad - k) // stride + 1 for d in (h, w))
        inputs = [x.name, self.weight(m, c // group, k, k)]
        if rng.random() < 0.7:
            inputs.append(self.weight(m, scale=0.1))
        return self.node(
            "Conv",
            inputs,
            (x.shape[0], m, ho, wo),
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=group,
        )

    def batchnorm(self) -> _Tensor | None:
        x = self.pick([4])
        if x is None:
            return None
        c = x.shape[1]
        stats = [
            self.const(self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
            self.weight(c, scale=0.1),
            self.weight(c, scale=0.1),
            self.const(self.rng.uniform(0.5, 2.0, c).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x.name, *stats], x.shape, epsilon=1e-3)

    def pool(self) -> _Tensor | None:
        x = self.pick([4])
        if x is None:
            return None
        n, c, h, w = x.shape
        if min(h, w) < 2 or self.rng.random() < 0.3:
            op = str(self.rng.choice(["GlobalAveragePool", "GlobalMaxPool"]))
            return self.node(op, [x.name], (n, c, 1, 1))
        op = str(self.rng.choice(["MaxPool", "AveragePool"]))
        return self.node(op, [x.name], (n, c, h // 2, w // 2), kernel_shape=[2, 2], strides=[2, 2])

    def matmul(self) -> _Tensor | None:
        x = self.pick([2, 3, 4])
        if x is None:
            return None
        k = int(self.rng.integers(1, 9))
        w = self.weight(x.shape[-1], k)
        y = self.node("MatMul", [x.name, w], (*x.shape[:-1], k))
        if self.rng.random() < 0.5:
            y = self.node("Add", [y.name, self.weight(k, scale=0.1)], y.shape)
        return y

    def gemm(self) -> _Tensor | None:
        x = self.pick([2])
        if x is None:
            return None
        k, trans = int(self.rng.integers(1, 9)), int(self.rng.integers(0, 2))
        f = x.shape[1]
        inputs = [x.name, self.weight(*((k, f) if trans else (f, k)))]
        if self.rng.random() < 0.7:
            inputs.append(self.weight(k, scale=0.1))
        return self.node("Gemm", inputs, (x.shape[0], k), transB=trans)

    def transpose(self) -> _Tensor | None:
        x = self.pick([3, 4])
        if x is None:
            return None
        perm = [0, *(1 + self.rng.permutation(len(x.shape) - 1))]
        return self.node("Transpose", [x.name], tuple(x.shape[p] for p in perm), perm=perm)

    def concat(self) -> _Tensor | None:
        x = self.pick([2, 3, 4])
        if x is None:
            return None
        axis = int(self.rng.integers(1, len(x.shape)))
        others = [d for i, d in enumerate(x.shape) if i != axis]
        fits = [
            t
            for t in self.live
            if len(t.shape) == len(x.shape)
            and [d for i, d in enumerate(t.shape) if i != axis] == others
        ]
        y = fits[int(self.rng.integers(len(fits)))]
        shape = list(x.shape)
        shape[axis] += y.shape[axis]
        return self.node("Concat", [x.name, y.name], tuple(shape), axis=axis)

    def reshape(self) -> _Tensor | None:
        x = self.pick([2, 3, 4])
        if x is None:
            return None
        size = math.prod(x.shape[1:])
        if len(x.shape) > 2 and self.rng.random() < 0.5:
            # Batch axis copied (0), the rest flattened (-1).
            target, shape = [0, -1], (x.shape[0], size)
        else:
            split = [d for d in range(2, size) if size % d == 0]
            if not split:
                return self.node("Flatten", [x.name], (x.shape[0], size), axis=1)
            d = int(self.rng.choice(split))
            target, shape = [0, d, size // d], (x.shape[0], d, size // d)
            if self.rng.random() < 0.3 and size // d > 1:
                # Spatial again: a channel axis of 1, as a model reshaping to NCHW.
                target, shape = [0, 1, d, size // d], (x.shape[0], 1, d, size // d)
        target_name = self.const(np.array(target, np.int64), "shape")
        return self.node("Reshape", [x.name, target_name], shape)

    def dynamic_reshape(self) -> _Tensor | None:
        """Flatten by a shape computed in the graph (Shape, Gather, Concat), as exporters do."""
        x = self.pick([3, 4])
        if x is None:
            return None
        shape = self.node("Shape", [x.name], (len(x.shape),))
        self.live.remove(shape)  # an int64 tensor: not for the float ops
        index = self.const(np.array([0], np.int64), "i")
        batch = self.node("Gather", [shape.name, index], (1,), axis=0)
        self.live.remove(batch)
        rest = self.const(np.array([-1], np.int64), "rest")
        target = self.node("Concat", [batch.name, rest], (2,), axis=0)
        self.live.remove(target)
        return self.node("Reshape", [x.name, target.name], (x.shape[0], math.prod(x.shape[1:])))

    def _cut(self) -> tuple[_Tensor, int, int] | None:
        """A live tensor, one of its non-batch axes of at least 2 entries, and that size."""
        x = self.pick([2, 3, 4])
        if x is None:
            return None
        axis = int(self.rng.integers(1, len(x.shape)))
        size = x.shape[axis]
        return None if size < 2 else (x, axis, size)

    def slice(self) -> _Tensor | None:
        cut = self._cut()
        if cut is None:
            return None
        x, axis, size = cut
        start = int(self.rng.integers(0, size - 1))
        end = int(self.rng.integers(start + 1, size + 1))
        step = int(self.rng.choice([1, 1, 2]))
        inputs = [x.name] + [
            self.const(np.array([v], np.int64), "s") for v in (start, end, axis, step)
        ]
        shape = list(x.shape)
        shape[axis] = len(range(start, end, step))
        return self.node("Slice", inputs, tuple(shape))

    def split(self) -> _Tensor | None:
        cut = self._cut()
        if cut is None:
            return None
        x, axis, size = cut
        first = int(self.rng.integers(1, size))
        parts = self.const(np.array([first, size - first], np.int64), "split")
        shapes = [list(x.shape), list(x.shape)]
        shapes[0][axis], shapes[1][axis] = first, size - first
        return self.multi("Split", [x.name, parts], [tuple(p) for p in shapes], axis=axis)[-1]

    def unsqueeze(self) -> _Tensor | None:
        """Unsqueeze then Squeeze back (axes are inputs from opset 13)."""
        x = self.pick([2, 3])
        if x is None:
            return None
        axis = int(self.rng.integers(1, len(x.shape) + 1))
        axes = self.const(np.array([axis], np.int64), "axes")
        shape = (*x.shape[:axis], 1, *x.shape[axis:])
        y = self.node("Unsqueeze", [x.name, axes], shape)
        if self.rng.random() < 0.5:
            return y
        return self.node("Squeeze", [y.name, axes], x.shape)

    def pad(self) -> _Tensor | None:
        x = self.pick([4])
        if x is None:
            return None
        p = [0, 0, int(self.rng.integers(0, 2)), int(self.rng.integers(0, 2))] * 2
        pads = self.const(np.array(p, np.int64), "pads")
        shape = tuple(d + p[i] + p[i + 4] for i, d in enumerate(x.shape))
        mode = str(self.rng.choice(["constant", "reflect", "edge"]))
        if mode == "reflect" and min(x.shape[2:]) < 2:
            mode = "constant"
        return self.node("Pad", [x.name, pads], shape, mode=mode)

    def self_matmul(self) -> _Tensor | None:
        """x @ x^T over the last two axes, as attention scores: two activations multiplied."""
        x = self.pick([3])
        if x is None:
            return None
        n, s, f = x.shape
        xt = self.node("Transpose", [x.name], (n, f, s), perm=[0, 2, 1])
        return self.node("MatMul", [x.name, xt.name], (n, s, s))

    def layer_norm(self) -> _Tensor | None:
        x = self.pick([2, 3])
        if x is None or self.opset < 17:
            return None
        f = x.shape[-1]
        scale = self.const(self.rng.uniform(0.5, 1.5, f).astype(np.float32))
        return self.node("LayerNormalization", [x.name, scale, self.weight(f)], x.shape, axis=-1)

    def conv_transpose(self) -> _Tensor | None:
        x = self.pick([4])
        if x is None or max(x.shape[2:]) > 8:
            return None
        n, c, h, w = x.shape
        m = int(self.rng.integers(1, 5))
        return self.node(
            "ConvTranspose",
            [x.name, self.weight(c, m, 2, 2), self.weight(m, scale=0.1)],
            (n, m, 2 * h, 2 * w),
            kernel_shape=[2, 2],
            strides=[2, 2],
        )

    def resize(self) -> _Tensor | None:
        x = self.pick([4])
        if x is None or max(x.shape[2:]) > 8:
            return None
        n, c, h, w = x.shape
        scales = self.const(np.array([1, 1, 2, 2], np.float32), "scales")
        mode = str(self.rng.choice(["nearest", "linear"]))
        return self.node("Resize", [x.name, "", scales], (n, c, 2 * h, 2 * w), mode=mode)

    def softmax(self) -> _Tensor | None:
        x = self.pick()
        return self.node("Softmax", [x.name], x.shape, axis=-1)

    def reduce_mean(self) -> _Tensor | None:
        x = self.pick([3, 4])
        if x is None:
            return None
        axis = int(self.rng.integers(1, len(x.shape)))
        shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape))
        if self.opset >= 18:
            axes = self.const(np.array([axis], np.int64), "axes")
            return self.node("ReduceMean", [x.name, axes], shape, keepdims=1)
        return self.node("ReduceMean", [x.name], shape, axes=[axis], keepdims=1)


_OPS: dict[str, tuple[float, Callable[[GraphBuilder], _Tensor | None]]] = {
    "conv": (4, GraphBuilder.conv),
    "unary": (3, GraphBuilder.unary),
    "clip": (1, GraphBuilder.clip),
    "binary": (2, GraphBuilder.binary),
    "batchnorm": (1, GraphBuilder.batchnorm),
    "pool": (1, GraphBuilder.pool),
    "matmul": (2, GraphBuilder.matmul),
    "gemm": (2, GraphBuilder.gemm),
    "transpose": (1, GraphBuilder.transpose),
    "concat": (1, GraphBuilder.concat),
    "reshape": (1.5, GraphBuilder.reshape),
    "softmax": (0.7, GraphBuilder.softmax),
    "reduce_mean": (0.5, GraphBuilder.reduce_mean),
    "dynamic_reshape": (0.5, GraphBuilder.dynamic_reshape),
    "slice": (0.7, GraphBuilder.slice),
    "split": (0.5, GraphBuilder.split),
    "unsqueeze": (0.5, GraphBuilder.unsqueeze),
    "pad": (0.5, GraphBuilder.pad),
    "self_matmul": (0.5, GraphBuilder.self_matmul),
    "layer_norm": (0.6, GraphBuilder.layer_norm),
    "conv_transpose": (0.4, GraphBuilder.conv_transpose),
    "resize": (0.4, GraphBuilder.resize),
}


# What real exporters also write, each drawn with this probability: a graph input that is
# also an output, an input nothing reads, an initializer as an output, initializers listed
# as graph inputs (overridable defaults, as IR < 4 required), nodes without names,
# inferred value_info, and dynamic H/W (then the outputs' dims are symbolic).
_QUIRKS = {
    "passthrough": 0.08,
    "unused-input": 0.08,
    "constant-output": 0.08,
    "initializer-inputs": 0.12,
    "unnamed-nodes": 0.25,
    "value-info": 0.4,
    "dynamic-spatial": 0.15,
}


@dataclasses.dataclass
class FuzzCase:
    """One generated model and its calibration data.

    Attributes:
        seed: The seed it was made from (regenerates it).
        model: The model.
        data: Calibration samples keyed by input name, as ``compile`` reads them.
        description: Opset, batch and op types, for failure messages.
    """

    seed: int
    model: onnx.ModelProto
    data: dict[str, np.ndarray]
    description: str


def random_case(seed: int) -> FuzzCase:
    """A random valid model (checked by ONNX's full checker) and data for it."""
    rng = np.random.default_rng(seed)
    opset = int(rng.choice(OPSETS))
    dynamic = bool(rng.random() < 0.5)
    batch = 2 if dynamic else int(rng.choice([1, 2]))
    g = GraphBuilder(rng, opset, batch, dynamic)
    for _ in range(int(rng.choice([1, 1, 2]))):
        g.add_input()
    names = list(_OPS)
    weights = np.array([_OPS[n][0] for n in names])
    for _ in range(int(rng.integers(2, 13))):
        op = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        _OPS[op][1](g)
    # Every input feeds the graph: join a second input's branch into the main one.
    used = {i for node in g.nodes for i in node.input}
    for tensor in g.inputs:
        if tensor.name not in used:
            g.node("Relu", [tensor.name], tensor.shape)
    outputs = _outputs(g)
    quirks = [q for q, p in _QUIRKS.items() if rng.random() < p]
    if "passthrough" in quirks:
        outputs.append(g.inputs[0])
    batch_dim: int | str = "N" if dynamic else batch

    spatial = "dynamic-spatial" in quirks

    def info(t: _Tensor, output: bool = False) -> onnx.ValueInfoProto:
        dims: list | None = [batch_dim, *t.shape[1:]]
        if spatial and output:
            dims = [batch_dim, *(f"{t.name}_{i}" for i in range(1, len(t.shape)))]
        elif spatial and len(t.shape) == 4:
            dims = [batch_dim, t.shape[1], "H", "W"]
        dtype = TensorProto.INT64 if t.vocabulary else TensorProto.FLOAT
        return helper.make_tensor_value_info(t.name, dtype, dims)

    if "unused-input" in quirks:
        g.inputs.append(_Tensor("unused", (batch, 3)))
    inputs = [info(t) for t in g.inputs]
    graph_outputs = [info(t, output=True) for t in outputs]
    if "constant-output" in quirks:
        constant = g.weight(2, 3)
        graph_outputs.append(helper.make_tensor_value_info(constant, TensorProto.FLOAT, [2, 3]))
    if "initializer-inputs" in quirks:
        inputs += [
            helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in g.inits
        ]
    if "unnamed-nodes" in quirks:
        for node in g.nodes:
            node.name = ""
    graph = helper.make_graph(g.nodes, f"fuzz{seed}", inputs, graph_outputs, g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=8 if opset <= 17 else 9,
        producer_name="onnxq-fuzz",
    )
    if "value-info" in quirks:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    # Dynamic batch: one sample per row; static batch B: every B rows are one sample.
    rows = 6 if dynamic else 4 * batch
    data = {
        t.name: (
            rng.integers(0, t.vocabulary, (rows, *t.shape[1:]))
            if t.vocabulary
            else rng.standard_normal((rows, *t.shape[1:])).astype(np.float32)
        )
        for t in g.inputs
    }
    ops = ",".join(n.op_type for n in g.nodes)
    description = f"seed {seed}: opset {opset}, batch {batch_dim}, ops {ops}" + (
        f", {', '.join(quirks)}" if quirks else ""
    )
    return FuzzCase(seed, model, data, description)


def _outputs(g: GraphBuilder) -> list[_Tensor]:
    """The last tensor, and every other tensor nothing reads (dangling branches)."""
    read = {i for node in g.nodes for i in node.input}
    inputs = {t.name for t in g.inputs}
    ends = [t for t in g.live if t.name not in read and t.name not in inputs]
    if g.rng.random() < 0.2 and len(g.live) > len(g.inputs) + 1:
        # A tensor that is both read and an output.
        middle = g.live[len(g.inputs) : -1]
        extra = middle[int(g.rng.integers(len(middle)))]
        if extra not in ends:
            ends.insert(0, extra)
    return ends


def invoke_cli(args: list[str]) -> tuple[int, str, str]:
    """Runs ``onnxq ARGS`` in-process; returns the exit code, stdout and stderr.

    An exception that escaped the CLI is appended to stderr as the traceback the user
    would have seen.
    """
    from click.testing import CliRunner

    from onnxq.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stdout, stderr


def run_model(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list:
    """Runs a model on ONNX Runtime's CPU provider (no graph optimisations: the reference)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # initializers listed as inputs warn on every load
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def first_feeds(case: FuzzCase) -> dict[str, np.ndarray]:
    """The first run's worth of samples: the batch of a static model, 3 rows otherwise."""
    dims = case.model.graph.input[0].type.tensor_type.shape.dim
    rows = dims[0].dim_value or 3
    return {name: array[:rows] for name, array in case.data.items()}


@dataclasses.dataclass
class Outcome:
    """What one ``compile`` of a case did; ``problems`` empty means it behaved."""

    mode: str
    exit_code: int
    problems: list[str]
    message: str = ""
    quantized: bool = False


def check_compile(
    case: FuzzCase,
    folder: Path,
    invoke: Callable[[list[str]], tuple[int, str, str]],
    quantize: bool,
    latency: bool = False,
) -> Outcome:
    """Compiles the case with ``invoke`` (args -> exit code, stdout, stderr) and checks it.

    ``latency`` keeps compile's latency step, which times the model (seconds per case).

    The contract: exit 0, 1 or 2; an error is one ``error:`` line and never an internal
    error; a written model loads and runs on ONNX Runtime; ``--no-quantize`` outputs equal
    the input's within `FP32_TOLERANCE`; int8 outputs are finite.
    """
    folder.mkdir(parents=True, exist_ok=True)
    source, calib = folder / "model.onnx", folder / "calib.npz"
    onnx.save(case.model, source)
    np.savez(calib, **case.data)
    mode = "int8" if quantize else "fp32"
    out = folder / f"out_{mode}.onnx"
    args = ["compile", str(source), "-o", str(out), "--calibration-data", str(calib)]
    args += [] if quantize else ["--no-quantize"]
    if quantize:
        # Settings drawn apart from the graph's stream, so a seed's graph never changes.
        pick = np.random.default_rng([case.seed, 1]).choice
        args += ["--method", str(pick(["minmax", "minmax", "percentile", "entropy", "mse"]))]
        args += ["--target", str(pick(["auto", "avx2", "vnni", "arm"]))]
        args += ["--batch-size", str(pick([1, 2, 16]))]
    # A short accuracy search keeps a case to seconds.
    args += ["--tune-budget", "2"] + ([] if latency else ["--no-latency-check"])
    code, stdout, stderr = invoke(args)
    problems = []
    text = stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if code not in (0, 1, 2):
        problems.append(f"exit code {code}")
    if "Traceback" in text or _UNEXPECTED.search(text):
        problems.append("internal error: " + (errors[0] if errors else text[-300:]))
    if code != 0 and len(errors) != 1:
        problems.append(f"exit {code} without exactly one error line: {stderr[-300:]!r}")
    if code == 0:
        problems += _check_output(case, out, quantize)
    elif out.exists():
        problems.append(f"exit {code} but {out.name} was written")
    message = errors[0] if errors else ""
    quantized = code == 0 and out.exists() and _has_qdq(out)
    return Outcome(mode, code, problems, message, quantized)


def _has_qdq(path: Path) -> bool:
    """Whether the written model holds int8 (QuantizeLinear) or is fp32."""
    model = onnx.load(path, load_external_data=False)
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def _check_output(case: FuzzCase, out: Path, quantize: bool) -> list[str]:
    if not out.exists():
        return ["exit 0 but no output written"]
    feeds = first_feeds(case)
    try:
        got = run_model(out, feeds)
    except Exception as e:  # the check's purpose: any failure to load or run is a finding
        return [f"output does not run on ONNX Runtime: {type(e).__name__}: {_first_line(e)}"]
    expected = run_model(case.model, feeds)
    names = [o.name for o in case.model.graph.output]
    written = [o.name for o in onnx.load(out, load_external_data=False).graph.output]
    if written != names:
        return [f"outputs {written} differ from the input's {names}"]
    problems = []
    for name, ref, value in zip(names, expected, got, strict=True):
        if ref.shape != value.shape:
            problems.append(f"output {name}: shape {value.shape}, input gives {ref.shape}")
        elif not np.isfinite(value).all():
            problems.append(f"output {name} is not finite")
        elif not quantize:
            scale = max(float(np.abs(ref).max(initial=0.0)), 1.0)
            diff = float(np.abs(ref.astype(np.float64) - value).max(initial=0.0)) / scale
            if diff > FP32_TOLERANCE:
                problems.append(f"output {name}: fp32 differs by {diff:.2e} (relative)")
    return problems


def _first_line(error: Exception) -> str:
    return re.sub(r"\s+", " ", str(error))[:300]
