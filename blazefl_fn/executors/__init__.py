"""Executors: pluggable maps of client work; every executor gives the same bits."""

from .base import Executor as Executor
from .processes import Processes as Processes
from .processes import WorkerError as WorkerError
from .ray_pool import Ray as Ray
from .sequential import Sequential as Sequential
from .threads import Threads as Threads
from .vectorized import PerClientFallback as PerClientFallback
from .vectorized import Vectorized as Vectorized

__all__ = [
    "Executor",
    "PerClientFallback",
    "Processes",
    "Ray",
    "Sequential",
    "Threads",
    "Vectorized",
    "WorkerError",
]
