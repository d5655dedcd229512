"""Reference CNNs for small images: CIFAR-style ResNet, VGG with BatchNorm, MobileNetV2.

Why these three: they cover the block shapes a user model brings - residual units with a
shortcut (ResNet), a plain chain of convolutions that must be grouped at pooling boundaries
(VGG), and inverted residuals with depthwise convolutions where only some units carry a
skip connection (MobileNetV2). Every model is built from standard `torch.nn` modules and
`operator.add` only, so `torch.fx` traces it and the block serializer can rebuild any block
from an allow-list. All three take the input channel count and the class count, and work
on 1x28x28 (Fashion-MNIST) and 3x32x32 (CIFAR) inputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet",
    "VGG",
    "VGG_LAYOUTS",
    "vgg",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenetv2",
    "ZOO",
    "build_zoo_model",
]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                  act: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    ]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- ResNet

class _PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, CIFAR): subsample and zero-pad the channels.

    Parameter-free, as in the paper's ResNet-20/32/56; traced by fx as a slice plus a pad.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut: the residual unit of CIFAR ResNets."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem conv, three stages of BasicBlocks (width, 2w, 4w), global pool, fc."""

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 1,
                 num_classes: int = 10, shortcut: str = "B") -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}")
        _check_positive(width=width, in_channels=in_channels, num_classes=num_classes)
        if shortcut == "A" and width % 2:
            raise ValueError(f"option-A shortcuts pad channels symmetrically: width must be even, got {width}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        planes = width
        stages = []
        for i, stage_planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, stage_planes, stride, shortcut))
                planes = stage_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet(depth: int = 20, width: int = 16, in_channels: int = 1, num_classes: int = 10,
           shortcut: str = "B") -> ResNet:
    """CIFAR ResNet of depth 6n+2.

    `shortcut="B"` (default) uses a 1x1 conv + BN on down-sampling shortcuts; `"A"` is the
    paper's parameter-free zero-padding shortcut. B is the default because every op is then
    a standard module or an add, which keeps pruning and serialization on the common path.
    """
    return ResNet(depth, width, in_channels, num_classes, shortcut)


# ----------------------------------------------------------------------------- VGG

VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm; `features` is a plain chain, `classifier` pools globally.

    Small inputs cannot take five 2x2 max-pools (28 -> 14 -> 7 -> 3 -> 1 -> 0), so a pool
    is dropped whenever the feature map is already 1 pixel wide; the classifier uses an
    adaptive average pool, so any input size of at least 1x1 works.
    """

    def __init__(self, layout: str = "vgg11", width: int = 64, in_channels: int = 1,
                 num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        if layout not in VGG_LAYOUTS:
            raise ValueError(f"unknown VGG layout {layout!r}; choose one of {sorted(VGG_LAYOUTS)}")
        _check_positive(width=width, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for item in VGG_LAYOUTS[layout]:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(1, int(item) * width // 64)
            layers.extend(_conv_bn_relu(channels, out))
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg(layout: str = "vgg11", width: int = 64, in_channels: int = 1, num_classes: int = 10,
        input_size: int = 28) -> VGG:
    """VGG-11/16 with BatchNorm; `width` is the first stage's channel count (64 in the paper)."""
    return VGG(layout, width, in_channels, num_classes, input_size)


# ----------------------------------------------------------------------------- MobileNetV2

def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never below 90% of `value` (as torchvision)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear); skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.extend(_conv_bn_relu(cin, hidden, kernel=1, act=nn.ReLU6))
        layers.extend(_conv_bn_relu(hidden, hidden, kernel=3, stride=stride, groups=hidden, act=nn.ReLU6))
        layers.extend([nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)])
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, channels c, repeats n, stride s) as in the paper, except that the stem
# and the 24-channel stage keep stride 1: on 28x28/32x32 inputs the ImageNet schedule
# (total stride 32) would shrink the map to 1x1 before the last stages.
_MOBILENETV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with a small-input stride schedule (total stride 8)."""

    def __init__(self, width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if not (isinstance(width_mult, (int, float)) and width_mult > 0):
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        _check_positive(in_channels=in_channels, num_classes=num_classes)
        cin = _make_divisible(32 * width_mult)
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, cin, act=nn.ReLU6))
        units: list[nn.Module] = []
        for t, c, n, s in _MOBILENETV2_CFG:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                units.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.features = nn.Sequential(*units)
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.last = nn.Sequential(*_conv_bn_relu(cin, last, kernel=1, act=nn.ReLU6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.features(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


def mobilenetv2(width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    """MobileNetV2 with a width multiplier (channels rounded to multiples of 8)."""
    return MobileNetV2(width_mult, in_channels, num_classes)


# ----------------------------------------------------------------------------- registry

def _init_weights(model: nn.Module) -> None:
    """Kaiming init for convs, unit BN: the usual start for training from scratch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _resnet_entry(depth: int) -> Callable[..., nn.Module]:
    def build(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **kwargs: Any) -> nn.Module:
        return resnet(depth=depth, in_channels=in_channels, num_classes=num_classes, **kwargs)

    build.__doc__ = f"ResNet-{depth} (CIFAR style); kwargs: width, shortcut."
    return build


def _vgg_entry(layout: str) -> Callable[..., nn.Module]:
    def build(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **kwargs: Any) -> nn.Module:
        return vgg(layout=layout, in_channels=in_channels, num_classes=num_classes, input_size=input_size, **kwargs)

    build.__doc__ = f"{layout.upper()} with BatchNorm; kwargs: width."
    return build


def _mobilenetv2_entry(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                       **kwargs: Any) -> nn.Module:
    """MobileNetV2; kwargs: width_mult."""
    return mobilenetv2(in_channels=in_channels, num_classes=num_classes, **kwargs)


# Every entry takes (in_channels, num_classes, input_size, **model kwargs), so callers can
# build any zoo model the same way; models that adapt to any input size ignore input_size.
ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _resnet_entry(20),
    "resnet32": _resnet_entry(32),
    "resnet56": _resnet_entry(56),
    "vgg11": _vgg_entry("vgg11"),
    "vgg16": _vgg_entry("vgg16"),
    "mobilenetv2": _mobilenetv2_entry,
}


def build_zoo_model(name: str, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                    **kwargs: Any) -> nn.Module:
    """Build a zoo model by name, e.g. `build_zoo_model("resnet20", width=8)`."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")
    try:
        return ZOO[name](in_channels=in_channels, num_classes=num_classes, input_size=input_size, **kwargs)
    except TypeError as e:
        raise TypeError(f"bad options for zoo model {name!r}: {e} (see the docstring: {ZOO[name].__doc__})") from e
