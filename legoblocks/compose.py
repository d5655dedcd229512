"""A model made of interchangeable blocks: compose a selection, save/load it, switch live.

`ScalableModel` holds, for every block of a detected chain, its descendants keyed by
choice id (`"0.0"` = the original). One choice per block is a *selection*; `compose`
turns a selection into a runnable `nn.Sequential`. With 6 choices for each of 8 blocks
that is 6^8 models from one training run, which is why nothing here enumerates them.

`BlockSwitcher` is the runtime side: it keeps one live model and, when the optimizer asks
for a new selection, loads and swaps in only the blocks whose choice changed - the
switching cost the optimizer budgets for is exactly what it reports.

On disk (see docs/ARCHITECTURE.md)::

    scalable/
      scalable.json            {"schema": 1, "model_ref", "input_shape", "blocks": [...], "choices": {...}}
      <block>/<choice>.safetensors

Block files are written by `legoblocks.serialize`, which never unpickles on load. A save
goes to a temporary sibling directory that is renamed into place, so a reader never sees
a half-written model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from torch import nn

from legoblocks.choices import ORIGINAL, choice_id
from legoblocks.descend import DEFAULT_LADDER
from legoblocks.detect import BlockedModel, BlockSpec

__all__ = ["SCHEMA", "ScalableModel", "SwitchReport", "BlockSwitcher", "Selection", "module_nbytes"]

SCHEMA = 1
Selection = Sequence[str] | Mapping[str, str | float]

# Block names and choice ids become directory and file names: keep them to a safe alphabet
# so a crafted scalable.json cannot point outside its directory.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what loading it moves into memory."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _sparsity_key(choice: str) -> float:
    return float(choice)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not a safe file name (letters, digits, '_', '.', '-')")
    return name


def _check_choice(choice: object) -> str:
    """A choice id as stored: the canonical string of a sparsity in [0, 1)."""
    if isinstance(choice, str):
        try:
            value = float(choice)
        except ValueError:
            raise ValueError(f"choice id {choice!r} is not a sparsity such as '0.0' or '0.4'") from None
        if choice_id(value) != choice:
            raise ValueError(f"choice id {choice!r} is not canonical; write {choice_id(value)!r}")
        return choice
    return choice_id(choice)  # a number: validated and canonicalised


class ScalableModel:
    """Blocks in chain order, each with its descendants keyed by choice id."""

    def __init__(self, specs: Sequence[BlockSpec], variants: Mapping[str, Mapping[str, nn.Module]],
                 input_shape: Sequence[int], model_ref: str = "") -> None:
        self.specs = list(specs)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.model_ref = model_ref
        names = [s.name for s in self.specs]
        if not names:
            raise ValueError("a ScalableModel needs at least one block")
        if len(set(names)) != len(names):
            raise ValueError(f"block names must be unique, got {names}")
        missing = [n for n in names if n not in variants]
        extra = sorted(set(variants) - set(names))
        if missing or extra:
            raise ValueError(f"variants must have exactly the blocks of specs: missing {missing or 'none'}, "
                             f"unexpected {extra or 'none'}")
        self.variants: dict[str, dict[str, nn.Module]] = {}
        for spec in self.specs:
            _check_name(spec.name, "block name")
            choices = {_check_choice(c): m for c, m in variants[spec.name].items()}
            if ORIGINAL not in choices:
                raise ValueError(f"block {spec.name!r} has no original choice '0.0' (has {sorted(choices)})")
            if not spec.scalable and list(choices) != [ORIGINAL]:
                raise ValueError(f"block {spec.name!r} is not scalable but has choices {sorted(choices)}; "
                                 "a non-scalable block has exactly one choice, '0.0'")
            self.variants[spec.name] = dict(sorted(choices.items(), key=lambda kv: _sparsity_key(kv[0])))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_blocked(cls, blocked: BlockedModel, ladder: Iterable[float] = DEFAULT_LADDER,
                     importance: str = "magnitude", progress: bool = False, model_ref: str = "") -> "ScalableModel":
        """Make the descendants of every scalable block of a detected chain."""
        ladder = list(ladder)
        variants: dict[str, dict[str, nn.Module]] = {}
        pairs = list(zip(blocked.specs, blocked.blocks))
        from tqdm.auto import tqdm

        from legoblocks.descend import make_descendants

        for spec, block in tqdm(pairs, desc="descendants", unit="block", disable=not progress):
            if spec.scalable:
                variants[spec.name] = make_descendants(block, spec.in_shape, ladder, importance=importance)
            else:
                variants[spec.name] = {ORIGINAL: copy.deepcopy(block).eval()}
        return cls(blocked.specs, variants, blocked.input_shape, model_ref)

    # ------------------------------------------------------------------ selections

    @property
    def block_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, block: str) -> BlockSpec:
        for s in self.specs:
            if s.name == block:
                return s
        raise KeyError(f"unknown block {block!r}; blocks are {self.block_names}")

    def choices(self, block: str) -> list[str]:
        """Choice ids of `block`, by increasing sparsity ("0.0" first)."""
        if block not in self.variants:
            raise KeyError(f"unknown block {block!r}; blocks are {self.block_names}")
        return list(self.variants[block])

    def normalize_selection(self, sel: Selection) -> list[str]:
        """A selection as a list of choice ids in block order; accepts a list or a dict.

        Values may be choice ids or sparsities (0.4 -> "0.4"). Every block must appear.
        """
        names = self.block_names
        if isinstance(sel, Mapping):
            unknown = sorted(set(sel) - set(names))
            missing = [n for n in names if n not in sel]
            if unknown or missing:
                raise ValueError(f"selection must name every block exactly: missing {missing or 'none'}, "
                                 f"unknown {unknown or 'none'}")
            raw = [sel[n] for n in names]
        elif isinstance(sel, (str, bytes)) or not isinstance(sel, Sequence):
            raise TypeError(f"a selection is a list of choice ids or a dict block -> choice id, got {type(sel).__name__}")
        else:
            raw = list(sel)
            if len(raw) != len(names):
                raise ValueError(f"selection has {len(raw)} choices but the model has {len(names)} blocks ({names})")
        out = []
        for name, choice in zip(names, raw):
            cid = _check_choice(choice)
            if cid not in self.variants[name]:
                raise ValueError(f"block {name!r} has no choice {cid!r}; it has {self.choices(name)}")
            out.append(cid)
        return out

    def original_selection(self) -> list[str]:
        return [ORIGINAL] * len(self.specs)

    def smallest_selection(self) -> list[str]:
        """Per block the choice with the fewest parameters (measured, not read off the sparsity)."""
        sel = []
        for name in self.block_names:
            sizes = {c: sum(p.numel() for p in m.parameters()) for c, m in self.variants[name].items()}
            sel.append(min(sizes, key=lambda c: (sizes[c], -_sparsity_key(c))))
        return sel

    def num_options(self) -> int:
        """How many distinct models the blocks compose into."""
        return math.prod(len(v) for v in self.variants.values())

    def variant(self, block: str, choice: str | float) -> nn.Module:
        """The stored descendant itself (shared, not a copy: `compose` gives copies)."""
        cid = _check_choice(choice)
        if cid not in self.choices(block):
            raise KeyError(f"block {block!r} has no choice {cid!r}; it has {self.choices(block)}")
        return self.variants[block][cid]

    def compose(self, sel: Selection) -> nn.Sequential:
        """A runnable model for a selection: fresh deep copies of the chosen blocks, eval mode."""
        chosen = self.normalize_selection(sel)
        blocks = [copy.deepcopy(self.variants[n][c]) for n, c in zip(self.block_names, chosen)]
        return nn.Sequential(*blocks).eval()

    # ------------------------------------------------------------------ disk

    def save(self, directory: str | Path) -> Path:
        """Write the model as `directory/scalable.json` + one safetensors file per descendant.

        An existing ScalableModel directory is replaced; any other non-empty directory is
        refused rather than overwritten.
        """
        from legoblocks.serialize import save_module

        target = Path(directory)
        if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / "scalable.json").is_file())):
            raise FileExistsError(f"{target} exists and is not a saved ScalableModel; choose a new directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            for name, choices in self.variants.items():
                for cid, module in choices.items():
                    save_module(module, tmp / name / f"{cid}.safetensors")
            manifest = {
                "schema": SCHEMA,
                "model_ref": self.model_ref,
                "input_shape": list(self.input_shape),
                "blocks": [s.to_dict() for s in self.specs],
                "choices": {name: list(choices) for name, choices in self.variants.items()},
            }
            (tmp / "scalable.json").write_text(json.dumps(manifest, indent=2) + "\n")
            # Swap in: move any old version aside first, so a crash leaves one complete copy.
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path) -> "ScalableModel":
        """Read a directory written by `save`; block files load without unpickling."""
        from legoblocks.serialize import load_module

        root = Path(directory)
        meta_path = root / "scalable.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} is not a saved ScalableModel: {meta_path} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
            found = meta.get("schema") if isinstance(meta, dict) else None
            raise ValueError(f"{meta_path} has schema {found!r}; this version reads schema {SCHEMA}")
        for key in ("input_shape", "blocks", "choices"):
            if key not in meta:
                raise ValueError(f"{meta_path} lacks the field {key!r}")
        specs = [BlockSpec.from_dict(d) for d in meta["blocks"]]
        variants: dict[str, dict[str, nn.Module]] = {}
        for spec in specs:
            name = _check_name(spec.name, "block name")
            choices = meta["choices"].get(name)
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{meta_path}: no choices listed for block {name!r}")
            variants[name] = {}
            for cid in choices:
                cid = _check_choice(cid)
                variants[name][cid] = load_module(root / name / f"{cid}.safetensors").eval()
        return cls(specs, variants, meta["input_shape"], str(meta.get("model_ref", "")))


# ---------------------------------------------------------------------------- switching

@dataclass
class SwitchReport:
    """What one switch did: the blocks replaced (block, old choice, new choice), bytes, time."""

    changed: list[tuple[str, str, str]]
    bytes_loaded: int
    seconds: float


class BlockSwitcher:
    """One live model; a new selection replaces only the blocks whose choice changed.

    `source(block, choice)` returns the module to use (e.g. a loader reading
    `<dir>/<block>/<choice>.safetensors`, or `lambda b, c: copy.deepcopy(sm.variant(b, c))`);
    it is called once per changed block, and what it returns goes into the live model as is.
    """

    def __init__(self, source: Callable[[str, str], nn.Module], block_names: Sequence[str],
                 initial: Selection) -> None:
        self.source = source
        self.block_names = list(block_names)
        if len(set(self.block_names)) != len(self.block_names) or not self.block_names:
            raise ValueError(f"block_names must be unique and non-empty, got {self.block_names}")
        self.selection = self._normalize(initial)
        self.model = nn.Sequential(*(self._load(b, c) for b, c in zip(self.block_names, self.selection)))

    def _normalize(self, sel: Selection) -> list[str]:
        if isinstance(sel, Mapping):
            missing = [b for b in self.block_names if b not in sel]
            unknown = sorted(set(sel) - set(self.block_names))
            if missing or unknown:
                raise ValueError(f"selection must name every block exactly: missing {missing or 'none'}, "
                                 f"unknown {unknown or 'none'}")
            sel = [sel[b] for b in self.block_names]
        sel = list(sel)
        if len(sel) != len(self.block_names):
            raise ValueError(f"selection has {len(sel)} choices for {len(self.block_names)} blocks")
        return [_check_choice(c) for c in sel]

    def _load(self, block: str, choice: str) -> nn.Module:
        module = self.source(block, choice)
        if not isinstance(module, nn.Module):
            raise TypeError(f"source({block!r}, {choice!r}) returned {type(module).__name__}, not an nn.Module")
        return module.eval()

    def switch(self, sel: Selection) -> SwitchReport:
        """Move to `sel`. All new blocks load before any is swapped in, so a failing load leaves
        the live model and `selection` as they were."""
        start = time.perf_counter()
        new = self._normalize(sel)
        todo = [(i, b, old, c) for i, (b, old, c) in enumerate(zip(self.block_names, self.selection, new)) if old != c]
        loaded = [(i, self._load(b, c)) for i, b, _, c in todo]
        for i, module in loaded:
            self.model[i] = module
        self.selection = new
        return SwitchReport(
            changed=[(b, old, c) for _, b, old, c in todo],
            bytes_loaded=sum(module_nbytes(m) for _, m in loaded),
            seconds=time.perf_counter() - start,
        )
