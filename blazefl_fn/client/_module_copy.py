"""Private machinery of local computation: per-thread working copies of a template module,
loading parameters into them, the plain SGD step and the float64 loss accumulator."""

from __future__ import annotations

import copy
import math
import threading
import weakref
from typing import Any, cast

import attrs
import torch

from ..tree import Params, from_module

# One private working copy of each template per thread. ``copy.deepcopy`` of a module costs
# ~0.65 ms for the small CNN (26 ms for ResNet-18) and holds the GIL, which dominated rounds of
# many tiny clients; a copy is instead reused by the next call in the same thread. Reuse cannot
# change results: `load_params` overwrites every entry of the state dict (all parameters and
# persistent buffers), gradients are cleared after every step, and modules with state outside
# the state dict (non-persistent buffers) are never reused. Weak keys: a template that is no
# longer used elsewhere is not kept alive by this cache.
_scratch = threading.local()
_Module = torch.nn.Module


def working_copy(template: torch.nn.Module) -> torch.nn.Module:
    """This thread's private copy of ``template`` (reused across calls; see `_scratch`)."""
    return _copy_of(template)[0]


def _copy_of(template: torch.nn.Module) -> tuple[torch.nn.Module, _Layout | None]:
    """This thread's copy of ``template`` and its `_Layout` (None: load it the general way)."""
    cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.nn.Module, _Layout | None]]
    cache = getattr(_scratch, "modules", None) or weakref.WeakKeyDictionary()
    _scratch.modules = cache
    found = cache.get(template)
    if found is not None:
        return found
    module = copy.deepcopy(template)
    if _has_hidden_state(template):
        # Never reused, and the verdict is not cached: every call gets a fresh copy.
        return module, None
    # Like the copy, the layout is of the template as first seen (templates are values).
    found = (module, _Layout.of(module))
    cache[template] = found
    return found


def _has_hidden_state(module: torch.nn.Module) -> bool:
    kept = module.state_dict(keep_vars=True)
    return any(name not in kept for name, _ in module.named_buffers())


# A module's hooks on saving and loading its state dict (instance attributes of nn.Module).
_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _method(cls: type, name: str) -> object:
    return getattr(cls, name)


# BatchNorm's override only adds a missing ``num_batches_tracked`` entry (to old state dicts)
# before loading as every module does: a layout loads only complete state dicts, so it is plain.
_LOAD = "_load_from_state_dict"
_PLAIN_LOADS = (_method(_Module, _LOAD), _method(torch.nn.modules.batchnorm.BatchNorm1d, _LOAD))


def _plain(module: torch.nn.Module) -> bool:
    """Whether ``module``'s state dict is exactly its parameters and persistent buffers, loaded
    by ``copy_`` and put in train mode by the stock ``train``: no hook or override changes it."""
    methods = ("_save_to_state_dict", "state_dict", "load_state_dict", "get_extra_state", "train")
    return all(
        _method(type(m), _LOAD) in _PLAIN_LOADS
        and all(_method(type(m), name) is _method(_Module, name) for name in methods)
        and not any(m.__dict__.get(hooks) for hooks in _HOOKS)
        for m in module.modules()
    )


