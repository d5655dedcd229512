"""The block model, pure PyTorch: cut a DNN into blocks, derive pruned descendants,
retrain them by feature distillation, save them without pickle, compose and switch them.

Names are re-exported lazily so that `import legoblocks` stays cheap (Torch-Pruning and
torch.fx load only when the block machinery is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # zoo / model references / data / teacher training
    "ZOO": "zoo", "build_zoo_model": "zoo", "resnet": "zoo", "vgg": "zoo", "mobilenetv2": "zoo",
    "load_model": "modelref", "ModelRefError": "modelref",
    "load_fashion_mnist": "data", "DatasetMissingError": "data", "DEFAULT_DATA_DIR": "data",
    "train_teacher": "train", "evaluate": "train",
    # blocks and descendants
    "BlockSpec": "detect", "BlockedModel": "detect", "detect_blocks": "detect",
    "verify_chain": "detect", "UntraceableModelError": "detect", "capture_graph": "capture",
    "DEFAULT_LADDER": "descend", "choice_id": "descend", "make_descendants": "descend",
    "BlockData": "retrain", "RetrainConfig": "retrain", "collect_block_io": "retrain",
    "retrain_descendants": "retrain",
    "save_module": "serialize", "load_module": "serialize", "UnsafeFileError": "serialize",
    "ScalableModel": "compose", "BlockSwitcher": "compose", "SwitchReport": "compose",
    "JointConfig": "joint", "train_joint": "joint",
    "recalibrate_bn": "bn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'legoblocks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"legoblocks.{module}"), name)
