"""The model zoo: every model builds for 1x28x28 and 3x32x32 and has the published shape."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from legoblocks.zoo import ZOO, build_zoo_model, mobilenetv2, resnet, vgg

# Tiny widths keep the forward passes cheap; structure does not depend on width.
TINY = {"resnet20": {"width": 4}, "resnet32": {"width": 4}, "resnet56": {"width": 4},
        "vgg11": {"width": 8}, "vgg16": {"width": 8}, "mobilenetv2": {"width_mult": 0.25}}


def test_zoo_lists_the_contract_names() -> None:
    assert set(ZOO) == {"resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "mobilenetv2"}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_zoo_model_runs_and_traces(name: str, shape: tuple[int, int, int]) -> None:
    model = build_zoo_model(name, in_channels=shape[0], num_classes=7, input_size=shape[1], **TINY[name]).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = model(x)
        traced = fx.symbolic_trace(model)(x)
    assert out.shape == (2, 7)
    assert torch.equal(out, traced)


def test_resnet_parameter_counts_match_the_paper() -> None:
    # He et al. 2016, CIFAR-10 with option-A shortcuts: ResNet-20 0.27M, ResNet-56 0.85M.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(resnet(20, in_channels=3, shortcut="A")) == 269_722
    assert count(resnet(56, in_channels=3, shortcut="A")) == 853_018
    # Option B adds the 1x1 projection convs on the two down-sampling shortcuts.
    assert count(resnet(20, in_channels=3, shortcut="B")) > 269_722


def test_resnet_depth_and_width_are_configurable() -> None:
    m = resnet(depth=32, width=8)
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == 5
    assert m.layer3[0].conv1.out_channels == 32
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet(depth=21)
    with pytest.raises(ValueError, match="shortcut"):
        resnet(shortcut="C")


def test_vgg_drops_pools_that_small_inputs_cannot_take() -> None:
    pools = lambda m: sum(isinstance(x, torch.nn.MaxPool2d) for x in m.features)  # noqa: E731
    assert pools(vgg("vgg11", width=8, input_size=28)) == 4  # 28 -> 14 -> 7 -> 3 -> 1
    assert pools(vgg("vgg11", width=8, input_size=32)) == 5  # 32 -> ... -> 1
    convs = [x.out_channels for x in vgg("vgg16", width=16).features if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 13 and convs[0] == 16 and convs[-1] == 128  # width scales every stage


def test_mobilenetv2_width_multiplier_scales_channels() -> None:
    small, big = mobilenetv2(width_mult=0.5), mobilenetv2(width_mult=1.0)
    assert small.stem[0].out_channels == 16 and big.stem[0].out_channels == 32
    assert sum(u.use_residual for u in big.features) == 10  # 17 inverted residuals, 10 with a skip


def test_unknown_zoo_name_and_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'resnet18'.*resnet20"):
        build_zoo_model("resnet18")
    with pytest.raises(TypeError, match="bad options for zoo model 'vgg11'"):
        build_zoo_model("vgg11", width_mult=2)
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        build_zoo_model("resnet20", in_channels=0)