@attrs.frozen(eq=False)
class _Layout:
    """Where a working copy's state dict lives: every entry's tensor and the dict holding it.

    ``load_state_dict`` and ``state_dict`` walk the module tree in Python at every call (~0.1
    ms for the small CNN, a large part of a tiny client's overhead); a `_Layout` reads and
    writes the same tensors directly. It is used only while `current` confirms that the tree
    still holds exactly these tensors, so a module that swaps or adds entries takes the
    general path and gets what ``load_state_dict`` and ``state_dict`` give.
    """

    entries: tuple[tuple[str, torch.Tensor], ...]  # the state dict's tensors, in its order
    names: frozenset[str]
    owners: tuple[tuple[dict[str, Any], str], ...]  # the dict and key holding each entry
    modules: tuple[torch.nn.Module, ...]
    counts: tuple[int, ...]  # parameters + buffers + children of each module
    parameters: tuple[tuple[str, torch.nn.Parameter], ...]  # named_parameters()

    @staticmethod
    def of(module: torch.nn.Module) -> _Layout | None:
        if not _plain(module):
            return None
        state = module.state_dict(keep_vars=True)
        owners: list[tuple[dict[str, Any], str]] = []
        for name, tensor in state.items():
            prefix, _, attr = name.rpartition(".")
            owner = module.get_submodule(prefix)
            held = owner._parameters  # pyright: ignore[reportPrivateUsage]
            if attr not in held:
                held = owner._buffers  # pyright: ignore[reportPrivateUsage]
            if held.get(attr) is not tensor:
                return None  # not where its name says: load the general way
            owners.append((cast(dict[str, Any], held), attr))
        modules = tuple(module.modules())
        return _Layout(
            entries=tuple(state.items()),
            names=frozenset(state),
            owners=tuple(owners),
            modules=modules,
            counts=_counts(modules),
            parameters=tuple(module.named_parameters()),
        )

    def current(self) -> bool:
        """Whether the module still holds exactly these tensors (nothing swapped or added)."""
        return _counts(self.modules) == self.counts and all(
            held.get(attr) is t
            for (held, attr), (_, t) in zip(self.owners, self.entries, strict=True)
        )

    def load(self, params: Params) -> bool:
        """Copy ``params`` in as ``load_state_dict`` would (``copy_``); False: not done, use it."""
        if (
            frozenset(params) != self.names
            or torch.__future__.get_swap_module_params_on_conversion()
            or not self.current()
        ):
            return False
        sources = [params[name] for name, _ in self.entries]
        if not all(
            isinstance(cast(object, s), torch.Tensor) and s.shape == t.shape
            for s, (_, t) in zip(sources, self.entries, strict=True)
        ):
            return False  # load_state_dict raises the precise error
        with torch.no_grad():
            for source, (_, target) in zip(sources, self.entries, strict=True):
                target.copy_(source)
        return True


def _counts(modules: tuple[torch.nn.Module, ...]) -> tuple[int, ...]:
    return tuple(
        len(m._parameters) + len(m._buffers) + len(m._modules)  # pyright: ignore[reportPrivateUsage]
        for m in modules
    )


def load_params(template: torch.nn.Module, params: Params) -> torch.nn.Module:
    """This thread's working copy of ``template`` holding ``params``, gradients cleared."""
    module, layout = _copy_of(template)
    # Both paths copy values into the module's own tensors: `params` stays untouched, and
    # every entry is overwritten (strict).
    if layout is not None and layout.load(params):
        # The layout is current: its parameters are the module's, without a walk of the tree
        # (~12 us of GIL-held Python per client for the small CNN).
        parameters = (p for _, p in layout.parameters)
    else:
        module.load_state_dict(params)
        parameters = module.parameters()
    for p in parameters:
        p.grad = None
    return module


def train_mode(module: torch.nn.Module) -> None:
    """``module.train()``, skipped when a plain module (`_plain`) is in train mode already."""
    layout = _layout_of(module)
    if layout is None or not layout.current() or not all(m.training for m in layout.modules):
        module.train()


def trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``module``'s named parameters that require gradients, in ``named_parameters`` order."""
    layout = _layout_of(module)
    named = (
        layout.parameters if layout is not None and layout.current() else module.named_parameters()
    )
    return [(n, p) for n, p in named if p.requires_grad]


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`blazefl_fn.tree.from_module` of ``module``: detached copies of its state dict."""
    layout = _layout_of(module)
    if layout is None or not layout.current():
        return from_module(module)
    return {name: t.detach().clone() for name, t in layout.entries}


def _layout_of(module: torch.nn.Module) -> _Layout | None:
    cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.nn.Module, _Layout | None]]
    cache = getattr(_scratch, "modules", None) or weakref.WeakKeyDictionary()
    for copy_, layout in cache.values():
        if copy_ is module:
            return layout
    return None


def accumulate(
    total: torch.Tensor | float | None, loss: torch.Tensor, count: int
) -> torch.Tensor | float:
    # The float64 sum of ``loss * count``, read once per client by `mean_loss`. On the CPU as
    # Python floats (three tensor ops per batch cost ~50 us); elsewhere on the loss's device,
    # since a ``float()`` per batch would stall a GPU at every step. Same bits either way:
    # float64 holds a float32 exactly, and each product and sum rounds as a Python float's would.
    if loss.device.type == "cpu":
        term = float(loss.detach()) * count
        return term if total is None else total + term
    tensor = loss.detach().to(torch.float64) * count
    return tensor if total is None else total + tensor


def mean_loss(total: torch.Tensor | float | None, count: int) -> float:
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
