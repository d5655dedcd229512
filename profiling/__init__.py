"""Profiling: what every descendant costs (params, bytes, FLOPs, peak memory, latency) and
loses (accuracy drop, calibrated), collected in the ProfileTable that the optimizer reads.

Only the table API is re-exported here: it is pure Python, so reading a table does not
import torch. The measuring modules (cost, latency, accuracy, calibrate, profile) are
imported by name.
"""

from profiling.table import SCHEMA_VERSION, ChoiceProfile, ProfileTable, TableError, load, save, to_problem

__all__ = ["SCHEMA_VERSION", "ChoiceProfile", "ProfileTable", "TableError", "load", "save", "to_problem"]
