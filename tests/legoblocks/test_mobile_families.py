"""The mobile families users bring, at 3x64x64: blocks that follow the units, prune what costs, ship safely.

Every family of `mobile_models.py` (written as torchvision / timm write them) must detect
into 4-24 blocks that reproduce the model, with descendants that keep their block's
shapes, save and load without pickle, export to ONNX, and reach a smallest composition of
at most half the model's FLOPs. The constructs get their own tests: timm's BatchNormAct2d,
SE gates, RepVGG branches, Ghost and ShuffleNet units, MobileViT's export capture.
Widths are scaled down so each family takes a few seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from legoblocks.capture import capture_graph
from legoblocks.coupling import coupling_by_windows
from legoblocks.descend import make_descendants
from legoblocks.detect import InputShapeError, count_flops, detect_blocks, verify_chain
from legoblocks.reshapes import record_shapes, repair_reshapes, resized_widths
from legoblocks.serialize import load_module, save_module

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
              pytest.mark.filterwarnings("ignore:The feature will be removed")]

MODELS = Path(__file__).with_name("mobile_models.py")
SHAPE = (3, 64, 64)
# Narrow enough to be quick, wide enough that rounding leaves channels to prune.
WIDTH = {"repvgg_a0": 0.25, "resnet18": 0.25, "convnext_atto": 0.5, "regnety_400mf": 0.5, "efficientnet_b0": 0.5,
         "efficientnet_b0_timm": 0.5, "ghostnet": 0.5, "mobilevit_xxs": 0.5, "squeezenet": 0.5}
FAMILIES = ["mobilenetv3_small", "mobilenetv3_small_timm", "efficientnet_b0", "efficientnet_b0_timm", "ghostnet",
            "repvgg_a0", "shufflenetv2", "mobilevit_xxs", "resnet18", "regnety_400mf", "squeezenet", "convnext_atto"]


@pytest.fixture(scope="module")
def zoo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("legodnn_test_mobile_models", MODELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(zoo: ModuleType, name: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.FAMILIES[name](width_mult=WIDTH.get(name, 1.0)).eval()


def _onnx_roundtrip(module: nn.Module, x: torch.Tensor) -> None:
    """Export with the TorchScript exporter and, where onnxruntime is installed, compare outputs."""
    onnx = pytest.importorskip("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}})
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    try:
        import onnxruntime as ort
    except ImportError:
        return
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), module(x), atol=1e-4)


def test_every_family_is_listed(zoo: ModuleType) -> None:
    assert sorted(zoo.FAMILIES) == sorted(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_detects_verifies_scales_and_ships(name: str, zoo: ModuleType, tmp_path: Path) -> None:
    model = _build(zoo, name)
    blocked = detect_blocks(model, SHAPE)
    assert 4 <= len(blocked.specs) <= 24, blocked.names
    assert verify_chain(model, blocked) < 1e-5
    assert sum(s.flops for s in blocked.specs) == count_flops(model, SHAPE)
    smallest = 0
    for spec, block in zip(blocked.specs, blocked.blocks):
        x = torch.randn(2, *spec.in_shape)
        variants = make_descendants(block, spec.in_shape, [0.0, 0.8]) if spec.scalable else {"0.0": block}
        for cid, variant in variants.items():
            before = x.clone()
            with torch.no_grad():
                y = variant(x)
            assert tuple(y.shape[1:]) == spec.out_shape, f"{spec.name}@{cid}"
            assert torch.equal(x, before), f"{spec.name}@{cid} overwrote its input (the previous block's output)"
            path = tmp_path / f"{spec.name}-{cid}.safetensors"
            save_module(variant, path)
            with torch.no_grad():
                assert torch.allclose(load_module(path)(x), y, atol=1e-6), f"{spec.name}@{cid} after loading"
        if spec.scalable:
            assert "0.8" in variants or spec.flops == 0 or len(variants) == 1
        smallest += min(count_flops(v, spec.in_shape) for v in variants.values())
    total = sum(s.flops for s in blocked.specs)
    assert smallest <= 0.5 * total, f"smallest composition {smallest / total:.1%} of the FLOPs"


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilenetv3_small_timm", "shufflenetv2", "repvgg_a0"])
def test_blocks_and_descendants_export_to_onnx(name: str, zoo: ModuleType) -> None:
    pytest.importorskip("onnx")
    model = _build(zoo, name)
    blocked = detect_blocks(model, SHAPE)
    for spec, block in zip(blocked.specs, blocked.blocks):
        x = torch.randn(2, *spec.in_shape)
        variants = make_descendants(block, spec.in_shape, [0.0, 0.8]) if spec.scalable else {"0.0": block}
        for variant in variants.values():
            _onnx_roundtrip(variant, x)


def test_timm_norm_act_layers_become_batchnorm_modules_pruned_with_their_statistics(zoo: ModuleType) -> None:
    """The issue's failure: BatchNormAct2d's F.batch_norm left functional lost its running stats to pruning."""
    model = _build(zoo, "mobilenetv3_small_timm")
    gm = capture_graph(model, SHAPE).graph_module
    assert not any(n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm) for n in gm.graph.nodes)
    assert not any(n.op == "call_function" and n.target is torch._assert for n in gm.graph.nodes)
    norms = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    blocked = detect_blocks(model, SHAPE)
    spec, block = next((s, b) for s, b in zip(blocked.specs, blocked.blocks) if s.name == "blocks.1.0")
    pruned = make_descendants(block, spec.in_shape, [0.0, 0.2])["0.2"]
    for bn in (m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.running_mean.shape == bn.weight.shape == (bn.num_features,)


def test_inverted_residual_prunes_its_expansion_with_depthwise_and_se(zoo: ModuleType) -> None:
    model = _build(zoo, "mobilenetv3_small")
    blocked = detect_blocks(model, SHAPE)
    assert "features.4" in blocked.names  # one block per inverted residual, SE inside it
    i = blocked.names.index("features.4")
    original, spec = blocked.blocks[i], blocked.specs[i]
    pruned = make_descendants(original, spec.in_shape, [0.0, 0.5])["0.5"]
    expand, dw, fc1, fc2, project = (pruned.get_submodule(p) for p in (
        "features.4.block.0.0", "features.4.block.1.0", "features.4.block.2.fc1", "features.4.block.2.fc2",
        "features.4.block.3.0"))
    hidden = original.get_submodule("features.4.block.0.0").out_channels
    assert expand.out_channels == dw.out_channels == dw.groups == fc1.in_channels == fc2.out_channels \
        == project.in_channels == math.ceil(hidden * 0.5)
    assert fc1.out_channels < original.get_submodule("features.4.block.2.fc1").out_channels  # the squeeze too
    assert project.out_channels == original.get_submodule("features.4.block.3.0").out_channels


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def test_repvgg_blocks_span_whole_stages_and_pruned_units_still_reparameterize(zoo: ModuleType) -> None:
    model = _build(zoo, "repvgg_a0")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the fused check means something
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    blocked = detect_blocks(model, SHAPE)
    # The identity branches tie a stage's channels together: blocks span a stage plus both transitions.
    assert blocked.names == ["stem", "stages.0.0-1.0", "stages.1.1-3.0", "head"]
    spec, block = blocked.specs[2], blocked.blocks[2]
    pruned = make_descendants(block, spec.in_shape, [0.0, 0.6])["0.6"]
    unit = "stages.2.5"  # a unit with all three branches
    kxk, kbn = pruned.get_submodule(f"{unit}.conv_kxk.conv"), pruned.get_submodule(f"{unit}.conv_kxk.bn.bn")
    one, obn = pruned.get_submodule(f"{unit}.conv_1x1.conv"), pruned.get_submodule(f"{unit}.conv_1x1.bn.bn")
    ident = pruned.get_submodule(f"{unit}.identity.bn")
    width = block.get_submodule(f"{unit}.conv_kxk.conv").out_channels
    assert kxk.in_channels == kxk.out_channels == one.in_channels == one.out_channels == ident.num_features < width
    x = torch.randn(2, kxk.in_channels, 4, 4)
    with torch.no_grad():
        branches = kbn(kxk(x)) + obn(one(x)) + ident(x)
        w3, b3 = _fuse(kxk, kbn)
        w1, b1 = _fuse(one, obn)
        scale = ident.weight / torch.sqrt(ident.running_var + ident.eps)
        wi = torch.zeros_like(w3)
        wi[torch.arange(len(scale)), torch.arange(len(scale)), 1, 1] = scale
        weight = w3 + F.pad(w1, [1, 1, 1, 1]) + wi
        bias = b3 + b1 + ident.bias - ident.running_mean * scale
        assert torch.allclose(F.conv2d(x, weight, bias, padding=1), branches, atol=1e-4)


def test_ghost_and_shuffle_units_prune_their_inner_channels(zoo: ModuleType) -> None:
    ghost = detect_blocks(_build(zoo, "ghostnet"), SHAPE)
    i = ghost.names.index("blocks.6.1")
    block, spec = ghost.blocks[i], ghost.specs[i]
    pruned = make_descendants(block, spec.in_shape, [0.0, 0.5])["0.5"]
    primary = "blocks.6.1.ghost1.primary_conv.0"
    assert pruned.get_submodule(primary).out_channels < block.get_submodule(primary).out_channels
    cheap = pruned.get_submodule("blocks.6.1.ghost1.cheap_operation.0")
    assert cheap.groups == cheap.out_channels == pruned.get_submodule(primary).out_channels
    assert pruned.get_submodule("blocks.6.1.ghost2.primary_conv.0").in_channels == 2 * cheap.out_channels

    shuffle = detect_blocks(_build(zoo, "shufflenetv2"), SHAPE)
    i = shuffle.names.index("stage3.2")
    block, spec = shuffle.blocks[i], shuffle.specs[i]
    pruned = make_descendants(block, spec.in_shape, [0.0, 0.5])["0.5"]
    first, dw, last = (f"stage3.2.branch2.{k}" for k in (0, 3, 5))
    assert pruned.get_submodule(first).out_channels == pruned.get_submodule(dw).groups \
        == pruned.get_submodule(last).in_channels < block.get_submodule(first).out_channels
    assert pruned.get_submodule(last).out_channels == block.get_submodule(last).out_channels


def test_mobilevit_is_captured_by_export_and_prunes_mlp_and_transformer_width(zoo: ModuleType) -> None:
    model = _build(zoo, "mobilevit_xxs")
    captured = capture_graph(model, SHAPE)
    assert captured.method == "export"  # `if new_h != H` on shapes: fx cannot trace it
    assert all(not isinstance(n.target, torch._ops.OpOverload) for n in captured.graph_module.graph.nodes)
    blocked = detect_blocks(model, SHAPE)
    assert "stages.3.1" in blocked.names  # the MobileViT block is one block
    i = blocked.names.index("stages.3.1")
    block, spec = blocked.blocks[i], blocked.specs[i]
    pruned = make_descendants(block, spec.in_shape, [0.0, 0.5])["0.5"]
    fc1, qkv = "stages.3.1.transformer.0.mlp.fc1", "stages.3.1.transformer.0.attn.qkv"
    assert pruned.get_submodule(fc1).out_features < block.get_submodule(fc1).out_features  # MLP hidden width
    assert pruned.get_submodule(qkv).in_features < block.get_submodule(qkv).in_features  # transformer width
    assert pruned.get_submodule(qkv).out_features == block.get_submodule(qkv).out_features  # heads kept whole
    assert any(-1 in (n.args[1] if isinstance(n.args[1], (list, tuple)) else ())
               for n in pruned.graph.nodes if n.target is torch.reshape)


def test_reshape_repair_infers_the_size_that_carries_the_channels() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("conv", (x,))
    z = graph.call_function(torch.reshape, (y, [16, 4, 4]))  # 2 x 8 channels folded into the first size
    graph.output(graph.call_method("sum", (z,)))
    gm = fx.GraphModule({"conv": nn.Conv2d(4, 8, 1)}, graph)
    x_in = torch.randn(2, 4, 4, 4)
    shapes = record_shapes(gm, x_in)
    before = copy.deepcopy(gm)
    gm.conv = nn.Conv2d(4, 6, 1)  # what pruning two output channels leaves
    with pytest.raises(RuntimeError):
        gm.forward(x_in)
    assert resized_widths(before, gm) == {(8, 6)}
    assert repair_reshapes(gm, x_in, shapes, resized_widths(before, gm))
    assert z.args[1] == [-1, 4, 4]  # 16 = 2 x 8 channels, not the 4s that 6/8 also divides
    assert gm(x_in).shape == ()
    z.args = (y, [-1, 5, 4])  # already inferring a size, and still wrong: no guess
    gm.recompile()
    assert not repair_reshapes(gm, x_in, shapes, {(8, 6)})


def test_whole_model_analysis_falls_back_to_windows_of_units(zoo: ModuleType) -> None:
    model = _build(zoo, "shufflenetv2")
    blocked = detect_blocks(model, SHAPE)
    units = [(b, s.in_shape, s.out_shape) for b, s in zip(blocked.blocks[1:6], blocked.specs[1:6])]

    def window(i: int, j: int):
        chain = fx.symbolic_trace(nn.Sequential(*(u[0] for u in units[i:j])))
        return chain, units[i][1], units[j - 1][2]

    coupling = coupling_by_windows(window, len(units), {})
    assert coupling.members  # the inner branch channels of every unit are found
    assert all(len(set(names)) >= 2 for names in coupling.members.values())


def test_capture_gives_plain_module_paths_and_long_chains_are_cut_to_twenty(zoo: ModuleType, tmp_path: Path) -> None:
    gm = capture_graph(_build(zoo, "regnety_400mf"), SHAPE).graph_module
    assert not any("-" in name for name, _ in gm.named_modules())  # torchvision names units "block1-0"
    blocked = detect_blocks(_build(zoo, "regnety_400mf"), SHAPE)
    assert "trunk_output.block2.block2-1" in blocked.names  # block names keep the model's own names
    save_module(blocked.blocks[2], tmp_path / "b.safetensors")
    from legoblocks.zoo import build_zoo_model

    resnet56 = build_zoo_model("resnet56", width=4)
    assert len(detect_blocks(resnet56, (1, 28, 28)).specs) == 20


def test_the_device_side_modules_do_not_load_torch_pruning() -> None:
    """Loading and switching blocks (serialize, compose) must not need the pruning library."""
    code = ("import sys, legoblocks.compose, legoblocks.serialize, legoblocks.detect\n"
            "assert 'torch_pruning' not in sys.modules, 'torch_pruning loaded'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr


class _PadToPatches(nn.Module):
    """`if x.shape[-1] % p:` on shapes, as MobileViT-style code pads to whole patches: fx cannot trace it."""

    def __init__(self, channels: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.ReLU(), nn.Conv2d(2 * channels, channels, 1))
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] % self.patch:
            x = F.pad(x, (0, self.patch - x.shape[-1] % self.patch, 0, self.patch - x.shape[-2] % self.patch))
        x = x + self.body(x)
        return self.fc(x.mean((2, 3)))


def test_shape_dependent_if_is_captured_by_export_and_a_wrong_shape_is_named() -> None:
    model = _PadToPatches().eval()
    for shape in ((3, 36, 36), (3, 32, 32)):  # padded, and not
        assert capture_graph(model, shape).method == "export"
        blocked = detect_blocks(model, shape)
        assert verify_chain(model, blocked) < 1e-5
        assert len(blocked.specs) >= 3
    with pytest.raises(InputShapeError, match=r"input_shape \(1, 36, 36\) does not fit.*'stem.0'"):
        detect_blocks(model, (1, 36, 36))
