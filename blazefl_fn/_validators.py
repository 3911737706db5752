"""attrs validators shared by the config records; each error names the field and the value."""

from __future__ import annotations

import ipaddress
import math
import numbers
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs

Validator = Callable[[object, "attrs.Attribute[Any]", object], None]


@attrs.frozen
class Bounded:
    """A validator that knows its range (``what`` and ``bound``), so the docs can print it."""

    what: str
    bound: str
    test: Callable[[object], bool]

    def __call__(self, _instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not self.test(value):
            raise ValueError(f"{attribute.name} must be {self.what} {self.bound}, got {value!r}")


def documented_range(validator: object) -> str | None:
    """The range a field's validator accepts, in words (None: not a `Bounded` validator)."""
    if isinstance(validator, Bounded):
        return f"{validator.bound}"
    inner = getattr(validator, "validator", None)  # attrs.validators.optional
    if inner is not None and inner is not validator:
        found = documented_range(inner)
        return None if found is None else f"{found}, or unset"
    return None


def int_at_least(low: int, high: int | None = None) -> Bounded:
    """An int (not a bool) ``>= low`` and, given ``high``, ``<= high``."""
    bound = f">= {low}" if high is None else f"in [{low}, {_integer(high)}]"

    def test(value: object) -> bool:
        return (
            not isinstance(value, bool)
            and isinstance(value, int)
            and value >= low
            and (high is None or value <= high)
        )

    return Bounded("an integer", bound, test)


def _integer(value: int) -> str:
    """``value`` as people write it: ``2**128 - 1`` rather than 39 digits."""
    if value >= 2**32 and (value + 1) & value == 0:
        return f"2**{value.bit_length()} - 1"
    return str(value)


def finite_number(
    *, positive: bool, high: float | None = None, below: float | None = None
) -> Bounded:
    """A finite int or float (not a bool), ``> 0`` if ``positive`` else ``>= 0``, and
    ``<= high`` given ``high`` (``< below`` given ``below``). ``-0.0`` counts as negative: pass
    it through `plus_zero`."""
    opening = "(" if positive else "["
    if below is not None:
        bound = f"in {opening}0, {below:g})"
    elif high is not None:
        bound = f"in {opening}0, {high:g}]"
    else:
        bound = "> 0" if positive else ">= 0"

    def test(value: object) -> bool:
        return (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0 and math.copysign(1.0, value) > 0)
            and (high is None or value <= high)
            and (below is None or value < below)
        )

    return Bounded("a finite number", bound, test)


MIN_NOISE_MULTIPLIER = 1e-3


def noise_multiplier(low: float = MIN_NOISE_MULTIPLIER) -> Bounded:
    """A DP noise multiplier: 0 (no noise) or a finite number in ``[low, 1e6]``.

    Below 0.001 the epsilon of even one round is past 10**7, meaningless as a guarantee, and
    the accountants' arithmetic breaks down (``z**2`` underflows to 0 near 1e-154). An
    accountant takes down to half of it: local DP is charged at ``z / 2``.
    """

    def test(value: object) -> bool:
        return (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.copysign(1.0, value) > 0
            and (value == 0 or low <= value <= 1e6)
        )

    return Bounded("0 (no noise) or a finite number", f"in [{low:g}, 1e+06]", test)


def plus_zero(value: float) -> float:
    """``-0.0`` as ``0.0`` (the same number; libraries that check the sign bit refuse it).

    Anything else passes unchanged, to the field's validator.
    """
    if isinstance(value, float) and value == 0.0:
        return 0.0
    return value


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


def check_timeout(name: str, value: object) -> float | None:
    """``value`` if it is None or a finite number of seconds > 0.

    Raises:
        ValueError: anything else (bools, strings, 0, negative, NaN, infinity).
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < math.inf  # also refuses NaN
    ):
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def check_ip_address(name: str, value: str) -> str:
    """``value`` if it is an IPv4 or IPv6 address (not a host name).

    Raises:
        ValueError: anything else, e.g. ``"not-an-ip"`` or ``"999.1.1.1"``.
    """
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{name} must be an IP address, got {value!r}") from None
    return value


def check_local_ip(name: str, value: str) -> str:
    """``value`` if it is an IP address this machine can bind (one of its own).

    Raises:
        ValueError: not an IP address, or not one of this machine's (Ray would wait for it
            for minutes).
    """
    address = ipaddress.ip_address(check_ip_address(name, value))
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((value, 0))
        except OSError as exc:
            raise ValueError(
                f"{name} {value} is not an address of this machine ({exc.strerror or exc})"
            ) from None
    return value


_RAY_ADDRESS = re.compile(
    r"(?:ray://)?(?P<host>[A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})"
)


def check_ray_address(name: str, value: str) -> str:
    """``value`` if it is ``auto`` or ``[ray://]HOST:PORT`` with a port in 1..65535.

    Raises:
        ValueError: any other form.
    """
    match = _RAY_ADDRESS.fullmatch(value)
    if value != "auto" and (match is None or not 1 <= int(match.group("port")) <= 65535):
        raise ValueError(
            f"{name} must be auto or HOST:PORT (port 1-65535, optionally ray://), got {value!r}"
        )
    return value


def check_weights(weights: Sequence[float], count: int, *, signed: bool = False) -> list[float]:
    """``weights`` as floats: ``count`` of them, real numbers (not bools), finite and, unless
    ``signed``, ``>= 0``; else TypeError or ValueError naming the first bad one."""
    if len(weights) != count:
        raise ValueError(f"got {count} trees but {len(weights)} weights")
    checked: list[float] = []
    for i, w in enumerate(weights):
        value = cast(object, w)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"weights[{i}] must be a real number, got {w!r}")
        as_float = float(value)
        if not math.isfinite(as_float) or (as_float < 0.0 and not signed):
            rule = "finite" if signed else "finite and >= 0"
            raise ValueError(f"weights[{i}] must be {rule}, got {w!r}")
        checked.append(as_float)
    return checked
