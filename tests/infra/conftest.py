"""Fixtures for infra tests: a proxy that can drop a connection mid-download, and signing keys.

The S3-compatible server (moto's server mode) and its buckets are the session-wide fixtures
of tests/conftest.py.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.signing import KeyPair, generate_keypair


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("other-keys"))


@dataclass
class DroppingProxy:
    """An HTTP proxy in front of moto that can cut a response short, like a dropped connection.

    `drop(substring, times)` makes the next `times` whole-object GET responses whose path
    contains `substring` send their headers (with the full Content-Length) and `keep` of the
    body, then close the socket. Every request is recorded as (method, path, Range header).
    """

    upstream_port: int
    port: int = 0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    _rules: list[list] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self, substring: str, times: int = 1, keep: float = 0.5) -> None:
        with self._lock:
            self._rules.append([substring, times, keep])

    def _take_rule(self, method: str, path: str, range_header: str | None) -> float | None:
        # Only whole-object downloads (no Range, or an open-ended one) are cut, not header reads.
        if method != "GET" or (range_header is not None and not range_header.endswith("-")):
            return None
        with self._lock:
            for rule in self._rules:
                if rule[0] in path and rule[1] > 0:
                    rule[1] -= 1
                    return rule[2]
        return None

    def gets(self, substring: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and substring in r[1]]


@pytest.fixture
def dropping_proxy(moto_endpoint: str) -> Iterator[DroppingProxy]:
    upstream_port = int(moto_endpoint.rsplit(":", 1)[1])
    proxy = DroppingProxy(upstream_port)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            proxy.requests.append((self.command, self.path, self.headers.get("Range")))
            conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            keep = proxy._take_rule(self.command, self.path, self.headers.get("Range"))
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                # HEAD has no body: pass its Content-Length (the object's size) through.
                if k.lower() not in ("transfer-encoding", "connection") and (
                    k.lower() != "content-length" or self.command == "HEAD"
                ):
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if keep is None:
                self.wfile.write(data)
                return
            self.wfile.write(data[: int(len(data) * keep)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------ tiny real bundles


@dataclass(frozen=True)
class BuiltModel:
    """A tiny zoo model made scalable and profiled for real, saved as the pipeline saves it."""

    name: str
    scalable_dir: Path
    table_path: Path


LADDER = (0.0, 0.4, 0.8)


def _build(root: Path, name: str, factory, target_blocks: int, seed: int, val_ds) -> BuiltModel:
    import torch

    from legoblocks.compose import ScalableModel
    from legoblocks.detect import detect_blocks
    from profiling.profile import LatencySettings, profile_model
    from profiling.table import save

    torch.manual_seed(seed)
    model = factory().eval()
    blocked = detect_blocks(model, (1, 28, 28), target_blocks=target_blocks)
    sm = ScalableModel.from_blocked(blocked, ladder=LADDER, model_ref=name)
    table = profile_model(
        sm, val_ds, envs=1, latency=LatencySettings(warmup=1, repeats=3), additivity_n=0, calibration_k=0,
        model_name=name,
    )
    out = root / f"{name}-seed{seed}"
    sm.save(out / "scalable")
    save(table, out / "profile.json")
    return BuiltModel(name, out / "scalable", out / "profile.json")


@pytest.fixture(scope="session")
def val_ds(fmnist_dir: Path):
    """300 real Fashion-MNIST test images: enough for a real (if noisy) ProfileTable."""
    from legoblocks.data import load_fashion_mnist, subset

    return subset(load_fashion_mnist(fmnist_dir, train=False), 300, seed=0)


@pytest.fixture(scope="session")
def built_models(tmp_path_factory: pytest.TempPathFactory, val_ds) -> dict[str, BuiltModel]:
    """resnet8 (width 4) twice (two seeds: two versions of one model) and vgg11 (width 4).

    Tiny on purpose: the tests exercise shipping, not accuracy, and share 2 CPU cores.
    """
    from legoblocks.zoo import resnet, vgg

    root = tmp_path_factory.mktemp("built")
    return {
        "resnet": _build(root, "resnet8", lambda: resnet(depth=8, width=4), 4, 0, val_ds),
        "resnet_b": _build(root, "resnet8", lambda: resnet(depth=8, width=4), 4, 1, val_ds),
        "vgg": _build(root, "vgg11", lambda: vgg(width=4), 4, 0, val_ds),
    }


def _write_pngs(val_ds, folder: Path, n: int):
    """The first n test images as 8-bit PNG files, and the dataset's own tensors for them."""
    import torch
    from PIL import Image

    from legoblocks.data import MEAN, STD

    folder.mkdir(parents=True, exist_ok=True)
    images = val_ds.tensors[0][:n]
    paths = []
    for i, x in enumerate(images):
        pixels = torch.round((x[0] * STD + MEAN) * 255).clamp(0, 255).to(torch.uint8).numpy()
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels, mode="L").save(paths[-1])
    return paths, images


@pytest.fixture(scope="session")
def write_pngs():
    """`write_pngs(val_ds, folder, n) -> (paths, tensors)`: real PNG files of Fashion-MNIST test images."""
    return _write_pngs


def _run_device_cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str], str, str]:
    """`legodnn-fetch ARGS` in a fresh interpreter: (exit code, top-level modules it imported,
    stdout, stderr). How the tests check what the device path imports."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from infra.device.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    top = json.loads(lines[-1]) if lines and lines[-1].startswith("[") else []
    return proc.returncode, top, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def run_device_cli():
    """`run_device_cli(args, env, cwd) -> (rc, top-level modules imported, stdout, stderr)`."""
    return _run_device_cli
