"""The device side, torch vs ONNX Runtime: install size, cold start, batch-1 latency, block
switch vs full reload, predicted vs measured latency.

    .venv/bin/python bench/device.py [--quick] [--out docs/results/device.json]

One bundle (ResNet-20 width 16 on Fashion-MNIST shapes, the default ladder; `--quick`: a
width-4 ResNet-8) is published to a directory store. Latency depends on the architecture,
not the weights, so the blocks are untrained and the table is profiled on 200 images.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RUNTIMES = ("onnxruntime", "torch")


def requires(dist: str) -> set[str]:
    """What a distribution requires without extras (names only)."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in metadata.requires(dist) or []]
    return {r.name.lower().replace("_", "-") for r in reqs if not r.marker or "extra" not in str(r.marker)}


def install_mb(names: set[str]) -> float:
    """Installed size (MiB) of these distributions and everything they require (no extras)."""
    seen, todo, size = set(), list(names), 0
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            size += sum(f.size or 0 for f in metadata.distribution(name).files or [])
            todo += requires(name)
        except metadata.PackageNotFoundError:
            continue
    return size / 2**20


def build_bundle(root: Path, quick: bool) -> str:
    import torch

    from infra.bundle import publish_bundle
    from infra.manifest import FASHION_MNIST_CLASSES, FASHION_MNIST_PREPROCESSING
    from infra.signing import generate_keypair
    from legoblocks.compose import ScalableModel
    from legoblocks.data import load_fashion_mnist, subset
    from legoblocks.detect import detect_blocks
    from legoblocks.zoo import resnet
    from profiling.profile import LatencySettings, profile_model
    from profiling.table import save

    torch.manual_seed(0)
    model = (resnet(depth=8, width=4) if quick else resnet(depth=20, width=16)).eval()
    blocked = detect_blocks(model, (1, 28, 28), target_blocks=4 if quick else None)
    sm = ScalableModel.from_blocked(blocked, ladder=(0.0, 0.4, 0.8) if quick else (0.0, 0.2, 0.4, 0.6, 0.8),
                                    model_ref="resnet")
    val = subset(load_fashion_mnist(Path("/usr/share/datasets/fashion-mnist"), train=False), 200, seed=0)
    table = profile_model(sm, val, envs=1, latency=LatencySettings(warmup=1, repeats=3), additivity_n=0,
                          calibration_k=0, model_name="resnet")
    sm.save(root / "scalable")
    save(table, root / "profile.json")
    generate_keypair(root / "keys")
    publish_bundle(root / "scalable", root / "profile.json", str(root / "store"), root / "keys" / "bundle-signing.key",
                   "resnet", preprocessing=FASHION_MNIST_PREPROCESSING, classes=FASHION_MNIST_CLASSES)
    from PIL import Image

    from legoblocks.data import MEAN, STD

    Image.fromarray(((val.tensors[0][0, 0] * STD + MEAN) * 255).round().byte().numpy(), mode="L").save(root / "x.png")
    return str(root / "store" / "resnet")


def cold_start(uri: str, root: Path, runtime: str, cache: Path, repeats: int) -> float:
    """Seconds from process start to the first prediction printed (`legodnn-fetch predict`)."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "legodnn-fetch"), "predict", str(root / "x.png"), "--bundle",
                    uri, "--public-key", str(root / "keys" / "bundle-signing.pub"), "--cache", str(cache),
                    "--runtime", runtime, "--repeats", str(repeats)], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few repeats (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from infra.device.runtime import DeviceLatencySettings
    from infra.device.session import DeviceBudgets, fetch

    repeats, compositions = (3, 3) if args.quick else (50, 10)
    root = Path(tempfile.mkdtemp(prefix="bench-device-"))
    uri = build_bundle(root, args.quick)
    base = requires("legodnn-at-scale")
    out: dict = {"install_mib": {"onnxruntime": install_mb(base),
                                 "torch": install_mb((base - {"onnx", "onnxruntime"}) | {"torch", "safetensors"})},
                 "cold_start_s": {}, "warm_start_s": {}, "latency_ms": {}, "switch_ms": {}, "reload_ms": {},
                 "prediction_error": {}}
    settings = DeviceLatencySettings(repeats=repeats)
    results = {}
    for rt in RUNTIMES:
        cache = root / f"cache-{rt}"
        out["cold_start_s"][rt] = cold_start(uri, root, rt, cache, repeats)
        out["warm_start_s"][rt] = cold_start(uri, root, rt, cache, repeats)
        results[rt] = fetch([uri], DeviceBudgets(None, None), public_key=root / "keys" / "bundle-signing.pub",
                            cache=cache, runtime=rt, settings=settings)
    manifest = results["torch"].session.bundles["resnet"].manifest
    rng = random.Random(0)
    ladders = [sorted((d.choice for d in b.descendants), key=float) for b in manifest.blocks]
    sels = [[ladder[0] for ladder in ladders], [ladder[-1] for ladder in ladders]]
    sels += [[rng.choice(b.descendants).choice for b in manifest.blocks] for _ in range(compositions - 2)]
    for rt, result in results.items():
        session, device = result.session, result.session.bundles["resnet"].device
        shares, in_shape = device.choice_ms(), manifest.input_shape
        timed, errors = [], []
        for sel in sels:
            session.assemble({"resnet": sel})
            measured = session.runtime.time(session.switchers["resnet"].model, in_shape).median_ms
            predicted = sum(shares[(b.name, c)] for b, c in zip(manifest.blocks, sel))
            timed.append(measured)
            errors.append(abs(predicted - measured) / measured)
        out["latency_ms"][rt] = {"original": timed[0], "smallest": timed[1], "random_median": sorted(timed)[len(timed) // 2]}
        out["prediction_error"][rt] = {"mean": sum(errors) / len(errors), "max": max(errors), "n": len(errors)}
        switches, reloads = [], []  # a budget change that moves two blocks, vs loading the whole model
        for a in sels[2:]:
            b = list(a)
            for i in rng.sample([i for i, ladder in enumerate(ladders) if len(ladder) > 1], 2):
                b[i] = rng.choice([c for c in ladders[i] if c != a[i]])
            session.assemble({"resnet": a})
            switches.append(session.switchers["resnet"].switch(b).seconds * 1000)
            start = time.perf_counter()
            session.assemble({"resnet": b})
            reloads.append((time.perf_counter() - start) * 1000)
        out["switch_ms"][rt], out["reload_ms"][rt] = sorted(switches)[len(switches) // 2], sorted(reloads)[len(reloads) // 2]
    out["setting"] = {"quick": args.quick, "repeats": repeats, "compositions": len(sels), "threads": 1,
                      "blocks": len(manifest.blocks), "descendants": len(manifest.descendants())}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
