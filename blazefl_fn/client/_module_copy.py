"""Private machinery of local computation: per-thread working copies of a template module,
loading parameters into them, the plain SGD step and the float64 loss accumulator."""

from __future__ import annotations

import copy
import math
import threading
import weakref

import torch

from ..tree import Params

# One private working copy of each template per thread. ``copy.deepcopy`` of a module costs
# ~0.65 ms for the small CNN (26 ms for ResNet-18) and holds the GIL, which dominated rounds of
# many tiny clients; a copy is instead reused by the next call in the same thread. Reuse cannot
# change results: `load_params` overwrites every entry of the state dict (all parameters and
# persistent buffers), gradients are cleared after every step, and modules with state outside
# the state dict (non-persistent buffers) are never reused. Weak keys: a template that is no
# longer used elsewhere is not kept alive by this cache.
_scratch = threading.local()


def working_copy(template: torch.nn.Module) -> torch.nn.Module:
    """This thread's private copy of ``template`` (reused across calls; see `_scratch`)."""
    if _has_hidden_state(template):
        return copy.deepcopy(template)
    cache: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] | None = getattr(
        _scratch, "modules", None
    )
    if cache is None:
        cache = weakref.WeakKeyDictionary()
        _scratch.modules = cache
    module = cache.get(template)
    if module is None:
        module = copy.deepcopy(template)
        cache[template] = module
    return module


def _has_hidden_state(module: torch.nn.Module) -> bool:
    kept = module.state_dict(keep_vars=True)
    return any(name not in kept for name, _ in module.named_buffers())


def load_params(template: torch.nn.Module, params: Params) -> torch.nn.Module:
    module = working_copy(template)
    # load_state_dict copies values into the module's own tensors: `params` stays untouched.
    # strict=True (the default) guarantees every entry is overwritten.
    module.load_state_dict(params)
    for p in module.parameters():
        p.grad = None
    return module


def accumulate(total: torch.Tensor | None, loss: torch.Tensor, count: int) -> torch.Tensor:
    # Summed on the loss's device in float64, read once per client by `mean_loss`: a ``float()``
    # per batch would stall a GPU at every step. Same bits as summing Python floats: float64
    # holds a float32 exactly, and each product and sum rounds as a Python float's would.
    term = loss.detach().to(torch.float64) * count
    return term if total is None else total + term


def mean_loss(total: torch.Tensor | None, count: int) -> float:
    return float(total) / count if total is not None and count else math.nan


def sgd_step(parameters: list[torch.nn.Parameter], lr: float) -> None:
    # ``p -= lr * grad``, the arithmetic of torch.optim.SGD without momentum. Not using
    # torch.optim here saves its per-step overhead and a one-off ~2 s import of torch._dynamo
    # that its constructor triggers in every fresh process.
    with torch.no_grad():
        for p in parameters:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None
