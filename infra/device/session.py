"""A device run: verified bundles solved jointly, downloaded as far as the selection needs,
assembled on the chosen runtime, and kept switchable.

`fetch(...)` is the one-call form (what `legodnn-fetch` runs); `open_session(...)` prepares
the bundles (`infra.device.prepare`) and returns the `DeviceSession` that solves, stages,
assembles, times and predicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from infra.device.cache import DeviceCache
from infra.device.objects import FetchStats
from infra.device.prepare import FetchedBundle, PrepareOptions, prepare_offline, prepare_online
from infra.device.runtime import DeviceLatencySettings, Runtime, make_runtime
from infra.device.switcher import Switcher
from infra.errors import InfeasibleBudgetError
from infra.manifest import FileEntry
from infra.signing import load_public_key
from legoblocks.schema import convert
from profiling.serving import Told, told

if TYPE_CHECKING:
    from optimizer.measured import MeasuredSolution
    from optimizer.solver import Solution

MIB = 1 << 20


class _BudgetFile(msgspec.Struct, forbid_unknown_fields=True):
    latency_ms: Annotated[float, Meta(gt=0)] | None = None
    memory_mb: Annotated[float, Meta(gt=0)] | None = None


@dataclass(frozen=True)
class DeviceBudgets:
    """The device's budgets: total latency of all models (ms) and total memory (bytes); None = no limit."""

    latency_ms: float | None
    memory_bytes: float | None

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> DeviceBudgets:
        """Budgets from `{"latency_ms": .., "memory_mb": ..}` (the --watch file format)."""
        b = convert(data, _BudgetFile, error=lambda path, msg: ValueError(
            f'{where}: {path + ": " if path else ""}{msg} (expected {{"latency_ms": X, "memory_mb": Y}}, '
            "positive numbers or null)"))
        return cls(b.latency_ms, None if b.memory_mb is None else b.memory_mb * MIB)

    def as_problem_budgets(self) -> dict[str, float | None]:
        return {"latency_ms": self.latency_ms, "memory_bytes": self.memory_bytes}


@dataclass
class ModelReport:
    model_id: str
    version: int
    uri: str
    selection: dict[str, str]
    accuracy: Told  # what serving the selection is reported at: value, standard error, measured or predicted
    latency_ms: float
    memory_bytes: float


def mib(n: float | None) -> str:
    return "unlimited" if n is None else f"{n / MIB:.3f} MiB"


def ms(n: float | None) -> str:
    return "unlimited" if n is None else f"{n:.3f} ms"


