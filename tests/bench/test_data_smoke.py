"""bench/data.py in its --quick setting: image folders exported from Fashion-MNIST, `legodnn run`
on each with its peak RSS polled, and the IDX path on the same images."""

from __future__ import annotations

import json
from pathlib import Path


def test_quick_measures_rss_wall_time_and_both_paths(bench_script, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEGODNN_CODE_VERSION", "bench-data-smoke")
    bench = bench_script("data")
    out = tmp_path / "data.json"
    assert bench.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["source"], r["train_images"]) for r in rows] == [("imagefolder", 200), ("imagefolder", 400),
                                                                ("fashion-mnist", 400)]
    for r in rows:
        assert r["peak_pss_mb"] > 50 and r["wall_s"] > 0 and 0.0 <= r["teacher_test_accuracy"] <= 1.0
    assert len(list((tmp_path / "work" / "fmnist-400" / "train").rglob("*.png"))) == 400
