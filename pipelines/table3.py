"""The CIFAR-100 networks of the paper's Table 3 that :mod:`pipelines.models` does not define itself.

Li et al., "Low Dimensional Trajectory Hypothesis is True: DNNs can be Trained in Tiny Subspaces"
(TPAMI 2022), Table 3, trains eleven CIFAR-100 models in 40-D subspaces. Their code
(github.com/nblt/DLDR, ``models/``) takes the networks from the pytorch-cifar100 collection
(github.com/weiaicunzai/pytorch-cifar100); the classes below follow those definitions (widths,
block counts, which convolutions carry a bias) so that a store of one of them has the paper's
``n``. Each takes ``num_classes`` (default 100) and ``in_channels`` (default 3) and expects
32 x 32 images (VGG's classifier reads the 1 x 1 map that five poolings leave of them).

=============  ============  ==========  =======  ====
name           class         parameters  Table 3  note
=============  ============  ==========  =======  ====
vgg11_bn       VGG11BN       28,518,244  28.5M
mobilenet      MobileNet      3,315,428  3.3M
densenet121    DenseNet121    7,048,548  7.0M
xception       Xception      21,013,988  21.0M
googlenet      GoogLeNet      6,402,564  6.2M     1
shufflenetv2   ShuffleNetV2   1,360,896  1.3M     2
squeezenet     SqueezeNet       781,156  0.78M
seresnet18     SEResNet18    11,314,012  11.4M    3
nasnet         NASNet         4,334,056  5.2M     4
=============  ============  ==========  =======  ====

``inception-v4`` (41,296,516, 41.3M) and ``wrn-40-10`` (55,899,444, 55.9M) live in
:mod:`pipelines.models`. Table 3's column is the pytorch-cifar100 README's, written from earlier
versions of its code and cut (not rounded) to one decimal in places; the counts here are those of
the code the paper ran (the DLDR repository), except (4):

1. The README's 6.2M is the 2018 GoogLeNet with a one-convolution stem (6,258,500); the DLDR
   copy has the later three-convolution stem (64, 64, 192 channels), 6,402,564.
2. 1,360,896 is what every version of that ShuffleNet V2 has; the README truncates it to 1.3M.
3. The README's 11.4M is an SE-ResNet-18 whose last stage had 516 channels (11,436,256), a bug
   fixed before the DLDR copy was taken; 512 channels give 11,314,012.
4. The reference NASNet gives every cell's input adapter all three of its alternatives (a
   factorized reduction, a 1 x 1 projection, the identity) and uses one; the 887,568 parameters
   of the unused ones never receive a gradient (5,221,624 in all, Table 3's 5.2M). Here each cell
   builds only the adapter it uses: the same function and gradients, 4,334,056 parameters that
   all train, and a model ``DistributedDataParallel`` accepts.

Behaviour the reference has by accident is not copied: its Xception blocks apply an in-place ReLU
to the block's input before the shortcut reads it (here the shortcut sees the input), and one
GoogLeNet BatchNorm per module takes its channel count as ``eps`` (here the default 1e-5).
Checked once against the reference code (not part of the tests, which cannot reach it): the
parameters and buffers come in the reference's ``state_dict`` order and shapes (NASNet's less the
unused ones), and with the reference's values loaded each model gives the reference's eval-mode
outputs exactly (Xception and GoogLeNet once those two accidents are taken out of the reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["TABLE3", "DenseNet121", "GoogLeNet", "MobileNet", "NASNet", "SEResNet18", "ShuffleNetV2",
           "SqueezeNet", "VGG11BN", "Xception"]


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, *, bias: bool = False, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    """``kernel`` x ``kernel`` convolution with "same" padding (halving the size at stride 2),
    BatchNorm, and ReLU when ``relu``."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _separable(cin: int, cout: int, kernel: int, stride: int = 1, *, depthwise_bias: bool,
               pointwise_bias: bool) -> nn.Sequential:
    """Depthwise ``kernel`` x ``kernel`` convolution, then a 1 x 1 one (no BatchNorm between)."""
    return nn.Sequential(nn.Conv2d(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=depthwise_bias),
                         nn.Conv2d(cin, cout, 1, bias=pointwise_bias))


