"""attrs validators shared by the config records; each error names the field and the value."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

Validator = Callable[[object, "attrs.Attribute[Any]", object], None]


def int_at_least(low: int) -> Validator:
    """An int (not a bool) ``>= low``."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{attribute.name} must be an integer >= {low}, got {value!r}")

    return check


def finite_number(*, positive: bool) -> Validator:
    """A finite int or float (not a bool), ``> 0`` if ``positive`` else ``>= 0``."""
    bound = "> 0" if positive else ">= 0"

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0)
        )
        if not ok:
            raise ValueError(f"{attribute.name} must be a finite number {bound}, got {value!r}")

    return check


def one_of(options: tuple[str, ...]) -> Validator:
    """One of ``options``."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in options:
            raise ValueError(f"unknown {attribute.name} {value!r}; choose from {list(options)}")

    return check


def check_positive_finite(name: str, value: object) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) ``> 0``; else ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_int_at_least(name: str, value: object, low: int) -> int:
    """``value`` if it is an int (not a bool) ``>= low``; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
