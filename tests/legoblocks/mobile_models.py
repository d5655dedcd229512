"""The architectures mobile vision runs on, written the way torchvision and timm write them.

torchvision and timm do not load with this CPU build of torch, so the test suite carries its
own copies: each factory rebuilds one family with the constructs its library uses, which
are what block detection and pruning must handle - SE gates written as `scale * x` and
`x * gate(x)` with sigmoid / hard-sigmoid, hard-swish activations, timm's `BatchNormAct2d`
(a BatchNorm2d subclass that calls `F.batch_norm` itself), channel shuffle via
view/transpose and `chunk`, Ghost modules (`cat` + slice), RepVGG's 3x3 + 1x1 + identity
sums, MobileViT's shape-dependent `if` and unfold/fold reshapes, LayerNorm over
channels-last tokens and attention as `softmax(q @ k.transpose)`. The shared layers, and
ResNet-18, RegNetY, SqueezeNet and ConvNeXt (which already worked; their factories are
re-exported here), are in `classic_models.py`.

Every factory is `factory(in_channels=3, num_classes=10, input_size=64, width_mult=1.0)`, so
`legodnn blocks tests/legoblocks/mobile_models.py:mobilenetv3_small --input-shape 3,64,64`
works; tests pass a smaller `width_mult` to stay fast. Weights are randomly initialized.
"""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _load(filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"legodnn_test_{filename[:-3]}", Path(__file__).with_name(filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_classic = _load("classic_models.py")  # the shared layers, and the families that already worked
_SHARED = ("_make_divisible", "_ch", "Conv2dNormActivation", "SqueezeExcitation", "StochasticDepth", "BatchNormAct2d",
           "HardSigmoid", "HardSwish", "SqueezeExcite", "DropPath", "ConvNormAct", "ClassifierHead", "Act")
(_make_divisible, _ch, Conv2dNormActivation, SqueezeExcitation, StochasticDepth, BatchNormAct2d, HardSigmoid, HardSwish,
 SqueezeExcite, DropPath, ConvNormAct, ClassifierHead, Act) = (getattr(_classic, name) for name in _SHARED)


# ============================================================== MobileNetV3 (torchvision)


class InvertedResidualV3(nn.Module):
    """torchvision MobileNetV3 InvertedResidual: expand, depthwise, SE, project, `result += input`."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(Conv2dNormActivation(cin, exp, 1, activation_layer=act))
        layers.append(Conv2dNormActivation(exp, exp, k, stride, groups=exp, activation_layer=act))
        if se:
            layers.append(SqueezeExcitation(exp, _make_divisible(exp // 4, 8), scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(exp, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


_V3_SMALL = [  # k, exp, out, se, hard-swish, stride
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
]


class MobileNetV3(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        cin = _ch(16, width_mult)
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, cin, 3, 2, activation_layer=nn.Hardswish)]
        for k, exp, out, se, hs, s in _V3_SMALL:
            cout = _ch(out, width_mult)
            layers.append(InvertedResidualV3(cin, k, _ch(exp, width_mult), cout, se, hs, s))
            cin = cout
        last_conv = 6 * cin
        layers.append(Conv2dNormActivation(cin, last_conv, 1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_conv, _ch(1024, width_mult)), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True), nn.Linear(_ch(1024, width_mult), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv3_small(in_channels: int = 3, num_classes: int = 10, input_size: int = 64,
                      width_mult: float = 1.0) -> nn.Module:
    return MobileNetV3(in_channels, num_classes, width_mult)


# ============================================================== EfficientNet-B0 (torchvision)


class MBConv(nn.Module):
    """torchvision MBConv: expand (SiLU), depthwise, SE (`scale * input`, sigmoid), project, stochastic depth."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, sd_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        exp = _make_divisible(cin * expand, 8)
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(Conv2dNormActivation(cin, exp, 1, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(exp, exp, k, stride, groups=exp, activation_layer=nn.SiLU))
        layers.append(SqueezeExcitation(exp, max(1, cin // 4), activation=nn.SiLU))
        layers.append(Conv2dNormActivation(exp, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


_B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
       (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]  # expand, k, s, in, out, n


class EfficientNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        stem = Conv2dNormActivation(in_channels, _ch(32, width_mult), 3, 2, activation_layer=nn.SiLU)
        layers: list[nn.Module] = [stem]
        total, done = sum(c[-1] for c in _B0), 0
        for expand, k, s, cin, cout, n in _B0:
            stage = []
            for i in range(n):
                stage.append(MBConv(_ch(cin if i == 0 else cout, width_mult), _ch(cout, width_mult), expand, k,
                                    s if i == 0 else 1, 0.2 * done / total))
                done += 1
            layers.append(nn.Sequential(*stage))
        last = 4 * _ch(320, width_mult)
        layers.append(Conv2dNormActivation(_ch(320, width_mult), last, 1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0(in_channels: int = 3, num_classes: int = 10, input_size: int = 64,
                    width_mult: float = 1.0) -> nn.Module:
    return EfficientNet(in_channels, num_classes, width_mult)


# ============================================================== timm EfficientNet / MobileNetV3


class DepthwiseSeparableConv(nn.Module):
    """timm DepthwiseSeparableConv: dw conv, BNAct, SE, pw conv, BN (no act), skip when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, act: Act, se: nn.Module | None) -> None:
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_dw = nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False)
        self.bn1 = BatchNormAct2d(cin, act_layer=act)
        self.se = se or nn.Identity()
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = BatchNormAct2d(cout, apply_act=False)
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.bn1(self.conv_dw(x)))
        x = self.bn2(self.conv_pw(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class TimmInvertedResidual(nn.Module):
    """timm InvertedResidual: conv_pw, bn1, conv_dw, bn2, aa, se, conv_pwl, bn3, drop_path + shortcut."""

    def __init__(self, cin: int, cout: int, exp: int, k: int, stride: int, act: Act, se: nn.Module | None) -> None:
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = nn.Conv2d(cin, exp, 1, bias=False)
        self.bn1 = BatchNormAct2d(exp, act_layer=act)
        self.conv_dw = nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False)
        self.bn2 = BatchNormAct2d(exp, act_layer=act)
        self.aa = nn.Identity()
        self.se = se or nn.Identity()
        self.conv_pwl = nn.Conv2d(exp, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, apply_act=False)
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.aa(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class TimmEfficientNet(nn.Module):
    """timm EfficientNet / MobileNetV3 layout: conv_stem, bn1, blocks (stages), head."""

    def __init__(self, in_channels: int, num_classes: int, stem: int, stages: list[list[nn.Module]], head_in: int,
                 head_out: int, act: Act, conv_head_after_pool: bool) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(stem, act_layer=act)
        self.blocks = nn.Sequential(*(nn.Sequential(*s) for s in stages))
        self.conv_head_after_pool = conv_head_after_pool
        self.conv_head = nn.Conv2d(head_in, head_out, 1, bias=conv_head_after_pool)
        self.bn2 = nn.Identity() if conv_head_after_pool else BatchNormAct2d(head_out, act_layer=act)
        self.act2 = act(inplace=True) if conv_head_after_pool else nn.Identity()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(head_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        if self.conv_head_after_pool:  # MobileNetV3: pool, then a 1x1 conv with bias
            x = self.act2(self.conv_head(self.global_pool(x)))
        else:  # EfficientNet: 1x1 conv + BN-act, then pool
            x = self.global_pool(self.bn2(self.conv_head(x)))
        return self.classifier(self.flatten(x))


def efficientnet_b0_timm(in_channels: int = 3, num_classes: int = 10, input_size: int = 64,
                         width_mult: float = 1.0) -> nn.Module:
    stages: list[list[nn.Module]] = []
    for expand, k, s, cin, cout, n in _B0:
        stage: list[nn.Module] = []
        for i in range(n):
            a, b = _ch(cin if i == 0 else cout, width_mult), _ch(cout, width_mult)
            exp = a * expand
            se = SqueezeExcite(exp, max(1, int(a * 0.25)), act_layer=nn.SiLU)
            stride = s if i == 0 else 1
            stage.append(DepthwiseSeparableConv(a, b, k, stride, nn.SiLU, se) if expand == 1
                         else TimmInvertedResidual(a, b, exp, k, stride, nn.SiLU, se))
        stages.append(stage)
    last = _ch(320, width_mult)
    return TimmEfficientNet(in_channels, num_classes, _ch(32, width_mult), stages, last, 4 * last, nn.SiLU, False)


def mobilenetv3_small_timm(in_channels: int = 3, num_classes: int = 10, input_size: int = 64,
                           width_mult: float = 1.0) -> nn.Module:
    """timm mobilenetv3_small_100: DS + IR stages, SE `x * gate` with hard-sigmoid, a `cn` stage, pooled head."""
    stages: list[list[nn.Module]] = []
    cin = _ch(16, width_mult)
    plan = [[(3, 16, 16, True, False, 2)], [_V3_SMALL[1], _V3_SMALL[2]], _V3_SMALL[3:6], _V3_SMALL[6:8], _V3_SMALL[8:]]
    for stage_plan in plan:
        stage: list[nn.Module] = []
        for k, exp, out, se, hs, s in stage_plan:
            act = HardSwish if hs else nn.ReLU
            cout, e = _ch(out, width_mult), _ch(exp, width_mult)
            gate = SqueezeExcite(e, _make_divisible(e * 0.25), act_layer=nn.ReLU, gate_layer=HardSigmoid) if se else None
            stage.append(DepthwiseSeparableConv(cin, cout, k, s, act, gate) if e == cin
                         else TimmInvertedResidual(cin, cout, e, k, s, act, gate))
            cin = cout
        stages.append(stage)
    stages.append([ConvNormAct(cin, 6 * cin, 1, act_layer=HardSwish)])
    return TimmEfficientNet(in_channels, num_classes, _ch(16, width_mult), stages, 6 * cin, _ch(1024, width_mult),
                            HardSwish, True)


# ============================================================== GhostNet (timm)


class GhostModule(nn.Module):
    """timm GhostModule: primary 1x1 conv, cheap depthwise conv, `cat` and a slice to `out_chs`."""

    def __init__(self, cin: int, cout: int, act: Act = nn.ReLU) -> None:
        super().__init__()
        self.out_chs = cout
        init = math.ceil(cout / 2)
        self.primary_conv = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), act(inplace=True))
        self.cheap_operation = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False),
                                             nn.BatchNorm2d(init), act(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.out_chs, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se_ratio: float) -> None:
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.conv_dw = nn.Conv2d(mid, mid, k, stride, (k - 1) // 2, groups=mid, bias=False) if stride > 1 else None
        self.bn_dw = nn.BatchNorm2d(mid) if stride > 1 else None
        self.se = SqueezeExcite(mid, _make_divisible(mid * se_ratio, 4), gate_layer=nn.Hardsigmoid) if se_ratio else None
        self.ghost2 = GhostModule(mid, cout, act=nn.Identity)
        if cin == cout and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cin, k, stride, (k - 1) // 2, groups=cin, bias=False),
                                          nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


_GHOST = [[(3, 16, 16, 0, 1)], [(3, 48, 24, 0, 2)], [(3, 72, 24, 0, 1)], [(5, 72, 40, 0.25, 2)],
          [(5, 120, 40, 0.25, 1)], [(3, 240, 80, 0, 2)],
          [(3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)],
          [(5, 672, 160, 0.25, 2)],
          [(5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)]]


class GhostNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        cin = _make_divisible(16 * width_mult, 4)
        self.conv_stem = nn.Conv2d(in_channels, cin, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        for cfg in _GHOST:
            layers = []
            for k, exp, c, se, s in cfg:
                cout, mid = _make_divisible(c * width_mult, 4), _make_divisible(exp * width_mult, 4)
                layers.append(GhostBottleneck(cin, mid, cout, k, s, se))
                cin = cout
            stages.append(nn.Sequential(*layers))
        out = _make_divisible(960 * width_mult, 4)
        stages.append(nn.Sequential(ConvNormAct(cin, out, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(out, 1280, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(self.flatten(x))


def ghostnet(in_channels: int = 3, num_classes: int = 10, input_size: int = 64, width_mult: float = 1.0) -> nn.Module:
    return GhostNet(in_channels, num_classes, width_mult)


# ============================================================== RepVGG-A0 (timm ByobNet)


class RepVggBlock(nn.Module):
    """timm RepVggBlock (training form): `conv_1x1(x) + conv_kxk(x)`, plus a BN identity when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(cout, apply_act=False) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, apply_act=False)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, apply_act=False)
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.reparam_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        return self.act(self.attn(x))


class RepVGG(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        widths = [_ch(w, width_mult) for w in (48, 96, 192, 1280)]
        self.stem = RepVggBlock(in_channels, min(_ch(64, width_mult), widths[0]), 2)
        cin, stages = min(_ch(64, width_mult), widths[0]), []
        for depth, w in zip((2, 4, 14, 1), widths):
            stages.append(nn.Sequential(*(RepVggBlock(cin if i == 0 else w, w, 2 if i == 0 else 1) for i in range(depth))))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.final_conv = nn.Identity()
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_conv(self.stages(self.stem(x))))


def repvgg_a0(in_channels: int = 3, num_classes: int = 10, input_size: int = 64, width_mult: float = 1.0) -> nn.Module:
    return RepVGG(in_channels, num_classes, width_mult)


# ============================================================== ShuffleNetV2 x0.5 (torchvision)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """torchvision ShuffleNetV2 InvertedResidual: `chunk` + branch2 + `cat` + channel shuffle."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                                         nn.Conv2d(inp, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        cin = inp if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        widths = [24] + [_make_divisible(c * width_mult, 4) for c in (48, 96, 192)] + [1024]
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for name, repeats, cout in zip(("stage2", "stage3", "stage4"), (4, 8, 4), widths[1:4]):
            setattr(self, name, nn.Sequential(ShuffleUnit(cin, cout, 2), *(ShuffleUnit(cout, cout, 1) for _ in range(repeats - 1))))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, widths[-1], 1, bias=False), nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def shufflenetv2(in_channels: int = 3, num_classes: int = 10, input_size: int = 64, width_mult: float = 1.0) -> nn.Module:
    """ShuffleNetV2 x0.5 (stage widths 48/96/192 times `width_mult`)."""
    return ShuffleNetV2(in_channels, num_classes, width_mult)


# ============================================================== MobileViT-xxs (timm)


class Attention(nn.Module):
    """timm vision_transformer Attention, unfused: `softmax(q @ k.transpose(-2, -1)) @ v`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TransformerBlock(nn.Module):
    """timm vision_transformer Block: pre-norm attention and MLP, each with a residual add."""

    def __init__(self, dim: int, mlp_ratio: float, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.SiLU(), drop1=nn.Dropout(0.0),
                                             fc2=nn.Linear(hidden, dim), drop2=nn.Dropout(0.0)))
        self.drop_path1, self.drop_path2 = DropPath(), DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MobileVitBlock(nn.Module):
    """timm MobileVitBlock: local conv, unfold to patches, transformer, fold back (shape-dependent `if`), fuse."""

    def __init__(self, chs: int, dim: int, depth: int, patch: int = 2) -> None:
        super().__init__()
        self.conv_kxk = ConvNormAct(chs, chs, 3, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.Sequential(*(TransformerBlock(dim, 2.0, 4) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, chs, 1, act_layer=nn.SiLU)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3, act_layer=nn.SiLU)
        self.patch_size, self.patch_area = (patch, patch), patch * patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
        num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w
        num_patches = num_patch_h * num_patch_w
        interpolate = False
        if new_h != H or new_w != W:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
            interpolate = True
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        x = x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3).reshape(B * self.patch_area, num_patches, -1)
        x = self.norm(self.transformer(x))
        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        if interpolate:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        return self.conv_fusion(torch.cat((shortcut, x), dim=1))


class MV2Block(nn.Module):
    """timm ByobNet BottleneckBlock as MobileViT uses it: 1x1 expand, depthwise, linear 1x1, skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float = 4.0) -> None:
        super().__init__()
        mid = _make_divisible(cin * expand)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else None
        self.conv1_1x1 = ConvNormAct(cin, mid, 1, act_layer=nn.SiLU)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride, groups=mid, act_layer=nn.SiLU)
        self.conv3_1x1 = ConvNormAct(mid, cout, 1, apply_act=False)
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return x


class MobileViT(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        c = [_ch(v, width_mult) for v in (16, 24, 48, 64, 80)]
        d = [_ch(v, width_mult) for v in (64, 80, 96)]
        self.stem = ConvNormAct(in_channels, c[0], 3, 2, act_layer=nn.SiLU)
        self.stages = nn.Sequential(
            nn.Sequential(MV2Block(c[0], c[0], 1, 2.0)),
            nn.Sequential(MV2Block(c[0], c[1], 2, 2.0), MV2Block(c[1], c[1], 1, 2.0), MV2Block(c[1], c[1], 1, 2.0)),
            nn.Sequential(MV2Block(c[1], c[2], 2, 2.0), MobileVitBlock(c[2], d[0], 2)),
            nn.Sequential(MV2Block(c[2], c[3], 2, 2.0), MobileVitBlock(c[3], d[1], 4)),
            nn.Sequential(MV2Block(c[3], c[4], 2, 2.0), MobileVitBlock(c[4], d[2], 3)),
        )
        self.final_conv = ConvNormAct(c[4], 4 * c[4], 1, act_layer=nn.SiLU)
        self.head = ClassifierHead(4 * c[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_conv(self.stages(self.stem(x))))


def mobilevit_xxs(in_channels: int = 3, num_classes: int = 10, input_size: int = 64, width_mult: float = 1.0) -> nn.Module:
    return MobileViT(in_channels, num_classes, width_mult)


#: Every family, the mobile ones and those that already worked, for tests and the benchmark: name -> factory.
FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv3_small": mobilenetv3_small, "mobilenetv3_small_timm": mobilenetv3_small_timm,
    "efficientnet_b0": efficientnet_b0, "efficientnet_b0_timm": efficientnet_b0_timm, "ghostnet": ghostnet,
    "repvgg_a0": repvgg_a0, "shufflenetv2": shufflenetv2, "mobilevit_xxs": mobilevit_xxs, **_classic.FAMILIES,
}
resnet18, regnety_400mf, squeezenet, convnext_atto = (_classic.FAMILIES[name] for name in _classic.FAMILIES)
