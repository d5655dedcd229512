"""Building blocks of torchvision and timm, and the families detection handled before the mobile work.

torchvision and timm do not load with this CPU build of torch, so these are faithful copies
of the layers the model libraries build their networks from, with the constructs detection
and pruning must handle: SE gates as `scale * x` (torchvision) and `x * gate(x)` (timm),
timm's `BatchNormAct2d` (a BatchNorm2d subclass that calls `F.batch_norm` itself, with a
`torch._assert`), hard-sigmoid as `relu6(x + 3) / 6`, `F.hardswish`, timm's `LayerNorm2d`
(channels-last `F.layer_norm` between permutes). `mobile_models.py` builds the mobile
families from them. The families here - ResNet-18, RegNetY-400MF and SqueezeNet 1.1 as
torchvision writes them, ConvNeXt-atto as timm does - are regression guards; factories take
`(in_channels=3, num_classes=10, input_size=64, width_mult=1.0)`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Act = Callable[..., nn.Module]


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision / timm channel rounding: nearest multiple of `divisor`, never 10% below `v`."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _ch(c: int, width_mult: float) -> int:
    return _make_divisible(c * width_mult)


# ============================================================== torchvision building blocks


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv, BatchNorm, optional activation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation_layer: Act | None = nn.ReLU, dilation: int = 1) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation,
                                             groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: `scale * input`."""

    def __init__(self, channels: int, squeeze: int, activation: Act = nn.ReLU,
                 scale_activation: Act = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale(x)
        return scale * x


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (row mode): the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


# ============================================================== timm building blocks


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: BatchNorm2d whose forward calls F.batch_norm, then an activation."""

    def __init__(self, num_features: int, apply_act: bool = True, act_layer: Act = nn.ReLU) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, 0.0 if self.momentum is None else self.momentum, self.eps)
        return self.act(self.drop(x))


class HardSigmoid(nn.Module):
    """timm.layers.HardSigmoid: `relu6(x + 3) / 6`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class HardSwish(nn.Module):
    """timm.layers.HardSwish via `F.hardswish`."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x)


class SqueezeExcite(nn.Module):
    """timm's efficientnet SqueezeExcite: `x * gate(x_se)` with a mean over H, W."""

    def __init__(self, chs: int, rd: int, act_layer: Act = nn.ReLU, gate_layer: Act = nn.Sigmoid) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.act1(self.conv_reduce(x_se))
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class DropPath(nn.Module):
    """timm.layers.DropPath: the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class ConvNormAct(nn.Module):
    """timm.layers.ConvNormAct: conv + BatchNormAct2d."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
                 apply_act: bool = True, act_layer: Act = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=apply_act, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ClassifierHead(nn.Module):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(x))


