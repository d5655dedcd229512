"""Model references: zoo names, file.py:factory, package.module:factory, checkpoints."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from legoblocks.modelref import ModelRefError, load_model

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))

def build(in_channels, num_classes):
    return Net(in_channels, num_classes)

def build_plain():
    return Net()

def not_a_model():
    return 42

def broken():
    raise RuntimeError("factory exploded")

NUMBER = 7

class Factories:
    tiny = staticmethod(build_plain)
"""


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def test_file_factory_gets_the_options_it_declares(model_file: Path) -> None:
    model = load_model(f"{model_file}:build", in_channels=3, num_classes=5)
    assert model.conv.in_channels == 3 and model.fc.out_features == 5
    plain = load_model(f"{model_file}:build_plain", in_channels=3)  # takes no options
    assert plain.conv.in_channels == 1
    nested = load_model(f"{model_file}:Factories.tiny")
    assert isinstance(nested, nn.Module)


def test_package_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "userpkg_lego"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(MODEL_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("userpkg_lego.nets:build", num_classes=7)
    assert model.fc.out_features == 7


def test_zoo_name_builds_the_zoo_model() -> None:
    model = load_model("resnet20", num_classes=4)
    out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 4)


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("", "empty model reference"),
        ("resnet21", "unknown model reference 'resnet21'"),
        (":build", "both sides of ':' must be non-empty"),
        ("some.module:", "both sides of ':' must be non-empty"),
        ("no/such/file.py:build", "model file no/such/file.py not found"),
        ("surely_not_a_module_xyz.nets:build", "module 'surely_not_a_module_xyz.nets' is not importable"),
    ],
)
def test_malformed_references_say_what_is_wrong(ref: str, fragment: str) -> None:
    with pytest.raises(ModelRefError) as err:
        load_model(ref)
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_zoo_name_lists_the_zoo_and_the_other_forms() -> None:
    with pytest.raises(ModelRefError) as err:
        load_model("resnet21")
    assert "resnet20" in str(err.value) and "path/to/file.py:factory" in str(err.value)


@pytest.mark.parametrize(
    ("attr", "fragment"),
    [
        ("missing_fn", "has no attribute 'missing_fn'"),
        ("NUMBER", "names a int, not a callable factory"),
        ("not_a_model", "returned a int, not a torch.nn.Module"),
        ("broken", "raised RuntimeError: factory exploded"),
    ],
)
def test_bad_factories_say_what_is_wrong(model_file: Path, attr: str, fragment: str) -> None:
    with pytest.raises(ModelRefError, match=fragment):
        load_model(f"{model_file}:{attr}")


def test_missing_attribute_lists_available_factories(model_file: Path) -> None:
    with pytest.raises(ModelRefError) as err:
        load_model(f"{model_file}:bulid")
    assert "build" in str(err.value) and "build_plain" in str(err.value)


def test_file_that_fails_to_import_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import definitely_missing_dependency_xyz\n")
    with pytest.raises(ModelRefError, match="importing model file .*bad.py failed: ModuleNotFoundError"):
        load_model(f"{bad}:build")
    txt = tmp_path / "model.txt"
    txt.write_text("")
    with pytest.raises(ModelRefError, match="is not a .py file"):
        load_model(f"{txt}:build")


def test_checkpoint_round_trip(model_file: Path, tmp_path: Path) -> None:
    source = load_model(f"{model_file}:build", num_classes=3)
    ckpt = tmp_path / "w.pt"
    torch.save(source.state_dict(), ckpt)
    loaded = load_model(f"{model_file}:build", ckpt, num_classes=3)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    assert torch.equal(load_model(f"{model_file}:build", wrapped, num_classes=3).fc.bias, source.fc.bias)


def test_checkpoint_missing(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelRefError, match=r"checkpoint .*nope\.pt does not exist"):
        load_model(f"{model_file}:build", tmp_path / "nope.pt")


def test_checkpoint_key_mismatch_lists_keys(model_file: Path, tmp_path: Path) -> None:
    state = load_model(f"{model_file}:build").state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    ckpt = tmp_path / "w.pt"
    torch.save(state, ckpt)
    with pytest.raises(ModelRefError) as err:
        load_model(f"{model_file}:build", ckpt)
    msg = str(err.value)
    assert "1 missing keys (e.g. fc.bias)" in msg and "1 unexpected keys (e.g. extra.weight)" in msg
    shapes = tmp_path / "s.pt"
    torch.save(load_model(f"{model_file}:build", num_classes=5).state_dict(), shapes)
    with pytest.raises(ModelRefError, match=r"fc.weight \(5, 4\) vs \(10, 4\)"):
        load_model(f"{model_file}:build", shapes)


class _Payload:
    """Unpickling this would create a marker file: weights_only loading must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_refused_without_running_it(model_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"conv.weight": _Payload(marker)}, ckpt)
    with pytest.raises(ModelRefError, match="not a weights-only state dict"):
        load_model(f"{model_file}:build", ckpt)
    assert not marker.exists()
