"""Executors: pluggable maps of client work; every executor gives the same bits."""

from .base import Executor as Executor
from .sequential import Sequential as Sequential

__all__ = ["Executor", "Sequential"]
