"""The compiled problem: validated and laid out once, re-solved under changing budgets and
running selections with the same answers as a fresh solve; the solver's import needs NumPy
and msgspec only, and past its state limit without SciPy it says what to raise."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer import CompiledProblem, ProblemError, compile_problem, parse_problem, solve
from optimizer.problem import synthetic_budgets

ROOT = Path(__file__).resolve().parents[2]


def _fresh(raw: dict, budgets: dict, current: dict | None = None) -> object:
    return solve(parse_problem({**raw, "budgets": budgets, "current": current}), top_k=3)


def test_re_solves_equal_fresh_solves_across_budgets_and_running_selections(gen):
    rng = random.Random(31)
    raw = gen.compositions(rng, gen.realistic(rng, 3, 8, 6, 0.5), (1, 3))
    raw["switch_penalty_per_byte"] = 1e-9
    compiled = compile_problem(raw)
    current = None
    for step, t in enumerate([0.5, 0.2, 0.9, 0.35, 0.05, 0.6]):
        budgets = synthetic_budgets(raw["models"], t)
        if step == 3:  # switching counts from here on: a budget on it too
            budgets["switch_bytes"] = 2e5
        got = compiled.solve(budgets, current, top_k=3)
        want = _fresh(raw, budgets, current)
        assert got.selection == want.selection and [a.selection for a in got.alternatives] == [
            a.selection for a in want.alternatives]
        assert got.objective == want.objective and got.accuracy_source == want.accuracy_source
        if got.feasible:
            current = got.selection  # the device now runs the answer
    assert current is not None


def test_budget_kinds_can_change_between_solves(gen):
    raw = gen.realistic(random.Random(5), 2, 6, 5, 0.4)
    compiled = compile_problem(raw)
    lat_only = compiled.solve({"latency_ms": raw["budgets"]["latency_ms"]})
    both = compiled.solve()
    neither = compiled.solve({})
    assert lat_only.objective >= both.objective and neither.objective >= lat_only.objective
    assert neither.selection == {m["name"]: ["0.0"] * 6 for m in raw["models"]}
    assert both.selection == solve(parse_problem(raw)).selection


def test_budgets_and_current_are_validated_with_paths(gen):
    compiled = compile_problem(gen.realistic(random.Random(2), 1, 3, 3, 0.5))
    with pytest.raises(ProblemError, match=r"^budgets\.latency_ms: expected a finite number >= 0"):
        compiled.solve({"latency_ms": -1})
    with pytest.raises(ProblemError, match=r"^current\.m0\[1\]: unknown choice id 'x' for block 'b1'"):
        compiled.solve(current={"m0": ["0.0", "x", "0.0"]})
    with pytest.raises(ProblemError, match=r"^current\.m9: unknown model"):
        compiled.solve(current={"m9": ["0.0"] * 3})


def test_infeasible_budgets_report_the_minima(gen):
    raw = gen.realistic(random.Random(3), 2, 4, 4, 0.5)
    compiled = compile_problem(raw)
    low = compiled.solve({"latency_ms": 0.0})
    assert not low.feasible and "smallest achievable" in low.reason
    lat_min, mem_min = gen.minima(raw)
    assert math.isclose(low.min_latency_ms, lat_min, rel_tol=1e-12) and math.isclose(low.min_memory_bytes, mem_min, rel_tol=1e-12)


def test_compile_accepts_json_forms_and_keeps_defaults(gen, tmp_path):
    raw = gen.realistic(random.Random(4), 1, 4, 3, 0.4)
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(raw))
    for source in (raw, json.dumps(raw), path, parse_problem(raw)):
        compiled = compile_problem(source)
        assert isinstance(compiled, CompiledProblem)
        assert compiled.solve().selection == solve(parse_problem(raw)).selection


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_solver_imports_numpy_and_msgspec_only():
    code = (
        "import sys, random\n"
        "from optimizer import compile_problem, solve_measured, parse_problem, solve\n"
        "from optimizer.problem import synthetic_problem\n"
        "s = solve(parse_problem(synthetic_problem(random.Random(0), 2, 6, 5, 0.3)))\n"
        "heavy = [m for m in ('scipy', 'torch', 'pulp', 'legoblocks.compose') if m in sys.modules]\n"
        "assert s.feasible and not heavy, heavy\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_milp_and_solver_import_in_either_order():
    for first, second in (("optimizer.milp", "optimizer.solver"), ("optimizer.solver", "optimizer.milp")):
        result = _run(f"import {first}, {second}")
        assert result.returncode == 0, result.stderr


# A child process's first lines: every import of SciPy fails, as on a device without it.
_NO_SCIPY = (
    "import sys, random\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'scipy' or name.startswith('scipy.'):\n"
    "            raise ImportError('scipy is not installed here')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_past_the_state_limit_without_scipy_the_error_says_what_to_raise():
    code = _NO_SCIPY + (
        "from optimizer import SearchLimitError, parse_problem, solve\n"
        "from optimizer.problem import synthetic_problem\n"
        "problem = parse_problem(synthetic_problem(random.Random(1), 4, 8, 6, 0.3))\n"
        "try:\n"
        "    solve(problem, node_limit=5)\n"
        "except SearchLimitError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "node_limit=5" in result.stdout and "pass a larger node_limit" in result.stdout and "scipy" in result.stdout


@pytest.mark.parametrize("D", [1, 2, 3])
def test_lp_infeasibility_certificates(D):
    import numpy as np

    from optimizer.dual import lp_infeasible

    # Two groups of two choices: choice 0 uses 1 of every resource, choice 1 uses 3 of the
    # first and none of the others.
    A = np.zeros((D, 2, 2))
    A[:, 0, :] = 1.0
    A[0, 1, :] = 3.0
    valid = np.ones((2, 2), dtype=bool)
    assert not lp_infeasible(A, valid, np.full(D, 2.0))  # choice 0 twice fits
    assert lp_infeasible(A, valid, np.full(D, 1.5))  # the first resource's least use is 2
    if D > 1:  # each budget alone can be met, not both: the second wants choice 1, the first cannot pay
        limits = np.full(D, 2.0)
        limits[:2] = 1.9, 0.5
        assert lp_infeasible(A, valid, limits)


def test_past_the_state_limit_without_scipy_one_budget_is_still_solved():
    # Meet in the middle needs NumPy only: a device without SciPy gets it past the limit too.
    code = _NO_SCIPY + (
        "import optimizer.compiled as compiled\n"
        "from optimizer import parse_problem, solve\n"
        "from optimizer.problem import synthetic_problem\n"
        "raw = synthetic_problem(random.Random(1), 1, 8, 6, 0.3)\n"
        "raw['budgets'].pop('memory_bytes')\n"
        "compiled.HALF_ROWS = 0  # not first: only past the state limit\n"
        "problem = parse_problem(raw)\n"
        "got, want = solve(problem, node_limit=1, top_k=3), solve(problem, top_k=3)\n"
        "print(got.method, [s.selection for s in (got, *got.alternatives)] == [s.selection for s in (want, *want.alternatives)])\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["meet-in-the-middle", "True"]
