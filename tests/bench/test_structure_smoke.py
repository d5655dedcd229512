"""bench/structure.py in bench/evaluate.py's --quick setting: the even composition of the lowest
budget as the recipe trains it, fine-tuned end to end (all of it, or its pruned blocks only)
beside the uniform baseline, all from the recipe's cache."""

from __future__ import annotations

import json
from pathlib import Path


def test_quick_runs_every_arm_and_merges_reruns(bench_script, tmp_path: Path, fmnist_dir: Path) -> None:
    bench = bench_script("structure")
    out = tmp_path / "structure.json"
    common = ["--quick", "--model", "resnet20", "--seconds", "2", "--data-dir", str(fmnist_dir),
              "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(common) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    budget, arms = row["budget"], row["arms"]
    assert 0 < budget < 1 and list(arms) == list(bench.ARMS)
    assert any(c != "0.0" for c in row["selection"])
    for name, arm in arms.items():
        assert 0 < arm["flops_frac"] <= budget + 1e-3, name
        assert 0.0 <= arm["test"] <= 100.0, name
    for name in ("composition", "composition-blocks"):
        assert arms[name]["steps"] > 0 and arms[name]["seconds"] >= 2
    assert arms["legodnn"]["joint_s"] > 0 and 0.0 <= result["teacher_test"] <= 100.0

    # One arm at one more budget: the first budget's arms are kept from --out, the commands accumulate.
    higher = round((budget + 1.0) / 2, 4)
    assert bench.main([*common, "--arms", "uniform", "--budgets", str(higher)]) == 0
    again = json.loads(out.read_text())
    assert [r["budget"] for r in again["rows"]] == [budget, higher]
    assert again["rows"][0] == row and list(again["rows"][1]["arms"]) == ["uniform"]
    assert again["rows"][1]["arms"]["uniform"]["flops_frac"] <= higher + 1e-3
    assert again["rows"][1]["arms"]["uniform"]["steps"] >= 1  # the same-training comparison needs it
    assert len(again["commands"]) == 2 and "--arms uniform" in again["commands"][1]
