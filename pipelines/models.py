"""Models of the paper's experiments, built by name (:func:`build_model`).

- ``mlp`` / ``mlp-WIDTH``: a two-hidden-layer MLP with BatchNorm for flat inputs (digits);
- ``cnn1d``: a small 1-D CNN for sequences such as MNIST-1D;
- ``resnetDEPTH``: the CIFAR ResNet of He et al. (2016), ResNet-20 has 0.27M parameters;
- ``wrn-DEPTH-WIDTH``: the WideResNet of Zagoruyko & Komodakis (2016) for 32 x 32 inputs:
  pre-activation basic blocks, (DEPTH - 4) / 6 blocks per stage, widths 16, 16k, 32k, 64k.
  WRN-40-10 on CIFAR-100 has 55.9M parameters, the paper's Table 3;
- ``inception-v4``: Inception-v4 of Szegedy et al. (2017), 41.3M parameters on CIFAR-100
  (Table 3), with "same" padding in the stem so that 32 x 32 inputs keep a spatial extent;
- the other nine CIFAR-100 models of Table 3, by their pytorch-cifar100 names: ``vgg11_bn``,
  ``mobilenet``, ``densenet121``, ``xception``, ``googlenet``, ``shufflenetv2``, ``squeezenet``,
  ``seresnet18``, ``nasnet`` (defined, with their parameter counts, in :mod:`pipelines.table3`);
- ``torchvision:NAME``: any ``torchvision.models`` constructor (no pretrained weights).
"""

from __future__ import annotations

from torch import nn

from .table3 import TABLE3

__all__ = ["CNN1d", "CifarResNet", "InceptionV4", "MLP", "MODEL_NAMES", "WideResNet", "build_model",
           "parse_model_name", "resolve_model"]


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


class MLP(nn.Sequential):
    """Flat input -> [Linear, BatchNorm, ReLU] x 2 -> Linear."""

    def __init__(self, in_features: int, num_classes: int, width: int = 128) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes))


