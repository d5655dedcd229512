"""ScalableModel (selections, composition, save/load) and BlockSwitcher (swap only what changed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from legoblocks.compose import BlockSwitcher, ScalableModel, module_nbytes
from legoblocks.detect import detect_blocks
from legoblocks.modelref import load_model
from legoblocks.zoo import build_zoo_model

MODELS = Path(__file__).with_name("models_for_tests.py")
SHAPE = (1, 28, 28)


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a lost buffer would show in the outputs."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="module")
def resnet_model() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(build_zoo_model("resnet20", width=4)).eval()


@pytest.fixture(scope="module")
def scalable(resnet_model: nn.Module) -> ScalableModel:
    blocked = detect_blocks(resnet_model, SHAPE)
    return ScalableModel.from_blocked(blocked, ladder=[0.0, 0.25, 0.5], model_ref="resnet20")


def test_selections_choices_and_option_count(scalable: ScalableModel) -> None:
    names = scalable.block_names
    assert names[0] == "stem" and names[-1] == "head" and len(names) == 11
    assert scalable.choices("stem") == ["0.0"]
    assert scalable.choices("layer2.1") == ["0.0", "0.25", "0.5"]
    assert scalable.num_options() == 3**9
    assert scalable.original_selection() == ["0.0"] * 11
    assert scalable.smallest_selection() == ["0.0"] + ["0.5"] * 9 + ["0.0"]
    by_dict = {n: ("0.25" if n == "layer1.0" else 0.0) for n in names}
    assert scalable.normalize_selection(by_dict) == ["0.0", "0.25"] + ["0.0"] * 9


def test_bad_selections_name_the_problem(scalable: ScalableModel) -> None:
    with pytest.raises(ValueError, match="missing \\['head'\\]"):
        scalable.normalize_selection({n: "0.0" for n in scalable.block_names[:-1]})
    with pytest.raises(ValueError, match="has 2 choices but the model has 11 blocks"):
        scalable.normalize_selection(["0.0", "0.0"])
    with pytest.raises(ValueError, match="block 'stem' has no choice '0.5'"):
        scalable.normalize_selection(["0.5"] + ["0.0"] * 10)
    with pytest.raises(ValueError, match="not canonical; write '0.5'"):
        scalable.normalize_selection(["0.0", "0.50"] + ["0.0"] * 9)
    with pytest.raises(TypeError, match="list of choice ids"):
        scalable.normalize_selection("0.0")


def test_compose_returns_fresh_eval_copies(scalable: ScalableModel, resnet_model: nn.Module) -> None:
    x = torch.randn(4, *SHAPE)
    original = scalable.compose(scalable.original_selection())
    assert not original.training
    with torch.no_grad():
        assert torch.allclose(original(x), resnet_model(x), atol=1e-5)
        small = scalable.compose(scalable.smallest_selection())
        assert small(x).shape == (4, 10)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in original.parameters())
    assert original[1] is not scalable.variant("layer1.0", "0.0")
    with torch.no_grad():
        for p in original.parameters():
            p.zero_()
    assert any(p.abs().sum() > 0 for p in scalable.variant("layer1.0", "0.0").parameters())


def test_constructor_checks_the_variants(scalable: ScalableModel) -> None:
    variants = {n: dict(scalable.variants[n]) for n in scalable.block_names}
    del variants["layer1.0"]["0.0"]
    with pytest.raises(ValueError, match="no original choice '0.0'"):
        ScalableModel(scalable.specs, variants, SHAPE)
    variants = {n: dict(scalable.variants[n]) for n in scalable.block_names}
    variants["stem"]["0.5"] = variants["stem"]["0.0"]
    with pytest.raises(ValueError, match="'stem' is not scalable"):
        ScalableModel(scalable.specs, variants, SHAPE)


def test_save_load_round_trip_gives_identical_outputs(scalable: ScalableModel, tmp_path: Path) -> None:
    target = scalable.save(tmp_path / "scalable")
    meta = json.loads((target / "scalable.json").read_text())
    assert meta["schema"] == 1 and meta["model_ref"] == "resnet20" and meta["input_shape"] == [1, 28, 28]
    assert meta["choices"]["layer1.0"] == ["0.0", "0.25", "0.5"]
    assert (target / "layer3.2" / "0.5.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    loaded = ScalableModel.load(target)
    assert loaded.specs == scalable.specs and loaded.block_names == scalable.block_names
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        for sel in (scalable.original_selection(), scalable.smallest_selection(),
                    ["0.0"] + ["0.25", "0.5", "0.0"] * 3 + ["0.0"]):
            assert torch.equal(scalable.compose(sel)(x), loaded.compose(sel)(x))

    scalable.save(target)  # replacing a saved model in place works
    assert ScalableModel.load(target).num_options() == scalable.num_options()


def test_save_refuses_to_overwrite_a_foreign_directory(scalable: ScalableModel, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved ScalableModel"):
        scalable.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_load_refuses_path_escapes_in_the_manifest(scalable: ScalableModel, tmp_path: Path) -> None:
    target = scalable.save(tmp_path / "s")
    meta = json.loads((target / "scalable.json").read_text())
    meta["blocks"][0]["name"] = "../evil"
    meta["choices"]["../evil"] = meta["choices"].pop("stem")
    (target / "scalable.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a safe file name"):
        ScalableModel.load(target)
    with pytest.raises(FileNotFoundError, match="scalable.json is missing"):
        ScalableModel.load(tmp_path)


def test_concat_model_descends_composes_and_round_trips(tmp_path: Path) -> None:
    model = _randomize_bn(load_model(f"{MODELS}:concat_net")).eval()
    sm = ScalableModel.from_blocked(detect_blocks(model, SHAPE))
    loaded = ScalableModel.load(sm.save(tmp_path / "cat"))
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        sel = sm.smallest_selection()
        assert sel == ["0.0", "0.8", "0.8", "0.0"]
        assert torch.equal(sm.compose(sel)(x), loaded.compose(sel)(x))


def test_switching_one_block_loads_exactly_that_block(scalable: ScalableModel) -> None:
    calls: list[tuple[str, str]] = []

    def source(block: str, choice: str) -> nn.Module:
        calls.append((block, choice))
        return copy.deepcopy(scalable.variant(block, choice))

    switcher = BlockSwitcher(source, scalable.block_names, scalable.original_selection())
    assert len(calls) == 11
    live = list(switcher.model)
    calls.clear()

    new = scalable.original_selection()
    new[5] = "0.5"  # layer2.1
    report = switcher.switch(new)
    assert calls == [("layer2.1", "0.5")]
    assert report.changed == [("layer2.1", "0.0", "0.5")]
    assert report.bytes_loaded == module_nbytes(scalable.variant("layer2.1", "0.5")) > 0
    assert report.seconds >= 0
    assert switcher.selection == new
    assert [m is old for m, old in zip(switcher.model, live)] == [i != 5 for i in range(11)]
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(switcher.model(x), scalable.compose(new)(x))

    calls.clear()
    again = switcher.switch({n: c for n, c in zip(scalable.block_names, new)})
    assert calls == [] and again.changed == [] and again.bytes_loaded == 0


def test_failed_switch_leaves_the_live_model_as_it_was(scalable: ScalableModel) -> None:
    def source(block: str, choice: str) -> nn.Module:
        if block == "layer3.0" and choice == "0.5":
            raise OSError("disk gone")
        return copy.deepcopy(scalable.variant(block, choice))

    switcher = BlockSwitcher(source, scalable.block_names, scalable.original_selection())
    live = list(switcher.model)
    sel = ["0.0"] + ["0.5"] * 9 + ["0.0"]
    with pytest.raises(OSError, match="disk gone"):
        switcher.switch(sel)
    assert switcher.selection == scalable.original_selection()
    assert all(m is old for m, old in zip(switcher.model, live))


def test_switcher_from_saved_files(scalable: ScalableModel, tmp_path: Path) -> None:
    from legoblocks.serialize import load_module

    root = scalable.save(tmp_path / "s")
    switcher = BlockSwitcher(lambda b, c: load_module(root / b / f"{c}.safetensors"),
                             scalable.block_names, scalable.original_selection())
    report = switcher.switch(scalable.smallest_selection())
    assert len(report.changed) == 9
    assert report.bytes_loaded == sum(module_nbytes(scalable.variant(b, c)) for b, _, c in report.changed)


@pytest.mark.parametrize(("name", "kwargs"), [("vgg11", {"width": 8}), ("mobilenetv2", {"width_mult": 0.25}),
                                              ("resnet20", {"width": 4, "shortcut": "A"})])
def test_other_zoo_models_round_trip(name: str, kwargs: dict, tmp_path: Path) -> None:
    model = _randomize_bn(build_zoo_model(name, **kwargs)).eval()
    sm = ScalableModel.from_blocked(detect_blocks(model, SHAPE), ladder=[0.0, 0.5], model_ref=name)
    loaded = ScalableModel.load(sm.save(tmp_path / name))
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        for sel in (sm.original_selection(), sm.smallest_selection()):
            assert torch.equal(sm.compose(sel)(x), loaded.compose(sel)(x))
        assert torch.allclose(loaded.compose(sm.original_selection())(x), model(x), atol=1e-5)
