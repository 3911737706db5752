"""The default workloads, the ``--quick`` variants and ``--set`` overrides."""

from __future__ import annotations

import dataclasses

from .spec import Workload

__all__ = ["DEFAULT", "QUICK", "override"]

DEFAULT: dict[str, Workload] = {
    w.name: w
    for w in (
        # Compute-heavier: CIFAR-10-shaped, small CNN, 100 clients x 500, all every round.
        Workload("W1", "cnn", clients=100, samples=500, epochs=1, batch_size=50, lr=0.1, rounds=3),
        # More compute per message: 5 local epochs (20 clients, so a round costs what W1's does).
        Workload(
            "W1-e5", "cnn", clients=20, samples=500, epochs=5, batch_size=50, lr=0.1, rounds=2,
            parallelism=(2,),
        ),
        # A large model (11.2 M parameters, 45 MB per message) at a size 2 cores can afford.
        Workload(
            "W1-resnet18", "resnet18", clients=4, samples=50, epochs=1, batch_size=50, lr=0.1,
            rounds=2, parallelism=(2,),
        ),
        # Communication-dominated: 1000 clients x 50 examples, one local step each.
        Workload(
            "W0", "cnn", clients=1000, samples=50, epochs=1, batch_size=50, lr=0.1, rounds=1,
            parallelism=(2,),
        ),
    )
}  # fmt: skip

QUICK: dict[str, Workload] = {
    "W1": dataclasses.replace(DEFAULT["W1"], clients=10, samples=100, rounds=2, parallelism=(2,)),
    "W0": dataclasses.replace(DEFAULT["W0"], clients=50, rounds=2),
}

_FIELDS = {f.name: f.type for f in dataclasses.fields(Workload)}


def override(workloads: dict[str, Workload], assignment: str) -> dict[str, Workload]:
    """Apply one ``NAME.FIELD=VALUE`` (``*.FIELD=VALUE`` for every workload).

    ``parallelism`` takes a comma-separated list.

    Raises:
        ValueError: a malformed assignment, an unknown workload or field.
    """
    target, sep, value = assignment.partition("=")
    name, dot, field = target.partition(".")
    if not sep or not dot or field not in _FIELDS or field == "name":
        raise ValueError(f"--set wants WORKLOAD.FIELD=VALUE with FIELD in {sorted(_FIELDS)}")
    names = list(workloads) if name == "*" else [name]
    out = dict(workloads)
    for n in names:
        if n not in workloads:
            raise ValueError(f"--set: unknown workload {n!r} (have {sorted(workloads)})")
        current = getattr(workloads[n], field)
        parsed: object
        if field == "parallelism":
            parsed = tuple(int(v) for v in value.split(","))
        else:
            parsed = type(current)(value)
        out[n] = dataclasses.replace(workloads[n], **{field: parsed})
    return out
