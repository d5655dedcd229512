"""Safe module files: exact round trips, and refusal of anything outside the allow-lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx, nn

from legoblocks.serialize import SPEC_KEY, UnsafeFileError, load_module, save_module
from legoblocks.zoo import build_zoo_model

pytestmark = pytest.mark.usefixtures("single_thread")


class ConcatNet(nn.Module):
    """A small CNN with a concat branch, a parameter read by get_attr and shape arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())
        self.right = nn.Conv2d(1, 3, 1, stride=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 7).view(1, 7, 1, 1))
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, 7).view(1, 7, 1, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(7, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.left(x), F.leaky_relu(self.right(x), 0.1)], dim=1) * self.scale + self.shift
        y = y - torch.arange(7.0).view(1, 7, 1, 1) / 100  # a tensor constant made while tracing
        y = self.pool(y)[..., 1:, ::2].to(torch.float32)
        y = y.reshape(x.shape[0], 7, -1).unsqueeze(-1)
        return self.head(y).view(x.size(0), -1)


def _residual(residual_block_cls) -> fx.GraphModule:
    torch.manual_seed(0)
    block = residual_block_cls(8, 8)
    _randomize_bn(block)
    return fx.symbolic_trace(block)


def _randomize_bn(module: nn.Module) -> None:
    """Non-trivial BatchNorm state, so a lost buffer would change the output."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _round_trip(module: nn.Module, path: Path) -> fx.GraphModule:
    save_module(module, path)
    return load_module(path)


def test_residual_block_round_trip_is_exact(residual_block_cls, tmp_path: Path) -> None:
    gm = _residual(residual_block_cls).eval()
    loaded = _round_trip(gm, tmp_path / "block.safetensors")
    x = torch.randn(4, 8, 14, 14)
    assert torch.equal(gm(x), loaded(x))
    assert not loaded.training
    assert set(loaded.state_dict()) == set(gm.state_dict())


def test_concat_cnn_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ConcatNet()
    _randomize_bn(net)
    net.eval()
    loaded = _round_trip(net, tmp_path / "net.safetensors")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(net(x), loaded(x))
    assert isinstance(loaded.scale, nn.Parameter)  # the get_attr parameter stays a parameter
    assert "shift" in dict(loaded.named_buffers()) and "_tensor_constant0" in loaded.state_dict()


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "mobilenetv2"])
def test_zoo_models_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_zoo_model(name).eval()
    _randomize_bn(model)
    loaded = _round_trip(model, tmp_path / f"{name}.safetensors")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


def test_block_pruned_in_place_by_torch_pruning_round_trips(residual_block_cls, tmp_path: Path) -> None:
    """Torch-Pruning edits weights and attributes in place; the file follows the weights."""
    gm = _residual(residual_block_cls)
    x = torch.randn(2, 8, 14, 14)
    graph = tp.DependencyGraph().build_dependency(gm, example_inputs=x)
    graph.get_pruning_group(gm.conv1, tp.prune_conv_out_channels, idxs=[0, 2, 5]).prune()
    gm.eval()
    assert gm.conv1.weight.shape[0] == 5 and gm.conv2.weight.shape[1] == 5
    loaded = _round_trip(gm, tmp_path / "pruned.safetensors")
    assert loaded.conv1.out_channels == 5 and loaded.bn1.num_features == 5
    assert torch.equal(gm(x), loaded(x))


def test_mixed_train_eval_modes_come_back(residual_block_cls, tmp_path: Path) -> None:
    gm = _residual(residual_block_cls).train()
    gm.bn1.eval()  # a frozen BatchNorm inside a block that is otherwise training
    loaded = _round_trip(gm, tmp_path / "mixed.safetensors")
    assert loaded.training and loaded.conv1.training and loaded.bn2.training
    assert not loaded.bn1.training


def test_loaded_module_traces_and_trains(residual_block_cls, tmp_path: Path) -> None:
    loaded = _round_trip(_residual(residual_block_cls).train(), tmp_path / "b.safetensors")
    assert loaded.training  # the saved mode comes back
    retraced = fx.symbolic_trace(loaded)
    x, target = torch.randn(8, 8, 6, 6), torch.randn(8, 8, 6, 6)
    loaded.eval()
    assert torch.equal(retraced.eval()(x), loaded(x))
    loaded.train()
    assert all(p.requires_grad for p in loaded.parameters())
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    first = F.mse_loss(loaded(x), target)
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(loaded(x), target)
        loss.backward()
        opt.step()
    assert F.mse_loss(loaded(x), target) < first


class _Payload:
    """Unpickling this creates the marker file: the proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zipfile", [True, False])
