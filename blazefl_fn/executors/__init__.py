"""Executors: pluggable maps of client work; every executor gives the same bits.

`base` defines the `Executor` protocol; `sequential`, `threads`, `processes`, `ray_pool` and
`vectorized` are the executors (one client at a time, threads, worker processes, a Ray cluster,
chunks of clients in one vectorised step). `jobs` holds what travels to a worker (a client's
job, the global-RNG guard, `VectorizedUpdate`) and `devices` where tensors live (CPU or CUDA,
one device per worker) and CUDA's deterministic settings.
"""

from .base import Executor as Executor
from .processes import Processes as Processes
from .ray_pool import Ray as Ray
from .ray_pool import join_ray_cluster as join_ray_cluster
from .sequential import Sequential as Sequential
from .threads import Threads as Threads
from .vectorized import Vectorized as Vectorized

__all__ = [
    "Executor",
    "Processes",
    "Ray",
    "Sequential",
    "Threads",
    "Vectorized",
    "join_ray_cluster",
]
