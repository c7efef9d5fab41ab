"""A small conv-bn-relu CNN for 3x32x32 images."""

from __future__ import annotations

from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["ConvNet", "conv_bn_relu", "convnet"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Return a 3x3 Conv (no bias, BN supplies it) + BatchNorm + ReLU block."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """Three conv-bn-relu stages, each halving the resolution, then a linear classifier.

    Args:
        in_channels: Channels of the input image.
        num_classes: Size of the output.
        widths: Output channels of the three stages.

    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)
    ) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for width in widths:
            layers += [conv_bn_relu(cin, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        return self.fc(self.pool(self.features(x)).flatten(1))


def convnet(seed: int = 0) -> ConvNet:
    """Build the zoo's ``convnet`` with seeded random weights, in eval mode."""
    return seeded(ConvNet, seed)
