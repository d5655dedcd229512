"""pipelines.allocator: freed activations stay in the heap, so the next op's output is not
faulted in again; the arithmetic does not change."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

# A child process (the setting is process-wide): a depthwise conv stack's forward pass at a
# batch whose 96-channel maps are 77 MB each (a MobileNetV2 stage at 28x28), counting the minor
# page faults of three passes after a warm-up one.
_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from pipelines.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 96, 1), torch.nn.ReLU6(),
                              torch.nn.Conv2d(96, 96, 3, padding=1, groups=96), torch.nn.ReLU6()).eval()
    x = torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        net(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            net(x)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_the_page_faults_of_large_activations():
    applied, kept = _run("keep")
    _, default = _run("default")
    assert applied == "True"
    assert default > 100_000  # 12 maps of 77 MB: about 18,800 pages each, faulted in again without the setting
    assert kept < default / 10


def test_training_is_bit_identical_with_the_setting():
    import torch

    from pipelines.allocator import keep_freed_memory

    def step() -> torch.Tensor:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 96, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(96 * 28 * 28, 10))
        x = torch.randn(64, 1, 28, 28)
        net(x).square().mean().backward()
        return net[0].weight.grad.clone()

    before = step()
    keep_freed_memory()
    assert torch.equal(step(), before)
