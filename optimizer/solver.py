"""`solve(problem)`: the exact multi-DNN scaling solver for a one-off problem.

Problem: pick one choice per (model, block) to maximize
``sum_m w_m * accuracy_m - penalty * switch_bytes`` under a shared latency budget,
per-model latency deadlines, a memory budget and a switching budget, where a model's
accuracy is a measured composition's where its selection is one, else
``base_m - sum_b drop[m,b]``. It is a multiple-choice knapsack with several constraints
(NP-hard); the method is in `optimizer.compiled` (Lagrangian bounds around the dual's
minimum, then per-model enumeration above a threshold merged across models, all in array
operations). A caller that re-solves the same tables under changing budgets should keep
a `CompiledProblem` (`compile_problem`) instead.

Constraints hold to a relative tolerance of 1e-9 (`budget_limit`).
"""

from __future__ import annotations

from optimizer.compiled import DEFAULT_NODE_LIMIT, CompiledProblem, SearchLimitError, compile_problem
from optimizer.evaluation import REL_TOL, Solution, budget_limit, evaluate
from optimizer.problem import Problem

__all__ = [
    "DEFAULT_NODE_LIMIT",
    "REL_TOL",
    "CompiledProblem",
    "SearchLimitError",
    "Solution",
    "budget_limit",
    "compile_problem",
    "evaluate",
    "solve",
]


def solve(problem: Problem, *, top_k: int = 1, node_limit: int = DEFAULT_NODE_LIMIT) -> Solution:
    """The best selection (exact), plus up to top_k-1 next-best distinct ones.

    Objectives closer than float noise (1e-11 of the objective's scale) are ties; among
    tied optima the answer is the lexicographically smallest by (model, block, choice
    index), so a problem always yields the same selection.

    Args:
        problem: a validated problem (`parse_problem`).
        top_k: how many distinct selections to return, best first.
        node_limit: the most states one pass of the search may hold; past it the MILP
            answers (`SearchLimitError` where SciPy is not installed).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not isinstance(problem, Problem):
        raise TypeError("solve() takes a Problem; build one with optimizer.parse_problem(dict | str | Path)")
    return compile_problem(problem).solve(top_k=top_k, node_limit=node_limit)
