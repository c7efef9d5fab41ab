"""Small Torch models for tests, benchmarks and the demo."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from onnxq.errors import InputError
from onnxq.models.bert import bert
from onnxq.models.convnet import convnet
from onnxq.models.decoder import decoder
from onnxq.models.digits import digits
from onnxq.models.lstm import lstm
from onnxq.models.mobilenet import mobilenet
from onnxq.models.resnet import resnet
from onnxq.models.transformer import transformer

__all__ = ["EXPORTABLE", "LANGUAGE_MODELS", "ZOO", "ModelInfo", "get_model_info"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A zoo entry: how to build a model and what it takes as input.

    Attributes:
        name: The zoo name (what ``onnxq export NAME`` accepts).
        factory: Builds the model (seeded random weights, eval mode); takes ``seed=0``.
        input_shape: Default input shape, batch of 1 first.
        input_dtype: Element type of the input.
        description: One line saying what the model is.
        input_names: The model's inputs, each of ``input_shape`` and ``input_dtype``.
        sequence_axis: An input axis exported as a symbolic ``sequence`` dimension, or None.

    """

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    description: str
    input_names: tuple[str, ...] = ("input",)
    sequence_axis: int | None = None


_IMAGE = torch.float32
_TOKENS = torch.int64

ZOO: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("convnet", convnet, (1, 3, 32, 32), _IMAGE, "conv-bn-relu CNN, 3x32x32 images"),
        ModelInfo(
            "digits", digits, (1, 1, 8, 8), _IMAGE, "conv-bn-relu CNN for sklearn's 8x8 digits"
        ),
        ModelInfo("resnet", resnet, (1, 3, 224, 224), _IMAGE, "ResNet-10 style net, widths 16-128"),
        ModelInfo(
            "mobilenet",
            mobilenet,
            (1, 3, 224, 224),
            _IMAGE,
            "MobileNetV3 style net: depthwise convs, Hardswish, ReLU6, squeeze-excite",
        ),
        ModelInfo(
            "transformer",
            transformer,
            (1, 16),
            _TOKENS,
            "2-layer Transformer encoder classifier, d_model 64, 4 heads, int64 tokens",
        ),
        ModelInfo("lstm", lstm, (1, 16), _TOKENS, "embedding + LSTM + linear, int64 tokens"),
        ModelInfo(
            "bert",
            bert,
            (1, 128),
            _TOKENS,
            "BERT-mini shaped encoder classifier: 4 layers, d_model 256, 4 heads, int64 "
            "token ids + attention mask, dynamic batch and sequence (<= 128)",
            input_names=("input_ids", "attention_mask"),
            sequence_axis=1,
        ),
    )
}
"""The classifiers: one input, class scores ``(N, classes)`` out."""

LANGUAGE_MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "decoder",
            decoder,
            (1, 16),
            _TOKENS,
            "GPT-style decoder: 4 causal blocks, d_model 256, vocab 8192, tied LM head, "
            "next-token logits; dynamic batch and sequence (<= 256)",
            sequence_axis=1,
        ),
    )
}
"""Token models with next-token logits ``(N, L, vocab)`` out, for weight-only quantization."""

EXPORTABLE: dict[str, ModelInfo] = {**ZOO, **LANGUAGE_MODELS}
"""Every model ``onnxq export NAME`` knows."""


def get_model_info(name: str) -> ModelInfo:
    """Return the zoo entry called ``name``.

    Raises:
        InputError: No zoo model has that name.

    """
    try:
        return EXPORTABLE[name]
    except KeyError:
        raise InputError(
            f"unknown zoo model '{name}'; known models: {', '.join(sorted(EXPORTABLE))}"
        ) from None
