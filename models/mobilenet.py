"""A small MobileNetV3 style network: depthwise-separable blocks, Hardswish, ReLU6, SE."""

from __future__ import annotations

from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["InvertedResidual", "MobileNet", "SqueezeExcite", "mobilenet"]

# (expanded channels, output channels, stride, activation, squeeze-excite) per block.
_BLOCKS: tuple[tuple[int, int, int, type[nn.Module], bool], ...] = (
    (16, 16, 2, nn.ReLU6, True),
    (48, 24, 2, nn.ReLU6, False),
    (72, 24, 1, nn.ReLU6, False),
    (96, 40, 2, nn.Hardswish, True),
    (120, 40, 1, nn.Hardswish, True),
    (160, 48, 2, nn.Hardswish, True),
)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class SqueezeExcite(nn.Module):
    """Channel attention: pool, reduce, ReLU, expand, Hardsigmoid, scale the input.

    Args:
        channels: Channels of the input.
        reduction: Factor by which the hidden layer is narrower.

    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel of ``x`` by its learned gate."""
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), optional SE, project (1x1); residual when shapes allow.

    Args:
        cin: Input channels.
        expanded: Channels after the 1x1 expansion.
        cout: Output channels.
        stride: Stride of the depthwise conv.
        act: Activation class after the expansion and depthwise convs.
        se: Whether to add squeeze-excite after the depthwise conv.

    """

    def __init__(
        self, cin: int, expanded: int, cout: int, stride: int, act: type[nn.Module], se: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers += [*_conv_bn(cin, expanded, 1, 1), act()]
        layers += [*_conv_bn(expanded, expanded, 3, stride, groups=expanded), act()]
        if se:
            layers.append(SqueezeExcite(expanded))
        layers += _conv_bn(expanded, cout, 1, 1)
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileNet(nn.Module):
    """Stem, inverted residual blocks, 1x1 conv, global average pool and a two-layer head.

    Args:
        num_classes: Size of the output.
        se: Whether blocks marked for it get squeeze-excite.

    """

    def __init__(self, num_classes: int = 1000, se: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, 16, 3, 2), nn.Hardswish()]
        cin = 16
        for expanded, cout, stride, act, use_se in _BLOCKS:
            layers.append(InvertedResidual(cin, expanded, cout, stride, act, se and use_se))
            cin = cout
        layers += [*_conv_bn(cin, 288, 1, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(288, 512), nn.Hardswish(), nn.Linear(512, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, 3, H, W) to logits (N, num_classes)."""
        return self.head(self.pool(self.features(x)).flatten(1))


def mobilenet(seed: int = 0, se: bool = True) -> MobileNet:
    """Build the zoo's ``mobilenet`` with seeded random weights, in eval mode."""
    return seeded(lambda: MobileNet(se=se), seed)
