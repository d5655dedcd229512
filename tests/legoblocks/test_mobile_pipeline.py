"""Every mobile family through the stages that use legoblocks, on tiny random 3x64x64 data (slow).

detect -> descend -> per-block retraining -> joint stage -> compose -> cost (the fx-graph
peak-memory walk) -> BatchNorm re-estimation -> save/load without pickle -> ONNX, on each
family of `mobile_models.py` at a reduced width: what the pipeline does to a user's
MobileNetV3 or EfficientNet, minus the data source and Ray.
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from legoblocks.bn import recalibrate_bn
from legoblocks.compose import ScalableModel
from legoblocks.detect import count_flops, detect_blocks, verify_chain
from legoblocks.joint import JointConfig, train_joint
from legoblocks.retrain import RetrainConfig, collect_block_io, retrain_descendants
from profiling.cost import measure_cost

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
              pytest.mark.filterwarnings("ignore:The feature will be removed")]

MODELS = Path(__file__).with_name("mobile_models.py")
SHAPE = (3, 64, 64)
FAMILIES = ["mobilenetv3_small", "mobilenetv3_small_timm", "efficientnet_b0", "efficientnet_b0_timm", "ghostnet",
            "repvgg_a0", "shufflenetv2", "mobilevit_xxs", "resnet18", "regnety_400mf", "squeezenet", "convnext_atto"]


def _family(name: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("legodnn_test_mobile_models_slow", MODELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.FAMILIES[name](width_mult=0.5).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_runs_through_every_legoblocks_stage(name: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, *SHAPE, generator=gen), torch.randint(0, 10, (96,), generator=gen))
    teacher = _family(name)
    blocked = detect_blocks(teacher, SHAPE)
    assert verify_chain(teacher, blocked) < 1e-5
    scalable = ScalableModel.from_blocked(blocked, ladder=[0.0, 0.5, 0.8])

    originals = [scalable.variant(n, "0.0") for n in scalable.block_names]
    pairs = collect_block_io(originals, data, limit=64, batch_size=32, seed=0)
    cfg = RetrainConfig(epochs=1, lr=1e-3, batch_size=32, val_fraction=0.25, seed=0)
    for spec, block_data in zip(scalable.specs, pairs):
        if spec.scalable and len(scalable.choices(spec.name)) > 1:
            reports = retrain_descendants(scalable.variants[spec.name], block_data, cfg, progress=False)
            assert all(math.isfinite(r.loss_after) for r in reports.values()), spec.name

    report = train_joint(scalable, data, JointConfig(steps=2, batch_size=32), progress=False)
    assert report.steps == 2

    smallest = scalable.smallest_selection()
    composed = scalable.compose(smallest)
    x = torch.randn(4, *SHAPE, generator=gen)
    with torch.no_grad():
        assert composed(x).shape == (4, 10)
    for spec, choice in zip(scalable.specs, smallest):
        module = scalable.variant(spec.name, choice)
        cost = measure_cost(module, spec.in_shape)
        assert cost.flops == count_flops(module, spec.in_shape) and cost.peak_bytes > cost.weight_bytes

    calibrated = recalibrate_bn(composed, [x])
    with torch.no_grad():
        assert torch.isfinite(calibrated(x)).all()

    scalable.save(tmp_path / "scalable")
    loaded = ScalableModel.load(tmp_path / "scalable")
    with torch.no_grad():
        assert torch.allclose(loaded.compose(smallest)(x), composed.eval()(x), atol=1e-5)

    for spec in scalable.specs:
        for module in scalable.variants[spec.name].values():
            buffer = io.BytesIO()
            torch.onnx.export(module.eval(), (torch.randn(2, *spec.in_shape),), buffer, dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
            onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
