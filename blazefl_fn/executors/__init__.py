"""Executors: pluggable maps of client work; every executor gives the same bits."""

from .base import Executor as Executor
from .processes import Processes as Processes
from .processes import WorkerError as WorkerError
from .ray_pool import Ray as Ray
from .sequential import Sequential as Sequential
from .threads import Threads as Threads

__all__ = ["Executor", "Processes", "Ray", "Sequential", "Threads", "WorkerError"]
