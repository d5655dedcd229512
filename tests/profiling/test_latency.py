"""Latency measurement: statistics, thread handling, fingerprint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from profiling.latency import fingerprint, measure_chain_latency, measure_latency


def test_fingerprint_identifies_host_and_threads() -> None:
    fp = fingerprint(threads=1)
    assert {"cpu_model", "logical_cores", "torch_version", "threads", "machine", "id"} <= set(fp)
    assert fp["threads"] == 1 and fp["torch_version"] == torch.__version__
    assert len(fp["id"]) == 12
    assert fingerprint(threads=1)["id"] == fp["id"]
    assert fingerprint(threads=2)["id"] != fp["id"]


def test_measure_latency_sets_and_restores_threads() -> None:
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x * 2

    stats = measure_latency(Probe(), (3, 4, 4), batch_size=2, warmup=2, repeats=7, threads=1)
    assert torch.get_num_threads() == before
    assert seen == [1] * 9
    assert stats.repeats == 7 and stats.batch_size == 2 and stats.threads == 1
    assert 0 <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.cv >= 0


def test_measure_latency_restores_train_mode() -> None:
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    m.train()
    measure_latency(m, (1, 8, 8), warmup=1, repeats=2)
    assert m.training


def test_measure_latency_restores_each_submodule_mode() -> None:
    # A BlockSwitcher's container is in train mode around eval-mode blocks: timing it must not
    # switch those blocks' BatchNorm to batch statistics.
    block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    m = nn.Sequential(block)
    assert m.training and not block[1].training
    measure_latency(m, (1, 8, 8), warmup=1, repeats=2)
    assert m.training and not block.training and not block[1].training


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(nn.Identity(), (1,), repeats=0)
    with pytest.raises(ValueError, match="threads"):
        measure_latency(nn.Identity(), (1,), threads=0)


def test_chain_latency_compares_whole_with_sum() -> None:
    blocks = [nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 3, stride=2), nn.Flatten()]
    report = measure_chain_latency(blocks, (1, 12, 12), warmup=1, repeats=5)
    assert len(report.blocks) == 3
    assert report.sum_of_blocks_ms == pytest.approx(sum(b.median_ms for b in report.blocks))
    assert report.ratio == pytest.approx(report.whole.median_ms / report.sum_of_blocks_ms)