def _classify(features: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    return fc(nn.functional.adaptive_avg_pool2d(features, 1).flatten(1))


# ------------------------------------------------------------------------------------------ VGG


class VGG11BN(nn.Module):
    """VGG-11 with BatchNorm (Simonyan & Zisserman 2015, configuration A): eight 3 x 3
    convolutions (64, 128, 256, 256, 512 x 4) with bias, BatchNorm and ReLU, five 2 x 2 max
    pools (32 x 32 -> 1 x 1), then 512 -> 4096 -> 4096 -> classes with dropout 0.5.
    28,518,244 parameters for 100 classes (Table 3: 28.5M)."""

    WIDTHS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width in self.WIDTHS:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(_conv_bn(cin, int(width), bias=True))
            cin = int(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ------------------------------------------------------------------------------------ MobileNet


class MobileNet(nn.Module):
    """MobileNet v1, width 1 (Howard et al. 2017): a 3 x 3 convolution to 32 channels, then 13
    depthwise-separable blocks (depthwise 3 x 3 + BN + ReLU, pointwise 1 x 1 with bias + BN +
    ReLU) widening to 1024, four of them at stride 2 (32 x 32 -> 2 x 2), average pooling, linear.
    3,315,428 parameters for 100 classes (Table 3: 3.3M)."""

    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32)]
        cin = 32
        for cout, stride in self.BLOCKS:
            layers += [_conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, cout, 1, bias=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.features(x), self.fc)


# ------------------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """BN-ReLU-conv 1 x 1 (4k) -BN-ReLU-conv 3 x 3 (k), its output appended to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet121(nn.Module):
    """DenseNet-BC-121 (Huang et al. 2017): growth rate k = 32, dense blocks of 6, 12, 24 and 16
    bottleneck layers, transitions (BN, 1 x 1 convolution to half the channels, 2 x 2 average
    pool) between them, a 3 x 3 stem to 2k channels at full resolution, then BN, ReLU, average
    pooling, linear. 7,048,548 parameters for 100 classes (Table 3: 7.0M)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3, growth: int = 32,
                 blocks: Sequence[int] = (6, 12, 24, 16)) -> None:
        super().__init__()
        cin = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cin, 3, padding=1, bias=False)]
        for i, count in enumerate(blocks):
            for _ in range(count):
                layers.append(_DenseLayer(cin, growth))
                cin += growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(cin), nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)]
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.features(x), self.fc)


# ------------------------------------------------------------------------------------- Xception


class _XceptionBlock(nn.Module):
    """[ReLU, separable 3 x 3, BN] from each width to the next (the first ReLU left out when
    ``relu_first`` is False), a 3 x 3 max pool at ``stride`` when ``pool``, plus the input, through
    a 1 x 1 convolution (with bias) and BN when the shape changes."""

    def __init__(self, widths: Sequence[int], stride: int = 1, *, relu_first: bool = True, pool: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            if i or relu_first:
                layers.append(nn.ReLU())  # not in place: the shortcut reads the block's input
            layers += [_separable(cin, cout, 3, depthwise_bias=False, pointwise_bias=False), nn.BatchNorm2d(cout)]
        if pool:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.residual = nn.Sequential(*layers)
        cin, cout = widths[0], widths[-1]
        self.shortcut = (nn.Identity() if cin == cout and stride == 1 else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class Xception(nn.Module):
    """Xception (Chollet 2017) for 32 x 32 inputs: two full-resolution 3 x 3 convolutions (32,
    64 channels); entry flow of three residual blocks of separable convolutions to 128, 256 and
    728 channels (the first two halve the size, the third does not); middle flow of 8 blocks of
    three 728-channel separable convolutions; exit flow to 1024 channels (halving), separable
    convolutions to 1536 and 2048, average pooling, linear.
    21,013,988 parameters for 100 classes (Table 3: 21.0M)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        sep = _separable
        self.features = nn.Sequential(
            _conv_bn(in_channels, 32), _conv_bn(32, 64),
            _XceptionBlock((64, 128, 128), 2, relu_first=False), _XceptionBlock((128, 256, 256), 2),
            _XceptionBlock((256, 728, 728), 1),
            *[_XceptionBlock((728, 728, 728, 728), pool=False) for _ in range(8)],
            _XceptionBlock((728, 728, 1024), 2),
            sep(1024, 1536, 3, depthwise_bias=False, pointwise_bias=False), nn.BatchNorm2d(1536), nn.ReLU(inplace=True),
            sep(1536, 2048, 3, depthwise_bias=False, pointwise_bias=False), nn.BatchNorm2d(2048), nn.ReLU(inplace=True))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.features(x), self.fc)


