"""A small Transformer encoder classifier over int64 token ids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["TransformerClassifier", "transformer"]


class TransformerClassifier(nn.Module):
    """Token + learned position embeddings, a Transformer encoder, mean pooling, a classifier.

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
        vocab_size: int = 1000,
        max_len: int = 64,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        # Nested tensors only pay off with padding masks, and they do not export.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map token ids (N, L) to logits (N, num_classes)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        return self.fc(self.norm(self.encoder(x)).mean(dim=1))


def transformer(seed: int = 0) -> TransformerClassifier:
    """Build the zoo's ``transformer`` with seeded random weights, in eval mode."""
    return seeded(TransformerClassifier, seed)
