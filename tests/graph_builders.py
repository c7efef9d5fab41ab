"""Seeded ONNX graph builders shared by tests (import them; fixtures wrap them too)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx.parser

_HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'


def build_model(
    graph_text: str,
    weights: Mapping[str, np.ndarray] = (),
    *,
    opset: int = 17,
    check: bool = True,
) -> onnx.ModelProto:
    """Parses a graph in ONNX text syntax and adds ``weights`` as its initializers."""
    model = onnx.parser.parse_model(_HEADER.format(opset=opset) + graph_text)
    for name, array in dict(weights).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def seeded(seed: int) -> Callable[..., np.ndarray]:
    """Returns ``normal(*shape, scale=1.0)`` drawing float32 from a seeded generator."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    return normal


def bn_stats(channels: int, seed: int) -> dict[str, np.ndarray]:
    """Non-trivial BatchNormalization parameters: gamma, beta, mean and a positive var."""
    normal = seeded(seed)
    return {
        "gamma": normal(channels, scale=0.5, offset=1.0),
        "beta": normal(channels, scale=0.5),
        "mean": normal(channels, scale=0.5),
        "var": np.abs(normal(channels, scale=0.5)) + 0.5,
    }


# Six Conv(+Relu) layers. With ``outlier``, conv2 gets a channel stuck at 1000 that conv3
# ignores: the per-tensor range of r2 is then 300x too wide for its other channels.
CHAIN = """
net (float[N,4,8,8] x) => (float[N,4,8,8] y) {
    [conv0] c0 = Conv <pads = [1, 1, 1, 1]> (x, w0, b0)
    [relu0] r0 = Relu (c0)
    [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (r0, w1, b1)
    [relu1] r1 = Relu (c1)
    [conv2] c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
    [relu2] r2 = Relu (c2)
    [conv3] c3 = Conv <pads = [1, 1, 1, 1]> (r2, w3, b3)
    [relu3] r3 = Relu (c3)
    [conv4] c4 = Conv <pads = [1, 1, 1, 1]> (r3, w4, b4)
    [relu4] r4 = Relu (c4)
    [conv5] y = Conv <pads = [1, 1, 1, 1]> (r4, w5, b5)
}
"""


def chain_model(outlier: bool) -> onnx.ModelProto:
    """The six-conv chain (see ``CHAIN``), with shapes inferred."""
    normal = seeded(3)
    chans = [4, 8, 8, 8, 8, 8, 4]
    weights = {}
    for i in range(6):
        weights[f"w{i}"] = normal(chans[i + 1], chans[i], 3, 3, scale=(2 / (9 * chans[i])) ** 0.5)
        weights[f"b{i}"] = normal(chans[i + 1], scale=0.1)
    if outlier:
        weights["b2"][7] = 1000.0
        weights["w3"][:, 7] = 0.0
    return onnx.shape_inference.infer_shapes(build_model(CHAIN, weights))


# A DSP-like front end: values spanning six decades through one MatMul; no 8-bit grid fits.
WIDE_RANGE = """
wide (float[N,64] x) => (float[N,16] y) {
    [dft] y = MatMul (x, w)
}
"""


def wide_range_samples(count: int) -> np.ndarray:
    """Inputs for ``WIDE_RANGE``: magnitudes log-uniform over 1e-3 .. 1e3, random signs."""
    rng = np.random.default_rng(6)
    magnitude = 10.0 ** rng.uniform(-3, 3, (count, 64))
    return (magnitude * rng.choice([-1, 1], (count, 64))).astype(np.float32)


# Every int8 unit fuses in ONNX Runtime: conv+relu twice, int8 average pooling, and a
# QGemm head (float output, no Q needed after it).
FUSING_NET = """
net (float[N,4,8,8] x) => (float[N,10] y) {
    [c1] a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    [r1] b = Relu (a)
    [c2] c = Conv <pads = [1, 1, 1, 1]> (b, w2, b2)
    [r2] d = Relu (c)
    [gap] g = GlobalAveragePool (d)
    [flat] f = Flatten (g)
    [fc] y = Gemm <transB = 1> (f, wf, bf)
}
"""


def fusing_weights() -> dict[str, np.ndarray]:
    """Seeded weights of ``FUSING_NET``: convs ``w1 b1 w2 b2`` (4 -> 8 -> 8), head ``wf bf``."""
    normal = seeded(1)
    return {
        "w1": normal(8, 4, 3, 3, scale=0.3),
        "b1": normal(8, scale=0.1),
        "w2": normal(8, 8, 3, 3, scale=0.2),
        "b2": normal(8, scale=0.1),
        "wf": normal(10, 8, scale=0.5),
        "bf": normal(10, scale=0.1),
    }


def fusing_model() -> onnx.ModelProto:
    """``FUSING_NET`` with seeded weights (input ``x``: N x 4 x 8 x 8)."""
    return build_model(FUSING_NET, fusing_weights())


# A tied LM head: the embedding E feeds the Gather and, transposed, the last MatMul.
# q @ k is a MatMul of two activations.
TIED_LM = """
lm (int64[1,8] ids, float[1,8,256] k) => (float[1,8,512] logits, float[1,8,8] scores) {
    [embed] h = Gather <axis = 0> (emb, ids)
    [fc1] a = MatMul (h, w1)
    [act] r = Relu (a)
    [fc2] s = MatMul (r, w2)
    [kt_node] kt = Transpose <perm = [0, 2, 1]> (k)
    [qk] scores_raw = MatMul (s, kt)
    [scale] scores = Mul (scores_raw, half)
    [tr] et = Transpose <perm = [1, 0]> (emb)
    [head] logits = MatMul (r, et)
}
"""


def tied_lm_model(d: int = 256, vocab: int = 512) -> onnx.ModelProto:
    """A tied LM head (``TIED_LM``) with seeded weights: all three MatMul weights are large."""
    normal = seeded(0)
    weights = {
        "emb": normal(vocab, d, scale=0.5),
        "w1": normal(d, d, scale=1 / 16),
        "w2": normal(d, d, scale=1 / 16),
        "half": np.array(0.5, dtype=np.float32),
    }
    return build_model(TIED_LM, weights)


# A post-LN encoder block: the first residual Add reads the block input, which no int8 op
# produces, so QDQ insertion leaves it fp32 (Add -> LayerNormalization, which ONNX Runtime
# fuses into SkipLayerNormalization); the second adds two int8 MatMul + Relu outputs and
# is quantized (QLinearAdd, then DequantizeLinear -> LayerNormalization).
ENCODER = """
enc (float[N,8,16] x) => (float[N,8,16] y) {
    [proj] h = MatMul (x, w1)
    [residual] s = Add (x, h)
    [norm] n = LayerNormalization <axis = -1> (s, g, b)
    [ffn1] f1 = MatMul (n, w2)
    [act1] a1 = Relu (f1)
    [ffn2] f2 = MatMul (n, w3)
    [act2] a2 = Relu (f2)
    [residual2] s2 = Add (a1, a2)
    [norm2] n2 = LayerNormalization <axis = -1> (s2, g, b)
    [head] y = MatMul (n2, w4)
}
"""


def encoder_model() -> onnx.ModelProto:
    """``ENCODER`` with seeded weights (input ``x``: N x 8 x 16)."""
    normal = seeded(0)
    weights = {f"w{i}": normal(16, 16, scale=0.3) for i in range(1, 5)}
    return build_model(ENCODER, {**weights, "g": normal(16), "b": normal(16)})
