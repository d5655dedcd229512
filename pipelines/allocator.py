"""Keep freed memory in the process, so training and evaluation stop paying page faults.

glibc's malloc serves an allocation above its mmap threshold (128 KiB, raised as large
blocks are freed, to 32 MiB at most) with fresh pages from the kernel and returns them on
free. A CNN on CPU allocates activations of tens to hundreds of MB op after op (a 28x28
MobileNetV2 at batch 128: 38 MB per 96-channel map), so each op's output is faulted in and
zeroed by the kernel again (docs/benchmarks/allocator.md measures what that costs). Raising
the mmap and trim thresholds keeps those blocks in the heap for reuse.
The arithmetic is unchanged (same bits); the cost is that a process keeps up to
`KEEP_BYTES` of freed memory instead of returning it.

Units call `keep_freed_memory` where they run (`pipelines.units.execute_unit`, the joint
stage's Ray Train workers): a process-wide setting of the C allocator, idempotent, and a
no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import platform

KEEP_BYTES = 1 << 30  # 1 GiB: above any activation of the models this pipeline trains on CPU
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Set glibc's mmap and trim thresholds to `keep_bytes` for this process (cheap, idempotent).

    Args:
        keep_bytes: allocations below this come from the heap, and up to this much freed
            memory stays there.

    Returns:
        Whether the allocator took the setting (False off glibc, e.g. macOS or musl).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, keep_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes))
    except (OSError, AttributeError):
        return False
