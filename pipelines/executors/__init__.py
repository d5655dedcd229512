"""Executors run the units of a stage; `pipelines.units` does everything else.

`LocalExecutor` runs them one after another in this process (tests, benchmarks, a laptop
without Ray); `RayExecutor` submits them as Ray tasks (retries, SPREAD scheduling, a cluster
under `ray job submit`) and the joint stage as a Ray Train job. Both call
`pipelines.units.execute_unit`, so both write identical artifacts for the same config.
"""

from pipelines.executors.local import LocalExecutor
from pipelines.executors.ray import RayExecutor, RayUnreachableError, check_ray_address, connect_ray

__all__ = ["LocalExecutor", "RayExecutor", "RayUnreachableError", "check_ray_address", "connect_ray"]
