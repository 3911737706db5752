"""Portable numerics: the same bits on any x86-64 CPU model, at a measured cost.

Three kernel families in a CPU build of torch choose their code path by the CPU's instruction
set, and each path rounds differently: ATen's own vectorised kernels (``ATEN_CPU_CAPABILITY``),
MKL's BLAS (``MKL_CBWR``, with ``MKL_DYNAMIC``) and oneDNN's convolutions
(``ONEDNN_MAX_CPU_ISA``). Portable mode pins all three to their baseline paths (`PINS`); every
x86-64 CPU has those, so every CPU computes the same bits. Each library reads its variable
once, when it first runs a kernel, so the pins must be in the environment before then.

- The CLI's ``blazefl-fn run --portable`` starts itself again with the pins in place when its
  environment lacks them, whatever the user's environment said.
- From Python, call `enable` before the first tensor operation of the process (importing
  blazefl_fn and torch runs none); `blazefl_fn.run.simulate` does for a config with
  ``portable=True``. Worker processes inherit the pins (spawned after `enable`); Ray actors get
  them through their runtime environment.

Out of scope: GPUs (their kernels are another matter), other torch versions, other CPU
architectures (ARM), and intra-op thread counts other than the run's ``threads``.

Example:
    >>> sorted(PINS)
    ['ATEN_CPU_CAPABILITY', 'MKL_CBWR', 'MKL_DYNAMIC', 'ONEDNN_MAX_CPU_ISA']
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType

import torch

__all__ = ["PINS", "cpu_capability", "enable", "numerics", "pinned", "with_pins"]

PINS: Mapping[str, str] = MappingProxyType(
    {
        "ATEN_CPU_CAPABILITY": "default",  # ATen: the baseline (non-AVX) kernels
        "MKL_CBWR": "COMPATIBLE",  # MKL: conditional numerical reproducibility, any CPU
        "MKL_DYNAMIC": "FALSE",  # MKL: never change the thread count on its own
        "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN: the baseline instruction set
    }
)


def pinned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default: this process's) holds every pin with its value."""
    env = os.environ if environ is None else environ
    return all(env.get(name) == value for name, value in PINS.items())


def with_pins(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the pins put over whatever it held for those variables."""
    return {**environ, **PINS}


def cpu_capability() -> str:
    """The instruction set ATen's kernels use in this process (``DEFAULT``, ``AVX2``, ...).

    Asking fixes it for the process: call it after `enable` when the run is portable.
    """
    return str(torch.backends.cpu.get_cpu_capability())


def enable(environ: MutableMapping[str, str] | None = None) -> None:
    """Pin this process (and every worker process it starts afterwards) to portable numerics.

    Raises:
        RuntimeError: ATen already runs kernels of another instruction set in this process,
            i.e. some tensor operation ran before this call; the message says how to start
            portable instead.
    """
    env = os.environ if environ is None else environ
    env.update(PINS)
    capability = cpu_capability()
    if capability != "DEFAULT":
        raise RuntimeError(
            f"portable numerics must be enabled before torch runs its first kernel, but this "
            f"process already uses {capability} kernels; call blazefl_fn.portable.enable() "
            f"first, or start the process with " + " ".join(f"{k}={v}" for k, v in PINS.items())
        )


def numerics(portable: bool) -> dict[str, object]:
    """What a run records about its arithmetic: portable or not, and ATen's capability."""
    return {"portable": portable, "cpu_capability": cpu_capability()}