class LayerNorm2d(nn.LayerNorm):
    """timm LayerNorm2d: LayerNorm over channels of an NCHW tensor via permutes and F.layer_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


# ============================================================== families that already worked


class BasicBlock(nn.Module):
    """torchvision ResNet BasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        w = [_ch(v, width_mult) for v in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, w[0], 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin = w[0]
        for i, width in enumerate(w):
            units = [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
            cin = width
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int = 64, width_mult: float = 1.0) -> nn.Module:
    return ResNet18(in_channels, num_classes, width_mult)


class ResBottleneckBlock(nn.Module):
    """torchvision RegNet ResBottleneckBlock: 1x1, grouped 3x3, SE, 1x1; projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, se_ratio: float) -> None:
        super().__init__()
        self.proj = (Conv2dNormActivation(cin, cout, 1, stride, activation_layer=None)
                     if cin != cout or stride != 1 else None)
        self.f = nn.Sequential(OrderedDict(
            a=Conv2dNormActivation(cin, cout, 1),
            b=Conv2dNormActivation(cout, cout, 3, stride, groups=cout // group_width),
            se=SqueezeExcitation(cout, int(round(se_ratio * cin))),
            c=Conv2dNormActivation(cout, cout, 1, activation_layer=None)))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.f(x) if self.proj is not None else x + self.f(x)
        return self.activation(x)


def regnety_400mf(in_channels: int = 3, num_classes: int = 10, input_size: int = 64,
                  width_mult: float = 1.0) -> nn.Module:
    """torchvision regnet_y_400mf: depths 1/3/6/6, widths 48/104/208/440, group width 8, SE 0.25."""
    widths = [max(8, int(w * width_mult) // 8 * 8) for w in (48, 104, 208, 440)]
    stem = _ch(32, width_mult)
    stages, cin = [], stem
    for i, (depth, w) in enumerate(zip((1, 3, 6, 6), widths)):
        blocks = OrderedDict((f"block{i + 1}-{j}",
                              ResBottleneckBlock(cin if j == 0 else w, w, 2 if j == 0 else 1, 8, 0.25))
                             for j in range(depth))
        stages.append((f"block{i + 1}", nn.Sequential(blocks)))
        cin = w
    model = nn.Sequential(OrderedDict(
        stem=Conv2dNormActivation(in_channels, stem, 3, 2), trunk_output=nn.Sequential(OrderedDict(stages)),
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), fc=nn.Linear(cin, num_classes)))
    return model


class Fire(nn.Module):
    """torchvision SqueezeNet Fire: squeeze 1x1, then `cat` of 1x1 and 3x3 expands."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        one, three = self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))
        return torch.cat([one, three], 1)


def squeezenet(in_channels: int = 3, num_classes: int = 10, input_size: int = 64, width_mult: float = 1.0) -> nn.Module:
    """torchvision squeezenet1_1."""
    def c(v: int) -> int:
        return max(4, int(v * width_mult))

    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    features = nn.Sequential(
        nn.Conv2d(in_channels, c(64), 3, 2), nn.ReLU(inplace=True), pool(),
        Fire(c(64), c(16), c(64), c(64)), Fire(c(128), c(16), c(64), c(64)), pool(),
        Fire(c(128), c(32), c(128), c(128)), Fire(c(256), c(32), c(128), c(128)), pool(),
        Fire(c(256), c(48), c(192), c(192)), Fire(c(384), c(48), c(192), c(192)),
        Fire(c(384), c(64), c(256), c(256)), Fire(c(512), c(64), c(256), c(256)))
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(c(512), num_classes, 1), nn.ReLU(inplace=True),
                               nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier, flatten=nn.Flatten(1)))


class ConvNeXtBlock(nn.Module):
    """timm ConvNeXtBlock (conv_mlp=False): dw 7x7, channels-last LayerNorm + MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.mlp(self.norm(x.permute(0, 2, 3, 1)))
        x = x.permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, cout, 2, 2)) if downsample
                           else nn.Identity())
        self.blocks = nn.Sequential(*(ConvNeXtBlock(cout) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        dims = [_ch(v, width_mult) for v in (40, 80, 160, 320)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*(ConvNeXtStage(dims[max(i - 1, 0)], d, depth, i > 0)
                                      for i, (d, depth) in enumerate(zip(dims, (2, 2, 6, 2)))))
        self.norm_pre = nn.Identity()
        self.head = nn.Sequential(OrderedDict(global_pool=nn.AdaptiveAvgPool2d(1), norm=LayerNorm2d(dims[-1], eps=1e-6),
                                              flatten=nn.Flatten(1), fc=nn.Linear(dims[-1], num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_pre(self.stages(self.stem(x))))


def convnext_atto(in_channels: int = 3, num_classes: int = 10, input_size: int = 64,
                  width_mult: float = 1.0) -> nn.Module:
    return ConvNeXt(in_channels, num_classes, width_mult)


#: name -> factory.
FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "regnety_400mf": regnety_400mf, "squeezenet": squeezenet, "convnext_atto": convnext_atto,
}
