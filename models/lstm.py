"""A small LSTM classifier over int64 token ids."""

from __future__ import annotations

from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["LSTMClassifier", "lstm"]


class LSTMClassifier(nn.Module):
    """Embedding, a single-layer LSTM and a linear layer on the last hidden state.

    Args:
        vocab_size: Number of token ids.
        embed_dim: Width of the embedding.
        hidden: Width of the LSTM state.
        num_classes: Size of the output.

    """

    def __init__(
        self, vocab_size: int = 1000, embed_dim: int = 32, hidden: int = 64, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map token ids (N, L) to logits (N, num_classes)."""
        _, (h_n, _) = self.lstm(self.embed(tokens))
        return self.fc(h_n[-1])


def lstm(seed: int = 0) -> LSTMClassifier:
    """Build the zoo's ``lstm`` with seeded random weights, in eval mode."""
    return seeded(LSTMClassifier, seed)
