"""Models of the paper's experiments, built by name.

``wrn-DEPTH-WIDTH`` is the WideResNet of Zagoruyko & Komodakis (2016) for 32 x 32 inputs:
pre-activation basic blocks, (DEPTH - 4) / 6 blocks per stage, widths 16, 16k, 32k, 64k.
WRN-40-10 on CIFAR-100 has 55.9M parameters, the paper's Table 3.
"""

from __future__ import annotations

from torch import nn

__all__ = ["CifarResNet", "WideResNet", "build_model"]


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = nn.functional.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(nn.functional.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int = 40, width: int = 10, num_classes: int = 100, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6k + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, cout in enumerate(widths[1:]):
            for b in range(blocks):
                layers.append(_WideBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = nn.functional.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if (stride != 1 or cin != cout) else 0
        self.stride = stride

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad or self.stride != 1:
            # Option A of He et al. (2016): subsample, then zero-pad the new channels (no parameters).
            shortcut = nn.functional.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        return nn.functional.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6k+2) for 32 x 32 inputs (He et al. 2016, CIFAR): ResNet-20 has 0.27M parameters."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6k + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(_BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.layers(nn.functional.relu(self.bn(self.conv(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A model by name: ``resnet20``/``resnet32``/..., ``wrn-D-K`` or ``torchvision:NAME``."""
    if name.startswith("resnet") and name[6:].isdigit():
        return CifarResNet(int(name[6:]), num_classes)
    if name.startswith("wrn-"):
        _, depth, width = name.split("-")
        return WideResNet(int(depth), int(width), num_classes)
    if name.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; expected 'resnetDEPTH', 'wrn-DEPTH-WIDTH' or 'torchvision:NAME'")
