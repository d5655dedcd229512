"""Errors of the bundle/store/device path.

They are separate classes so that callers (the fetch CLI, the pipeline) can tell "the bundle
is not trustworthy" (refuse, change nothing) from "the store is unreachable" (retry later).
Every message names the object and says what to do about it.
"""

from __future__ import annotations


class BundleError(Exception):
    """Base class of everything infra raises about bundles and stores."""


class BundleVerificationError(BundleError):
    """A signature, size or SHA-256 check failed, or a manifest is malformed: refuse it."""


class StoreError(BundleError):
    """The store could not do what was asked (missing object, no access, bad URI)."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class DownloadInterruptedError(StoreError):
    """The connection dropped before the whole object arrived.

    The bytes received so far stay in the `.part` file, so running the same download again
    continues where this one stopped (an HTTP Range request) instead of starting over.
    """


class DowngradeError(BundleVerificationError):
    """A store offers an older version than the device already runs: a rollback, refused
    unless the caller allows downgrades."""


class InfeasibleBudgetError(BundleError):
    """No selection of the fetched bundles fits the budgets."""


class OverBudgetError(BundleError):
    """The chosen models, timed end to end on the device, still run over the latency budget."""


class RuntimeUnavailableError(BundleError):
    """The requested device runtime (torch or onnxruntime) is not installed or cannot run here."""