class DeviceSession:
    """Verified bundles for one device run: solves, downloads what a selection needs, assembles."""

    def __init__(self, bundles: list[FetchedBundle], cache: DeviceCache, runtime: Runtime, stats: FetchStats,
                 pending: list[FileEntry], *, fingerprint: dict[str, Any], offline: bool) -> None:
        self.bundles = {b.model_id: b for b in bundles}
        self.cache = cache
        self.runtime = runtime
        self.stats = stats
        self.pending = pending
        self.fingerprint = fingerprint
        self.offline = offline
        self.switchers: dict[str, Switcher] = {}
        self._compiled: Any = None

    # ------------------------------------------------------------------ solving

    def problem(self, budgets: DeviceBudgets) -> dict[str, Any]:
        """The joint optimizer problem over all bundles, with this device's latencies."""
        from profiling.serving import to_problem

        tables = [b.table for b in self.bundles.values()]
        override = {b.model_id: b.device.choice_ms() for b in self.bundles.values()}
        return to_problem(tables, budgets.as_problem_budgets(), latency_override=override)

    def compiled(self, budgets: DeviceBudgets) -> Any:
        """The joint problem compiled once per session (`optimizer.CompiledProblem`): every
        re-solve (a budget change, a tightened latency round) reuses its arrays."""
        from optimizer import compile_problem

        if self._compiled is None:
            self._compiled = compile_problem(self.problem(budgets))
        return self._compiled

    def solve(self, budgets: DeviceBudgets) -> Solution:
        """The served selection for `budgets` (exact); InfeasibleBudgetError says what would fit."""
        solution = self.compiled(budgets).solve(budgets=budgets.as_problem_budgets())
        if not solution.feasible:
            raise InfeasibleBudgetError(
                f"no selection of {', '.join(self.bundles)} fits latency {ms(budgets.latency_ms)} and memory "
                f"{mib(budgets.memory_bytes)}: the smallest achievable latency is "
                f"{solution.min_latency_ms:.3f} ms and memory {mib(solution.min_memory_bytes)}; "
                "raise the budgets" + (" or fetch online (offline uses only cached blocks)" if self.offline else "")
            )
        return solution

    def solve_measured(self, budgets: DeviceBudgets, max_rounds: int) -> MeasuredSolution:
        """Solve, then time the assembled models here and re-solve under a tightened latency
        budget while they run over (optimizer.solve_measured). Each round downloads and
        assembles what its selection needs; the models are left assembled with the answer."""
        from optimizer.measured import solve_measured

        self.solve(budgets)  # the clear error when nothing fits even on paper
        result = solve_measured(self.compiled(budgets), self.time_selection, budgets=budgets.as_problem_budgets(),
                                max_rounds=max_rounds)
        if result.rounds[-1].selection != result.solution.selection:
            self.time_selection(result.solution.selection)  # assemble the chosen one again
        return result

    def time_selection(self, selection: Mapping[str, Sequence[str]]) -> float:
        """Download, commit and assemble `selection`, then time each model end to end on this
        device; returns the summed median latency (ms), what a shared latency budget limits."""
        selection = {name: list(choices) for name, choices in selection.items()}
        self.stage(selection)
        self.commit()
        self.assemble(selection)
        return self.time_running()

    def time_running(self) -> float:
        """The summed median latency (ms) of the models as they run now, timed end to end here."""
        return sum(self.runtime.time(s.model, self.bundles[m].manifest.blocks[0].in_shape).median_ms
                   for m, s in self.switchers.items())

    def verify_running(self, problem: Any, max_rounds: int, *, budgets: Any = None,
                       current: Any = None) -> tuple[MeasuredSolution, int]:
        """solve_measured for models already running (the --watch loop): each round swaps only
        the blocks that differ into the running models, so they keep serving between rounds.
        Returns the answer, left running, and the bytes the extra rounds loaded."""
        from optimizer.measured import solve_measured

        loaded = 0

        def run(selection: Mapping[str, Sequence[str]]) -> None:
            nonlocal loaded
            for model_id, choices in selection.items():
                if list(self.switchers[model_id].selection) != list(choices):
                    loaded += self.switchers[model_id].switch(list(choices)).bytes_loaded

        def measure(selection: Mapping[str, Sequence[str]]) -> float:
            run(selection)
            return self.time_running()

        result = solve_measured(problem, measure, budgets=budgets, current=current, max_rounds=max_rounds)
        run(result.solution.selection)  # the fastest timed, when the last round did not fit either
        return result, loaded

    # ------------------------------------------------------------------ files

    def stage(self, selection: Mapping[str, Sequence[str]]) -> None:
        """Make every file the selection needs verified on the device (cached, else downloaded)."""
        for model_id, choices in selection.items():
            b = self.bundles[model_id]
            for block, choice in zip(b.manifest.blocks, choices):
                for entry in self.runtime.needs(block.descendant(choice)):
                    b.source.path(entry)

    def commit(self) -> None:
        """Move every verified download into the cache, with the bundles' metadata."""
        self.cache.commit(list(self.pending), [b.files for b in self.bundles.values()])
        self.pending.clear()

    # ------------------------------------------------------------------ models

    def load_block(self, model_id: str, block: str, choice: str) -> tuple[Any, int]:
        """A runnable descendant with real, verified weights (downloaded if online and missing)."""
        b = self.bundles[model_id]
        entry = b.manifest.block(block)
        return self.runtime.load(entry, entry.descendant(choice), b.source)

    def assemble(self, selection: Mapping[str, Sequence[str]]) -> dict[str, Switcher]:
        """One Switcher per model, every block loaded from verified files."""
        for model_id, choices in selection.items():
            self.switchers[model_id] = Switcher(
                lambda block, choice, m=model_id: self.load_block(m, block, choice), self.runtime.chain,
                self.bundles[model_id].manifest.block_names, list(choices))
        return self.switchers

    def predict(self, model_id: str, batch: Any) -> Any:
        """Logits of the running model `model_id` for a float32 NumPy batch (N, C, H, W)."""
        return self.runtime.infer(self.switchers[model_id].model, batch)

    def report(self, selection: Mapping[str, Sequence[str]]) -> list[ModelReport]:
        """Predicted accuracy (table), device latency and memory of each model's selection."""
        out = []
        for model_id, choices in selection.items():
            b = self.bundles[model_id]
            lat = b.device.choice_ms()
            names = b.manifest.block_names
            out.append(ModelReport(
                model_id=model_id, version=b.version, uri=b.model_uri, selection=dict(zip(names, choices)),
                accuracy=told(b.table, list(choices)),
                latency_ms=sum(lat[(n, c)] for n, c in zip(names, choices)),
                memory_bytes=float(b.table.total(list(choices), "peak_bytes"))))
        return out


