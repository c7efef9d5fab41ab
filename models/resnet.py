"""A small ResNet-10 style network (basic blocks with BN and residual adds)."""

from __future__ import annotations

from torch import Tensor, nn

from onnxq.models._build import seeded

__all__ = ["BasicBlock", "ResNet", "resnet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers plus a shortcut, added before the final ReLU.

    Args:
        cin: Input channels.
        cout: Output channels.
        stride: Stride of the first conv; when it or the width changes, the shortcut is
            a strided 1x1 conv + BN so the residual Add sees matching shapes.

    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, one basic block per stage, global average pool and a linear head.

    Args:
        num_classes: Size of the output.
        widths: Channels of the stages; every stage after the first halves the resolution.

    """

    def __init__(
        self, num_classes: int = 1000, widths: tuple[int, ...] = (16, 32, 64, 128)
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(cin, width, stride=1 if i == 0 else 2))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, 3, H, W) to logits (N, num_classes)."""
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def resnet(seed: int = 0) -> ResNet:
    """Build the zoo's ``resnet`` with seeded random weights, in eval mode."""
    return seeded(ResNet, seed)
