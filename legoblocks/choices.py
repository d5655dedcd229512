"""Choice ids: how a descendant of a block is named everywhere (tables, bundles, selections).

A choice id is the string of a descendant's sparsity (`choice_id(0.2) == "0.2"`), and
`ORIGINAL` ("0.0") is the untouched original block. Pure Python: the device side and the
profile table read choice ids without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

ORIGINAL = "0.0"
"""The choice id of the untouched original block (sparsity 0.0): never retrained, drop 0."""


def _check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"sparsity must be in [0, 1): the fraction of inner filters removed (0.0 keeps the block "
            f"unchanged, 1.0 would remove every filter); got {sparsity!r}"
        )
    return value


def choice_id(sparsity: float) -> str:
    """The string id of a descendant: `choice_id(0.2) == "0.2"`, `choice_id(0) == "0.0"`.

    Rounded to 6 decimals so float noise (0.30000000000000004) maps to the same id.
    """
    return str(round(_check_sparsity(sparsity), 6))


def sparsity_of(choice: str) -> float:
    """The sparsity a choice id names (`sparsity_of("0.4") == 0.4`)."""
    return float(choice)


def sorted_choices(choices: Iterable[str]) -> list[str]:
    """Choice ids from the original to the sparsest."""
    return sorted(choices, key=sparsity_of)


def original_selection(block_names: Sequence[str]) -> list[str]:
    """The selection that is the original model: every block at `ORIGINAL`."""
    return [ORIGINAL] * len(block_names)


def smallest_selection(block_names: Sequence[str], choices: Mapping[str, Iterable[str]]) -> list[str]:
    """The sparsest descendant of every block."""
    return [max(choices[b], key=sparsity_of) for b in block_names]


def validate_ladder(ladder: Iterable[float]) -> list[float]:
    """Sorted, checked sparsities with 0.0 (the original) always included."""
    values = [_check_sparsity(s) for s in ladder]
    ids = [choice_id(v) for v in values]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"ladder repeats sparsity {', '.join(dupes)}; give each value once")
    return sorted(set(values) | {0.0})