def open_session(
    uris: Sequence[str], *, public_key: Any, cache: str | Path, runtime: str | None = None, offline: bool = False,
    settings: DeviceLatencySettings = DeviceLatencySettings(), attempts: int = 3, progress: bool = False,
    allow_downgrade: bool = False,
) -> DeviceSession:
    """Verify and prepare every bundle (manifest, table, device timings); download no weights.

    runtime: "torch", "onnxruntime" or None (torch where installed, else ONNX Runtime).
    """
    if not uris:
        raise ValueError("give at least one bundle URI")
    rt = make_runtime(runtime, settings)
    dc = DeviceCache(cache)
    fp = rt.fingerprint()
    stats, pending = FetchStats(), []
    opts = PrepareOptions(dc, load_public_key(public_key), rt, fp, stats, pending, attempts, progress, allow_downgrade)
    bundles = [(prepare_offline if offline else prepare_online)(uri, opts) for uri in uris]
    ids = [b.model_id for b in bundles]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the bundles must be different models, got model ids {ids}")
    return DeviceSession(bundles, dc, rt, stats, pending, fingerprint=fp, offline=offline)


@dataclass
class FetchResult:
    session: DeviceSession
    solution: Solution
    models: list[ModelReport]
    budgets: DeviceBudgets
    measured: MeasuredSolution | None = None  # set by --verify-latency

    @property
    def switchers(self) -> dict[str, Switcher]:
        return self.session.switchers

    @property
    def over_budget(self) -> bool:
        """--verify-latency timed the answer and it still runs over the latency budget."""
        return self.measured is not None and not self.measured.fits

    def to_dict(self) -> dict[str, Any]:
        s = self.session.stats
        return {
            "models": [dataclasses.asdict(m) for m in self.models],
            "total": {
                "latency_ms": sum(m.latency_ms for m in self.models),
                "memory_bytes": sum(m.memory_bytes for m in self.models),
                "objective": self.solution.objective,
            },
            "budgets": {"latency_ms": self.budgets.latency_ms, "memory_bytes": self.budgets.memory_bytes},
            "runtime": self.session.runtime.name,
            "downloaded": list(s.downloaded),
            "downloaded_bytes": s.downloaded_bytes,
            "headers_read": s.headers_read,
            "measured": s.measured,
            "healed": list(s.healed),
            "warnings": list(s.warnings),
            "device": self.session.fingerprint,
            "offline": self.session.offline,
            "verified_latency": measured_dict(self.measured),
        }


def measured_dict(m: MeasuredSolution | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"measured_ms": m.measured_ms, "fits": m.fits, "rounds": [dataclasses.asdict(r) for r in m.rounds]}


def fetch(
    uris: Sequence[str], budgets: DeviceBudgets, *, public_key: Any, cache: str | Path, runtime: str | None = None,
    offline: bool = False, settings: DeviceLatencySettings = DeviceLatencySettings(), attempts: int = 3,
    progress: bool = False, verify_latency_rounds: int = 0, allow_downgrade: bool = False,
) -> FetchResult:
    """Verify, time, solve, download what the selection needs, commit, assemble.

    With `verify_latency_rounds` > 0 and a latency budget, the assembled models are then
    timed here and re-solved under a tightened budget while they run over (at most that
    many timed rounds); `FetchResult.over_budget` says when even the last round ran over
    (the CLI then exits 1).

    A bundle that fails verification (or a rollback without `allow_downgrade`) raises
    BundleVerificationError before anything is written to the cache; infeasible budgets
    raise InfeasibleBudgetError.
    """
    session = open_session(uris, public_key=public_key, cache=cache, runtime=runtime, offline=offline,
                           settings=settings, attempts=attempts, progress=progress, allow_downgrade=allow_downgrade)
    try:
        solution = session.solve(budgets)
    except InfeasibleBudgetError:
        session.commit()  # everything fetched so far verified: keep the manifests and timings for next time
        raise
    selection = {name: list(choices) for name, choices in solution.selection.items()}
    session.stage(selection)
    session.commit()
    measured = None
    if verify_latency_rounds > 0 and budgets.latency_ms is not None:
        measured = session.solve_measured(budgets, verify_latency_rounds)
        solution = measured.solution
        selection = {name: list(choices) for name, choices in solution.selection.items()}
    else:
        session.assemble(selection)
    return FetchResult(session, solution, session.report(selection), budgets, measured)