def test_planted_pickle_is_refused_and_never_runs(tmp_path: Path, zipfile: bool) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "block.safetensors"
    torch.save({"weight": _Payload(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeFileError, match="never unpickled"):
        load_module(path)
    assert not marker.exists()


def _rewrite_spec(src: Path, dst: Path, edit) -> None:
    with safe_open(str(src), "pt") as fh:
        spec = json.loads(fh.metadata()[SPEC_KEY])
    edit(spec)
    save_file(load_file(str(src)), str(dst), metadata={SPEC_KEY: json.dumps(spec)})


def _node(spec: dict, op: str) -> dict:
    return next(n for n in spec["nodes"] if n["op"] == op)


@pytest.fixture()
def saved_block(residual_block_cls, tmp_path: Path) -> Path:
    """A residual block saved with a functional relu, so the spec has a call_function node."""

    class FunctionalBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv(x)).view(x.size(0), -1)

    path = tmp_path / "ok.safetensors"
    save_module(FunctionalBlock(), path)
    return path


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.run", "torch.load", "operator.attrgetter"])
def test_forbidden_function_is_refused(saved_block: Path, tmp_path: Path, target: str) -> None:
    bad = tmp_path / "bad.safetensors"
    _rewrite_spec(saved_block, bad, lambda s: _node(s, "call_function").update(target=target))
    with pytest.raises(UnsafeFileError, match=f"calls function '{target}', which is not in the allow-list"):
        load_module(bad)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda s: _node(s, "call_method").update(target="register_hook"), "not an allowed Tensor method"),
        (lambda s: _node(s, "call_method").update(target="__reduce_ex__"), "not an allowed Tensor method"),
        (lambda s: s["modules"]["conv"].update(type="Module"), "type 'Module', which is not in the allow-list"),
        (lambda s: _node(s, "placeholder").update(target="x, y=__import__('os')"), "not a plain Python identifier"),
        (lambda s: s["modules"].update({"__class__": s["modules"].pop("conv")}), "forbidden component '__class__'"),
        (lambda s: _node(s, "call_function").update(
            target="builtins.getattr", args={"tuple": [{"node": "x"}, "__class__"]}
        ), "reads something other than a public Tensor attribute"),
        (lambda s: _node(s, "call_function").update(args={"tuple": [{"dtype": "load"}]}), "not a torch dtype"),
        (lambda s: _node(s, "call_function").update(
            kwargs={"dict": [["inplace=False) or __import__('os').getpid() or (0", False]]}
        ), "keyword argument"),
    ],
)
def test_specs_outside_the_allow_lists_are_refused(saved_block: Path, tmp_path: Path, edit, fragment: str) -> None:
    bad = tmp_path / "bad.safetensors"
    _rewrite_spec(saved_block, bad, edit)
    with pytest.raises(UnsafeFileError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_module(bad)


def test_structural_mismatches_are_named(saved_block: Path, tmp_path: Path) -> None:
    tensors = load_file(str(saved_block))
    with safe_open(str(saved_block), "pt") as fh:
        meta = fh.metadata()
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != "conv.bias"}, r"missing \['conv.bias'\]"),
        "extra": ({**tensors, "conv.sneaky": torch.zeros(1)}, r"unexpected \['conv.sneaky'\]"),
        "shape": ({**tensors, "conv.weight": torch.zeros(4, 4, 5, 5)}, r"conv.weight \(4, 4, 5, 5\) vs \(4, 4, 3, 3\)"),
    }
    for name, (state, fragment) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata=meta)
        with pytest.raises(ValueError, match=fragment):
            load_module(path)
    dangling = tmp_path / "dangling.safetensors"
    _rewrite_spec(saved_block, dangling, lambda s: _node(s, "call_module").update(args={"tuple": [{"node": "later"}]}))
    with pytest.raises(ValueError, match="refers to node 'later' before it is defined"):
        load_module(dangling)
    wrong_args = tmp_path / "kwargs.safetensors"
    _rewrite_spec(saved_block, wrong_args, lambda s: s["modules"]["conv"]["kwargs"]["dict"].pop())
    with pytest.raises(ValueError, match="constructor arguments"):
        load_module(wrong_args)


