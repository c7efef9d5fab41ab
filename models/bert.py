"""A BERT-mini-shaped encoder classifier over int64 token ids and an attention mask."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["BertMini", "bert"]


class _Layer(nn.Module):
    """Post-norm BERT layer, written out (as Hugging Face's) so the export shows each op."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-12)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-12)

    def _split(self, x: Tensor) -> Tensor:
        n, length, width = x.shape
        return x.view(n, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        """``x`` (N, L, D); ``mask_bias`` (N, 1, 1, L): 0 to attend, -10000 to ignore."""
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask_bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class BertMini(nn.Module):
    """Token + position embeddings, post-norm encoder layers, a [CLS] pooler and classifier.

    Args:
        vocab_size: Number of token ids.
        max_len: Longest sequence the position embedding covers.
        d_model: Width of the encoder.
        heads: Attention heads per layer.
        layers: Encoder layers.
        num_classes: Size of the output.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        max_len: int = 128,
        d_model: int = 256,
        heads: int = 4,
        layers: int = 4,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.norm = nn.LayerNorm(d_model, eps=1e-12)
        self.layers = nn.ModuleList(_Layer(d_model, heads) for _ in range(layers))
        self.pooler = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Map token ids and a 0/1 mask (N, L; None: all ones) to logits (N, num_classes)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.embed(input_ids) + self.position(positions))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # The mask arithmetic onnxq must leave fp32: (1 - mask) * -10000 added to scores.
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def bert(seed: int = 0) -> BertMini:
    """Build the zoo's ``bert`` (BERT-mini shape) with seeded random weights, in eval mode."""
    return seeded(BertMini, seed)