# ------------------------------------------------------------------------------------ GoogLeNet


class _Inception(nn.Module):
    """Four branches, concatenated: 1 x 1; 1 x 1 -> 3 x 3; 1 x 1 -> 3 x 3 -> 3 x 3 (the 5 x 5 of
    the paper as two 3 x 3); 3 x 3 max pool -> 1 x 1. Every convolution has a bias, BN and ReLU."""

    def __init__(self, cin: int, n1: int, r3: int, n3: int, r5: int, n5: int, pool: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([
            _conv_bn(cin, n1, 1, bias=True),
            nn.Sequential(_conv_bn(cin, r3, 1, bias=True), _conv_bn(r3, n3, bias=True)),
            nn.Sequential(_conv_bn(cin, r5, 1, bias=True), _conv_bn(r5, n5, bias=True), _conv_bn(n5, n5, bias=True)),
            nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, pool, 1, bias=True))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al. 2015) for 32 x 32 inputs: a stem of three 3 x 3 convolutions
    (64, 64, 192 channels), then Inception modules 3a-3b, 4a-4e, 5a-5b with the paper's widths,
    a 3 x 3 max pool at stride 2 before 3a, 4a and 5a (32 -> 4), average pooling, dropout 0.4,
    linear. 6,402,564 parameters for 100 classes (Table 3: 6.2M, see the module docstring)."""

    # (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection); None: a stride-2 max pool
    MODULES = (None, (192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64),
               None, (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
               (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128),
               None, (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128))

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 64), _conv_bn(64, 64), _conv_bn(64, 192)]
        layers += [nn.MaxPool2d(3, 2, 1) if spec is None else _Inception(*spec) for spec in self.MODULES]
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.4)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)))


# --------------------------------------------------------------------------------- ShuffleNet V2


class _ShuffleUnit(nn.Module):
    """ShuffleNet V2 unit. At stride 1 with equal widths the channels are split in half, one half
    goes through 1 x 1 -> depthwise 3 x 3 -> 1 x 1 and is concatenated to the other; otherwise
    both halves of the output come from the whole input (that branch, and depthwise 3 x 3 -> 1 x 1
    beside it). Then the two halves are interleaved (channel shuffle). All convolutions have a bias."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.split = stride == 1 and cin == cout
        inner, out = (cin // 2, cin // 2) if self.split else (cin, cout // 2)
        self.branch = nn.Sequential(_conv_bn(inner, inner, 1, bias=True),
                                    _conv_bn(inner, inner, 3, stride, bias=True, groups=inner, relu=False),
                                    _conv_bn(inner, out, 1, bias=True))
        self.shortcut = None if self.split else nn.Sequential(
            _conv_bn(cin, cin, 3, stride, bias=True, groups=cin, relu=False), _conv_bn(cin, out, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            kept, x = x.chunk(2, 1)
        else:
            kept = self.shortcut(x)
        out = torch.cat([kept, self.branch(x)], 1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 1x (Ma et al. 2018) for 32 x 32 inputs: a 3 x 3 convolution (24 channels,
    BN, no ReLU), stages of 4, 8 and 4 units to 116, 232 and 464 channels (each halving the size),
    a 1 x 1 convolution to 1024, average pooling, linear.
    1,360,896 parameters for 100 classes (Table 3: 1.3M, see the module docstring)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3,
                 widths: Sequence[int] = (116, 232, 464), units: Sequence[int] = (4, 8, 4)) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 24, bias=True, relu=False)]
        cin = 24
        for cout, count in zip(widths, units):
            layers += [_ShuffleUnit(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(count)]
            cin = cout
        layers.append(_conv_bn(cin, 1024, 1, bias=True))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.features(x), self.fc)


# ------------------------------------------------------------------------------------ SqueezeNet


class _Fire(nn.Module):
    """Squeeze 1 x 1 to ``squeeze`` channels, then 1 x 1 and 3 x 3 expansions to ``cout / 2``
    each, concatenated; every convolution has a bias, BN and ReLU."""

    def __init__(self, cin: int, cout: int, squeeze: int) -> None:
        super().__init__()
        self.squeeze = _conv_bn(cin, squeeze, 1, bias=True)
        self.expand1 = _conv_bn(squeeze, cout // 2, 1, bias=True)
        self.expand3 = _conv_bn(squeeze, cout // 2, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet with simple bypass (Iandola et al. 2016) for 32 x 32 inputs: a 3 x 3
    convolution to 96 channels and a 2 x 2 max pool, Fire modules 2-9 (identity shortcuts around
    3, 5 and 7; 2 x 2 max pools after 4 and 8), a 1 x 1 convolution to the classes, average
    pooling. 781,156 parameters for 100 classes (Table 3: 0.78M)."""

    # (in, out, squeeze, shortcut around it, max pool after it)
    FIRES = ((96, 128, 16, False, False), (128, 128, 16, True, False), (128, 256, 32, False, True),
             (256, 256, 32, True, False), (256, 384, 48, False, False), (384, 384, 48, True, False),
             (384, 512, 64, False, True), (512, 512, 64, False, False))

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, 96, bias=True), nn.MaxPool2d(2))
        self.fires = nn.ModuleList([_Fire(cin, cout, s) for cin, cout, s, _, _ in self.FIRES])
        self.head = nn.Conv2d(512, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for fire, (*_, shortcut, pool) in zip(self.fires, self.FIRES):
            x = fire(x) + x if shortcut else fire(x)
            if pool:
                x = nn.functional.max_pool2d(x, 2)
        return nn.functional.adaptive_avg_pool2d(self.head(x), 1).flatten(1)


# ------------------------------------------------------------------------------------ SE-ResNet


class _SEBlock(nn.Module):
    """Two 3 x 3 convolutions (with bias, BN, ReLU), the result scaled per channel by a
    squeeze-and-excitation gate (C -> C/16 -> C, sigmoid), plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, reduction: int = 16) -> None:
        super().__init__()
        self.residual = nn.Sequential(_conv_bn(cin, cout, 3, stride, bias=True), _conv_bn(cout, cout, bias=True))
        self.shortcut = (nn.Identity() if cin == cout and stride == 1 else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout)))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, cout // reduction),
                                  nn.ReLU(inplace=True), nn.Linear(cout // reduction, cout), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return nn.functional.relu(out * self.gate(out)[:, :, None, None] + self.shortcut(x))


class SEResNet18(nn.Module):
    """SE-ResNet-18 (Hu et al. 2018) for 32 x 32 inputs: a 3 x 3 convolution to 64 channels,
    four stages of two SE basic blocks (64, 128, 256, 512 channels; the last three halve the
    size), average pooling, linear. As in the reference, the residual branch ends with a ReLU
    before the gate. 11,314,012 parameters for 100 classes (Table 3: 11.4M, see the module
    docstring)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 64, bias=True)]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_SEBlock(cin, cout, stride), _SEBlock(cout, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.features(x), self.fc)


# ---------------------------------------------------------------------------------------- NASNet


def _sep_branch(c: int, kernel: int, stride: int = 1, *, first_bias: bool) -> nn.Sequential:
    """[ReLU, separable conv, BN] twice, the first at ``stride``. As in the reference, the
    pointwise convolutions have a bias, the second depthwise one too, the first per ``first_bias``."""
    return nn.Sequential(nn.ReLU(), _separable(c, c, kernel, stride, depthwise_bias=first_bias, pointwise_bias=True),
                         nn.BatchNorm2d(c), nn.ReLU(),
                         _separable(c, c, kernel, depthwise_bias=True, pointwise_bias=True), nn.BatchNorm2d(c))


class _Adapt(nn.Module):
    """Brings the previous cell's output to the current cell's width and size: the identity when
    they agree; ReLU, 1 x 1 convolution and BN when only the width differs; when the previous
    output is twice as large, ReLU then two 1 x 1 convolutions to ``c / 2`` of the even and of the
    odd pixels (a factorized reduction), concatenated, and BN."""

    def __init__(self, cin: int, c: int, *, halve: bool) -> None:
        super().__init__()
        self.halve = halve
        if halve:
            self.even, self.odd, self.bn = nn.Conv2d(cin, c // 2, 1), nn.Conv2d(cin, c // 2, 1), nn.BatchNorm2d(c)
        else:
            self.project = nn.Identity() if cin == c else nn.Sequential(nn.ReLU(), nn.Conv2d(cin, c, 1), nn.BatchNorm2d(c))

    def forward(self, prev: torch.Tensor) -> torch.Tensor:
        if self.halve:
            prev = nn.functional.relu(prev)
            odd = nn.functional.pad(prev[:, :, 1:, 1:], (0, 1, 0, 1))  # shifted by one pixel
            return self.bn(torch.cat([self.even(prev[:, :, ::2, ::2]), self.odd(odd[:, :, ::2, ::2])], 1))
        return self.project(prev)


class _NormalCell(nn.Module):
    """NASNet-A normal cell: five pairwise sums of separable convolutions, 3 x 3 average pools and
    identities of the cell input ``h`` (after a 1 x 1 reduction to ``c`` channels) and of the
    adapted previous output, concatenated with the latter: ``6 c`` channels, same size."""

    def __init__(self, cin: int, cprev: int, c: int, *, halve: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c))
        self.h3, self.p3, self.h5 = (_sep_branch(c, k, first_bias=False) for k in (3, 3, 5))
        self.p5, self.p3b = _sep_branch(c, 5, first_bias=False), _sep_branch(c, 3, first_bias=False)
        self.adapt = _Adapt(cprev, c, halve=halve)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        h, prev = self.reduce(x), self.adapt(prev)
        avg = nn.functional.avg_pool2d
        return torch.cat([prev, self.h3(h) + h, self.p3(prev) + self.h5(h), avg(h, 3, 1, 1) + h,
                          2 * avg(prev, 3, 1, 1), self.p5(prev) + self.p3b(prev)], 1)


class _ReductionCell(nn.Module):
    """NASNet-A reduction cell: sums of stride-2 separable convolutions (7 x 7, 5 x 5) and 3 x 3
    pools, and of those again, concatenated to ``4 c`` channels at half the size."""

    def __init__(self, cin: int, cprev: int, c: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, c, 1), nn.BatchNorm2d(c))
        self.p7, self.h5, self.p7b, self.p5 = (_sep_branch(c, k, 2, first_bias=True) for k in (7, 5, 7, 5))
        self.a3 = _sep_branch(c, 3, first_bias=True)
        self.adapt = _Adapt(cprev, c, halve=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        h, prev = self.reduce(x), self.adapt(prev)
        f = nn.functional
        a = self.p7(prev) + self.h5(h)
        b = f.max_pool2d(h, 3, 2, 1) + self.p7b(prev)
        c = f.avg_pool2d(h, 3, 2, 1) + self.p5(prev)
        return torch.cat([b, c, f.max_pool2d(h, 3, 2, 1) + self.a3(a), f.avg_pool2d(a, 3, 1, 1) + b], 1)


class NASNet(nn.Module):
    """NASNet-A 4 @ 1056 (Zoph et al. 2018) for 32 x 32 inputs: a 3 x 3 convolution to 44
    channels with BN, three stages of ``repeats`` normal cells of 44, 88 and 176 branch channels
    (6 c out) with a reduction cell before the second and third, ReLU, average pooling, linear.
    Each cell reads the two outputs before it. 4,334,056 parameters for 100 classes (Table 3:
    5.2M counts 887,568 more that the reference defines and never uses; see the module
    docstring)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3, filters: int = 44, repeats: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, filters, 3, padding=1, bias=False), nn.BatchNorm2d(filters))
        cells: list[nn.Module] = []
        cx = cprev = filters
        halve = False  # is the previous output twice the size of the cell's input?
        for stage in range(3):
            c = filters << stage
            if stage:
                cells.append(_ReductionCell(cx, cprev, c))
                cx, cprev, halve = 4 * c, cx, True
            for _ in range(repeats):
                cells.append(_NormalCell(cx, cprev, c, halve=halve))
                cx, cprev, halve = 6 * c, cx, False
        self.cells = nn.ModuleList(cells)
        self.fc = nn.Linear(cx, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = prev = self.stem(x)
        for cell in self.cells:
            x, prev = cell(x, prev), x
        return _classify(nn.functional.relu(x), self.fc)


# The names Table 3 uses (pytorch-cifar100's), each to a constructor (num_classes, in_channels).
TABLE3: dict[str, Callable[..., nn.Module]] = {
    "vgg11_bn": VGG11BN, "mobilenet": MobileNet, "densenet121": DenseNet121, "xception": Xception,
    "googlenet": GoogLeNet, "shufflenetv2": ShuffleNetV2, "squeezenet": SqueezeNet, "seresnet18": SEResNet18,
    "nasnet": NASNet,
}