def _set_kwarg(entry: dict, key: str, value) -> None:
    entry["kwargs"]["dict"] = [[k, value if k == key else v] for k, v in entry["kwargs"]["dict"]]


def test_huge_sizes_in_a_spec_are_checked_before_allocating(saved_block: Path, tmp_path: Path) -> None:
    """360 GB of conv weights claimed by the spec: refused by shape, never allocated."""
    bad = tmp_path / "huge.safetensors"

    def edit(spec: dict) -> None:
        _set_kwarg(spec["modules"]["conv"], "in_channels", 100_000)
        _set_kwarg(spec["modules"]["conv"], "out_channels", 100_000)

    _rewrite_spec(saved_block, bad, edit)
    with pytest.raises(ValueError, match=r"conv.weight \(4, 4, 3, 3\) vs \(100000, 100000, 3, 3\)"):
        load_module(bad)
    malformed = tmp_path / "malformed.safetensors"
    _rewrite_spec(saved_block, malformed, lambda s: s["modules"]["conv"].update(kwargs={"dict": 5}))
    with pytest.raises(ValueError, match="malformed module spec"):
        load_module(malformed)


def test_plain_safetensors_without_spec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UnsafeFileError, match="without a 'legodnn.spec' module spec"):
        load_module(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UnsafeFileError, match="header is not JSON"):
        load_module(junk)


def test_unsavable_modules_get_clear_errors(tmp_path: Path) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="torch.fx cannot trace it"):
        save_module(DataDependent(), tmp_path / "a.safetensors")

    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    with pytest.raises(ValueError, match=r"module 'rnn' of type torch.nn.modules.rnn.GRU: it is not in the allow-list"):
        save_module(WithLSTM(), tmp_path / "b.safetensors")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_detected_blocks_and_their_descendants_round_trip(tmp_path: Path) -> None:
    """What the pipeline stores: blocks cut from a zoo model and their pruned descendants."""
    from legoblocks.descend import make_descendants
    from legoblocks.detect import detect_blocks

    torch.manual_seed(0)
    model = build_zoo_model("resnet20", width=8).eval()
    _randomize_bn(model)
    blocked = detect_blocks(model, (1, 28, 28))
    x = torch.randn(2, 1, 28, 28)
    y = x
    for spec, block in zip(blocked.specs, blocked.blocks):
        loaded = _round_trip(block, tmp_path / f"{spec.name}.safetensors")
        out = block(y)
        assert torch.equal(loaded(y), out), spec.name
        y = out
    assert torch.equal(y, model(x))
    index = next(i for i, s in enumerate(blocked.specs) if s.scalable)
    spec, block = blocked.specs[index], blocked.blocks[index]
    feature = torch.randn(2, *spec.in_shape)
    for choice, desc in make_descendants(block, spec.in_shape, (0.0, 0.5)).items():
        loaded = _round_trip(desc, tmp_path / f"{spec.name}-{choice}.safetensors")
        assert torch.equal(loaded(feature), desc(feature)), choice
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in desc.parameters())