class CNN1d(nn.Module):
    """A 1-D CNN for sequences of length L (MNIST-1D: L = 40): three 3-wide convolutions of
    ``channels`` channels (the last two with stride 2), BatchNorm, ReLU, then a linear classifier."""

    def __init__(self, length: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for stride in (1, 2, 2):
            layers += [nn.Conv1d(cin, channels, 3, stride, 1), nn.BatchNorm1d(channels), nn.ReLU()]
            cin = channels
        self.features = nn.Sequential(*layers)
        out_len = -(-(-(-length // 2)) // 2)
        self.fc = nn.Linear(channels * out_len, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc(self.features(x.reshape(len(x), 1, -1)).flatten(1))


class _Conv(nn.Sequential):
    """Convolution (no bias) + BatchNorm + ReLU, the unit every Inception-v4 block is made of."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | str = 0) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _chain(cin: int, *specs: tuple[int, int | tuple[int, int], int]) -> nn.Sequential:
    """Convolutions in sequence: each spec is (channels out, kernel, stride); stride-1 ones keep
    the spatial size, stride-2 ones halve it."""
    layers: list[nn.Module] = []
    for cout, kernel, stride in specs:
        layers.append(_Conv(cin, cout, kernel, stride, "same" if stride == 1 else 1))
        cin = cout
    return nn.Sequential(*layers)


class _Branches(nn.Module):
    """Parallel branches whose outputs are concatenated along channels."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):  # type: ignore[no-untyped-def]
        import torch

        return torch.cat([b(x) for b in self.branches], 1)


def _pool_branch(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), _Conv(cin, cout, 1))


def _inception_a(cin: int) -> _Branches:   # 384 -> 384 channels
    return _Branches(_pool_branch(cin, 96), _chain(cin, (96, 1, 1)), _chain(cin, (64, 1, 1), (96, 3, 1)),
                     _chain(cin, (64, 1, 1), (96, 3, 1), (96, 3, 1)))


def _reduction_a(cin: int) -> _Branches:   # 384 -> 1024 (k, l, m, n = 192, 224, 256, 384)
    return _Branches(nn.MaxPool2d(3, 2, 1), _chain(cin, (384, 3, 2)), _chain(cin, (192, 1, 1), (224, 3, 1), (256, 3, 2)))


def _inception_b(cin: int) -> _Branches:   # 1024 -> 1024
    return _Branches(_pool_branch(cin, 128), _chain(cin, (384, 1, 1)),
                     _chain(cin, (192, 1, 1), (224, (1, 7), 1), (256, (7, 1), 1)),
                     _chain(cin, (192, 1, 1), (192, (1, 7), 1), (224, (7, 1), 1), (224, (1, 7), 1), (256, (7, 1), 1)))


def _reduction_b(cin: int) -> _Branches:   # 1024 -> 1536
    return _Branches(nn.MaxPool2d(3, 2, 1), _chain(cin, (192, 1, 1), (192, 3, 2)),
                     _chain(cin, (256, 1, 1), (256, (1, 7), 1), (320, (7, 1), 1), (320, 3, 2)))


class _InceptionC(nn.Module):   # 1536 -> 1536: two branches that split into 1x3 and 3x1 halves
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.pool = _pool_branch(cin, 256)
        self.one = _Conv(cin, 256, 1)
        self.mid = _Conv(cin, 384, 1)
        self.mid_h, self.mid_v = _Conv(384, 256, (1, 3), padding="same"), _Conv(384, 256, (3, 1), padding="same")
        self.deep = _chain(cin, (384, 1, 1), (448, (1, 3), 1), (512, (3, 1), 1))
        self.deep_h, self.deep_v = _Conv(512, 256, (1, 3), padding="same"), _Conv(512, 256, (3, 1), padding="same")

    def forward(self, x):  # type: ignore[no-untyped-def]
        import torch

        mid, deep = self.mid(x), self.deep(x)
        return torch.cat([self.pool(x), self.one(x), self.mid_h(mid), self.mid_v(mid), self.deep_h(deep),
                          self.deep_v(deep)], 1)


class InceptionV4(nn.Module):
    """Inception-v4 (Szegedy et al. 2017, Figures 3-9): stem, 4 x Inception-A, Reduction-A,
    7 x Inception-B, Reduction-B, 3 x Inception-C, average pooling, dropout 0.2, linear.

    The channel counts are the paper's; for 32 x 32 inputs the stem halves the size once rather
    than three times (its other convolutions use "same" padding) and the reductions pad by one,
    so a CIFAR image meets Inception-A at 16 x 16, Inception-B at 8 x 8 and Inception-C at 4 x 4.
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _chain(in_channels, (32, 3, 1), (32, 3, 1), (64, 3, 1)),
            _Branches(nn.MaxPool2d(3, 2, 1), _chain(64, (96, 3, 2))),                              # 160, halves
            _Branches(_chain(160, (64, 1, 1), (96, 3, 1)),
                      _chain(160, (64, 1, 1), (64, (7, 1), 1), (64, (1, 7), 1), (96, 3, 1))),       # 192
            _Branches(_chain(192, (192, 3, 1)), nn.MaxPool2d(3, 1, 1)),                           # 384
        )
        self.blocks = nn.Sequential(*[_inception_a(384) for _ in range(4)], _reduction_a(384),
                                    *[_inception_b(1024) for _ in range(7)], _reduction_b(1024),
                                    *[_InceptionC(1536) for _ in range(3)])
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(1536, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)
        return self.fc(self.drop(out))


# The registry of built-in names, with the sizes a name may ask for (wider than any paper's, so a
# name read from a store cannot ask for a model whose construction alone exhausts memory or time).
# Each pattern's integers are checked against its bounds; torchvision:NAME against torchvision's list.
MODEL_NAMES: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "mlp": (r"mlp(?:-(\d+))?", ((1, 65536),)),                   # width
    "cnn1d": (r"cnn1d(?:-(\d+))?", ((1, 4096),)),                # channels
    "resnet": (r"resnet(\d+)", ((2, 1202),)),                    # depth 6k + 2 (He et al. went to 1202)
    "wrn": (r"wrn-(\d+)-(\d+)", ((4, 1000), (1, 64))),           # depth 6k + 4, width
    "inception-v4": (r"inception-v4", ()),
    **{name: (name, ()) for name in TABLE3},                     # vgg11_bn, mobilenet, ... (pipelines.table3)
}
_EXPECTED = ("'mlp[-WIDTH]', 'cnn1d[-CHANNELS]', 'resnetDEPTH', 'wrn-DEPTH-WIDTH', 'inception-v4', "
             + ", ".join(f"'{name}'" for name in TABLE3) + " or 'torchvision:NAME'")


def parse_model_name(name: object) -> tuple[str, tuple[int, ...]]:
    """``(family, integers)`` of a built-in model name, checked against :data:`MODEL_NAMES` (and
    ``torchvision.models.list_models()``) without building anything; ValueError naming the name
    and what is wrong otherwise. ``torchvision:NAME`` gives ``("torchvision", ())``."""
    import re

    if not isinstance(name, str):
        raise ValueError(f"a model name must be a string, got {type(name).__name__} {name!r:.80}")
    if name.startswith("torchvision:"):
        import torchvision

        if name[len("torchvision:"):] not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {name!r:.80}; see torchvision.models.list_models()")
        return "torchvision", ()
    for family, (pattern, bounds) in MODEL_NAMES.items():
        match = re.fullmatch(pattern, name, re.ASCII)
        if match is None:
            continue
        values = tuple(int(v) for v in match.groups() if v is not None)
        for value, (low, high) in zip(values, bounds):
            if not low <= value <= high:
                raise ValueError(f"model {name!r}: {value} is outside [{low}, {high}] for {family}")
        return family, values
    if name.startswith("wrn-"):
        raise ValueError(f"WideResNet names are 'wrn-DEPTH-WIDTH', got {name!r:.80}")
    raise ValueError(f"unknown model {name!r:.80}; expected {_EXPECTED}")


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> nn.Module:
    """A model by name (see the module docstring and :data:`MODEL_NAMES`); ``input_shape`` sizes
    the small models. Under ``with torch.device("meta")`` nothing is allocated."""
    import math

    family, values = parse_model_name(name)
    if family == "mlp":
        return MLP(math.prod(input_shape), num_classes, values[0] if values else 128)
    if family == "cnn1d":
        return CNN1d(input_shape[-1], num_classes, values[0] if values else 32)
    if family == "resnet":
        return CifarResNet(values[0], num_classes)
    if family == "wrn":
        return WideResNet(values[0], values[1], num_classes)
    if family == "inception-v4":
        return InceptionV4(num_classes, input_shape[0])
    if family in TABLE3:
        return TABLE3[family](num_classes, input_shape[0])
    import torchvision

    return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)


def resolve_model(spec: str, input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A model and its input shape from a spec: a built-in name as trained by the pipelines
    (``resnetDEPTH`` on CIFAR-10; ``wrn-*``, ``inception-v4`` and the other names of Table 3
    (:data:`pipelines.table3.TABLE3`) on CIFAR-100;
    ``cnn1d`` on MNIST-1D; ``mlp`` on digits), ``torchvision:NAME`` (1,000 classes, 3 x 224 x 224)
    or ``package.module:factory`` (called with no arguments; give ``input_shape``)."""
    import importlib

    if spec.startswith("torchvision:"):
        return build_model(spec, 1000), input_shape or (3, 224, 224)
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import {spec!r}: {e}") from e
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model, input_shape
    if spec.startswith(("wrn-", "inception")) or spec in TABLE3:
        return build_model(spec, 100), input_shape or (3, 32, 32)
    if spec.startswith("cnn1d"):
        return build_model(spec, 10, input_shape or (40,)), input_shape or (40,)
    if spec.startswith("mlp"):
        return build_model(spec, 10, input_shape or (64,)), input_shape or (64,)
    return build_model(spec, 10), input_shape or (3, 32, 32)
