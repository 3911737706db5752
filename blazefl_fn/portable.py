"""Portable numerics: the same bits on x86-64 CPUs of any model, at a measured cost.

Three kernel families in a CPU build of torch choose their code path by the CPU's instruction
set, and each path rounds differently: ATen's own vectorised kernels (``ATEN_CPU_CAPABILITY``),
MKL's BLAS (``MKL_CBWR``, with ``MKL_DYNAMIC``) and oneDNN's convolutions
(``ONEDNN_MAX_CPU_ISA``). Portable mode pins all three to baseline paths (`PINS`) that every
x86-64 CPU with SSE4.1 (x86-64-v2, which this torch and numpy need anyway) runs alike. Each
library reads its variable once, when it first runs a kernel, so the pins must be in the
environment before then.

- The CLI's ``blazefl-fn run --portable`` starts itself again with the pins in place when its
  environment lacks them, whatever the user's environment said.
- From Python, call `enable` before the first tensor operation of the process (importing
  blazefl_fn and torch runs none); `blazefl_fn.run.simulate.simulate` does for a config with
  ``portable=True``. Worker processes inherit the pins (spawned after `enable`); Ray actors get
  them through their runtime environment.

Out of scope: GPUs (a portable config refuses CUDA devices), other torch, numpy or glibc
versions, other CPU architectures (ARM), and float64 model arithmetic (glibc picks FMA or
non-FMA versions of its float64 ``exp``/``log``/``pow`` by CPU; the pins cover float32 models).

Examples:
    >>> sorted(PINS)
    ['ATEN_CPU_CAPABILITY', 'MKL_CBWR', 'MKL_DYNAMIC', 'ONEDNN_MAX_CPU_ISA']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
"""The environment variables portable mode sets, and their values (read-only)."""


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


def enable() -> None:
    """Pin this process (and every worker process it starts afterwards) to portable numerics.

    The mode lasts for the rest of the process. Runs record what is in effect (`numerics`),
    whatever their config says.

    Raises:
        RuntimeError: ATen already runs kernels of another instruction set in this process,
            i.e. some tensor operation ran before this call; the environment is then left as
            it was, and the message says how to start portable instead.
    """
    previous = {name: os.environ.get(name) for name in PINS}
    os.environ.update(PINS)
    capability = cpu_capability()
    if capability == "DEFAULT":
        return
    for name, value in previous.items():
        # Otherwise workers started later would be pinned while this process is not.
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    raise RuntimeError(
        f"portable numerics must be enabled before torch runs its first kernel, but this "
        f"process already uses {capability} kernels; call blazefl_fn.portable.enable() "
        f"first, or start the process with " + " ".join(f"{k}={v}" for k, v in PINS.items())
    )


def numerics() -> dict[str, object]:
    """What a run records about its arithmetic: whether this process is portable (pinned and
    on ATen's baseline kernels), and ATen's capability."""
    capability = cpu_capability()
    return {"portable": pinned() and capability == "DEFAULT", "cpu_capability": capability}
