"""Profiling: what every descendant costs (params, bytes, FLOPs, peak memory, latency) and
loses (accuracy drop, calibrated), collected in the ProfileTable that the optimizer reads.

Only the table and serving API is re-exported here: it is pure Python, so reading a table
and turning it into an optimizer problem does not import torch. The measuring modules (cost,
latency, accuracy, calibrate, profile) are imported by name.
"""

from profiling.serving import Told, to_problem, told
from profiling.table import SCHEMA_VERSION, ChoiceProfile, Measured, ProfileTable, TableError, load, save

__all__ = ["SCHEMA_VERSION", "ChoiceProfile", "Measured", "ProfileTable", "TableError", "Told", "load", "save",
           "to_problem", "told"]
