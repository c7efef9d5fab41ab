"""A small GPT-style decoder: causal self-attention blocks and a tied LM head over token ids."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["Decoder", "decoder"]


class _Block(nn.Module):
    """Pre-norm block: causal multi-head self-attention, then a GELU MLP, each residual."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        # (N, L, D) -> (N, heads, L, D / heads)
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads) + mask
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """Token + learned position embeddings, causal blocks, a final norm, a tied LM head.

    The head's weight *is* the token embedding (``lm_head.weight = embed.weight``), as in
    GPT-2: exported as ``Gather(E, ids)`` and ``MatMul(h, Transpose(E))``.

    Args:
        vocab_size: Number of token ids.
        max_len: Longest sequence the position embedding covers.
        d_model: Width of the blocks.
        heads: Attention heads per block.
        layers: Blocks.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        max_len: int = 256,
        d_model: int = 256,
        heads: int = 4,
        layers: int = 4,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        with torch.no_grad():  # GPT-2's init: logits of order 1, not of order sqrt(d)
            self.embed.weight.normal_(0.0, 0.02)
            self.position.weight.normal_(0.0, 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map token ids (N, L) to next-token logits (N, L, vocab_size)."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        # -inf above the diagonal: position i attends to positions <= i only.
        mask = torch.full((length, length), float("-inf"), device=tokens.device).triu(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.norm(x))


def decoder(seed: int = 0) -> Decoder:
    """Build the zoo's ``decoder`` with seeded random weights, in eval mode."""
    return seeded(Decoder, seed)
