"""Local training for a chunk of clients at once: stacked parameters, one step for all.

`train_chunk` computes what `blazefl_fn.client.training.train` computes for each client of a
chunk, in one vectorised step per local step instead of one small step per client:

- each client's batches come from its own key, exactly as `ClientData.batches` orders them
  (the same permutations, drawn in the same sequence), and augmentation draws from the client
  key's ``"augment"`` child batch by batch, as on the per-client path;
- clients of unequal sizes are padded and masked: a padded row adds nothing to its client's
  loss, and a client whose data is used up (or that has none) stops changing, so its step and
  example counts are exact;
- the optimizer's stages (FedProx's `add_proximal`, `momentum`, ...) run per client through
  ``vmap``, their state stacked like the parameters; loss terms are not vectorised (a
  `LocalTraining` with loss terms trains one client at a time, see `vectorizable`).

The results equal the per-client path's up to float rounding (a batched kernel sums in another
order), not bit for bit; for a given device and chunk they are bitwise reproducible.

Layers whose training draws randomness or writes state (dropout, BatchNorm's running
statistics) are refused with a `ValueError` naming the layer: their per-client semantics cannot
be kept inside one vectorised step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, vmap  # pyright: ignore[reportUnknownVariableType]
from torch.nn import functional as F

from ..data.datasets import ClientData
from ..keys import Key
from ..tree import Params, trees_equal
from ._module_copy import working_copy
from .optim import GradientTransform, StepInput
from .stochastic import KeyedDropout
from .training import LocalResult, LocalTraining, Trained

Tree = dict[str, torch.Tensor]

__all__ = ["check_vectorizable", "client_bytes", "train_chunk", "vectorizable"]

# Layers whose training has no per-client meaning inside one vmapped step: dropout draws from
# torch's global RNG; BatchNorm mixes the rows of a batch (padded rows included) and updates
# running statistics in place; InstanceNorm is per row, but its running statistics are not.
_STOCHASTIC: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    KeyedDropout,
)  # fmt: skip
_BATCH_MIXING: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)  # fmt: skip
_RUNNING_STATS: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip


def check_vectorizable(template: nn.Module) -> None:
    """Refuse a model whose training cannot be vectorised over clients.

    Raises:
        ValueError: a dropout layer with ``p > 0``, a BatchNorm layer, or an InstanceNorm
            layer that tracks running statistics (the message names the layer).

    A custom layer that mixes the rows of a batch is not detected: in a partial batch it
    would see the padding rows, so train such a model with a per-client executor.

    Examples:
        >>> check_vectorizable(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> try:
        ...     check_vectorizable(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
        ... except ValueError as error:
        ...     print(str(error)[:60])
        vectorised training cannot run layer '1' (Dropout(p=0.5, inp
    """
    # torch leaves named_modules' generator partly unannotated.
    layers = cast(list[tuple[str, nn.Module]], list(template.named_modules()))  # pyright: ignore[reportUnknownArgumentType]
    for name, layer in layers:
        reason = None
        if isinstance(layer, _STOCHASTIC) and cast(float, getattr(layer, "p", 0.0)) > 0:
            reason = (
                "keyed dropout draws one client's generator per step, not a chunk's"
                if isinstance(layer, KeyedDropout)
                else "dropout draws from torch's global RNG"
            )
        elif isinstance(layer, _BATCH_MIXING):
            reason = "it normalises over the rows of a padded batch"
        elif isinstance(layer, _RUNNING_STATS) and getattr(layer, "track_running_stats", False):
            reason = "its running statistics would be shared by every client of a chunk"
        if reason is not None:
            raise ValueError(
                f"vectorised training cannot run layer {name!r} ({layer}): {reason}; train "
                "this model with a per-client executor (sequential, threads, processes, ray)"
            )


def vectorizable(training: LocalTraining) -> bool:
    """Whether `train_chunk` vectorises ``training``: all of it but loss terms.

    Examples:
        >>> from blazefl_fn.client.training import LocalSGD
        >>> vectorizable(LocalSGD())
        True
    """
    return not training.loss_terms


def _trainable(module: nn.Module) -> dict[str, str]:
    """Every state-dict name of a trainable parameter -> the name it is trained under.

    A parameter tied to another (one tensor under two names) is trained once, under the
    first name `named_parameters` gives it, and returned under every name.
    """
    canonical = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    entries = module.state_dict(keep_vars=True).items()
    return {n: canonical[id(t)] for n, t in entries if id(t) in canonical}


def _device_of(params: Params) -> torch.device:
    for tensor in params.values():
        return tensor.device
    return torch.device("cpu")


def client_bytes(
    template: nn.Module, params: Params, data: ClientData, config: LocalTraining
) -> int:
    """About how many bytes one client adds to a vectorised chunk at its peak.

    Four copies of the trainable parameters (the stacked value, its gradient, the stepped
    value and one temporary), one padded batch, a copy of the client's examples, and the
    activations that autograd saves for one batch, measured by running one batch of ``data``
    (or of zeros shaped like it) through the model.

    Raises:
        ValueError: the model cannot be vectorised (`check_vectorizable`).
    """
    check_vectorizable(template)
    module = working_copy(template)
    module.train()
    aliases = _trainable(module)
    names = set(aliases.values())
    trainable = sum(t.numel() * t.element_size() for n, t in params.items() if n in names)
    rows = data.indices[: config.batch_size]
    x = data.base.x[rows]
    if x.shape[0] < config.batch_size:
        x = x.new_zeros((config.batch_size, *x.shape[1:]))
    if config.augment is not None:
        # Only the shape and dtype of the result matter; a key of its own, never the client's.
        x = config.augment(x, Key.from_seed(0).fold_in("probe").torch_generator())
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probe = {n: t.detach().clone().requires_grad_(n in names) for n, t in params.items()}
        out = functional_call(module, _untied(probe, aliases), (x,))
        y = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        F.cross_entropy(out, y, reduction="none")
    row = x[0].numel() * x.element_size() + 8  # one example and its label
    # The batch's inputs, labels and row indices, plus the chunk's copy of the client's rows
    # (`_pool`, when clients do not share one base dataset, as on a GPU).
    data_bytes = config.batch_size * (row + 8) + len(data) * row
    return 4 * trainable + data_bytes + saved


def _schedule(
    clients: Sequence[ClientData], keys: Sequence[Key], config: LocalTraining
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every client's batches as positions into its own indices: ``(C, S, B)``, a mask, steps.

    The permutations are drawn from each client's generator in the order `ClientData.batches`
    draws them (one per epoch), so the batches are the per-client path's batches.
    """
    size = config.batch_size

    def batches_of(n: int) -> int:  # per epoch, as `ClientData.batches` makes them
        return n // size if config.drop_last else math.ceil(n / size)

    steps = [config.epochs * batches_of(len(d)) for d in clients]
    longest = max(steps, default=0)
    positions = torch.zeros(len(clients), longest, size, dtype=torch.int64)
    valid = torch.zeros(len(clients), longest, size, dtype=torch.bool)
    for c, (data, key) in enumerate(zip(clients, keys, strict=True)):
        n = len(data)
        if n == 0:
            continue
        generator = key.torch_generator()
        per_epoch = batches_of(n)
        used = min(n, per_epoch * size)  # all rows, or the full batches' rows with drop_last
        order = torch.zeros(config.epochs, per_epoch * size, dtype=torch.int64)
        mask = torch.zeros(config.epochs, per_epoch * size, dtype=torch.bool)
        for epoch in range(config.epochs):
            order[epoch, :used] = torch.randperm(n, generator=generator)[:used]
            mask[epoch, :used] = True
        positions[c, : steps[c]] = order.view(-1, size)
        valid[c, : steps[c]] = mask.view(-1, size)
    return positions, valid, steps


def _pool(
    clients: Sequence[ClientData],
    positions: torch.Tensor,
    valid: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's examples as ``(x, y)`` plus each batch row's index into them ``(C, S, B)``.

    Clients that index one shared base dataset are read from it in place (the executors place
    it on the device once); otherwise their rows are first gathered into one tensor for the
    chunk.
    """
    offsets = torch.tensor([0, *(len(d) for d in clients)]).cumsum(0)[:-1]
    # Padding rows read the chunk's first example (masked out of the loss).
    flat = torch.where(valid, positions + offsets[:, None, None], 0)
    base = clients[0].base
    if all(d.base is base for d in clients):
        indices = torch.cat([d.indices.to(device) for d in clients])
        return base.x.to(device), base.y.to(device), indices[flat.to(device)]
    x = torch.cat([d.base.x[d.indices] for d in clients]).to(device)
    y = torch.cat([d.base.y[d.indices] for d in clients]).to(device)
    return x, y, flat.to(device)


def train_chunk(
    template: nn.Module,
    params: Params,
    clients: Sequence[ClientData],
    keys: Sequence[Key],
    config: LocalTraining,
) -> list[Trained]:
    """`train` for every client of a chunk at once, from the same starting ``params``.

    Args:
        template: the architecture (loaded with each client's stacked parameters in turn by
            ``torch.func.functional_call``; never written into).
        params: the starting parameters (the downlink), on the device to train on.
        clients: the chunk's data, on that device too.
        keys: each client's key (batch order and augmentation), as `train` takes it.
        config: local training (without loss terms: `vectorizable`).

    Returns:
        Per client, in order, what `train` returns: its trained parameters (new tensors), its
        `LocalResult` (loss ``nan`` for a client without data, whose parameters come back
        unchanged) and its optimizer's final state.

    Raises:
        ValueError: the model or ``config`` cannot be vectorised (`check_vectorizable`,
            `vectorizable`), or ``clients`` and ``keys`` differ in length.

    Examples:
        >>> import torch
        >>> from blazefl_fn.data.datasets import TensorDataset
        >>> net = nn.Linear(3, 2)
        >>> base = TensorDataset(torch.randn(12, 3), torch.arange(12) % 2)
        >>> clients = [ClientData(base, torch.arange(0, 5)), ClientData(base, torch.arange(5, 12))]
        >>> keys = [Key.from_seed(0).fold_in(c) for c in range(2)]
        >>> params = {k: v.detach() for k, v in net.state_dict().items()}
        >>> out = train_chunk(net, params, clients, keys, LocalTraining(batch_size=4))
        >>> [(sorted(t.params), t.result.steps) for t in out]
        [(['bias', 'weight'], 2), (['bias', 'weight'], 2)]
    """
    if len(clients) != len(keys):
        raise ValueError(f"got {len(clients)} clients but {len(keys)} keys")
    check_vectorizable(template)
    if not vectorizable(config):
        raise ValueError(
            f"loss terms are not vectorised (loss_terms={config.loss_terms!r}); train them "
            "one client at a time with `train`"
        )
    if not clients:
        return []
    device = _device_of(params)
    module = working_copy(template)
    module.train()
    aliases = _trainable(module)
    names = list(dict.fromkeys(aliases.values()))
    # Copies: a model that writes into a buffer in forward must not write into the downlink.
    fixed = {n: t.detach().clone() for n, t in params.items() if n not in aliases}
    count = len(clients)
    stacked = {n: params[n].detach().expand(count, *params[n].shape).clone() for n in names}
    positions, valid, steps = _schedule(clients, keys, config)
    x_pool, y_pool, rows = _pool(clients, positions, valid, device)
    counts = valid.sum(dim=2)  # (C, S): every batch's real size
    per_step: list[list[int]] = counts.T.numpy().tolist()
    masks = valid.to(device=device, dtype=torch.float32)
    sizes = counts.to(device)
    augments = [k.fold_in("augment").torch_generator() for k in keys] if config.augment else []

    def logits_of(trainable: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(module, {**fixed, **trainable}, (x,))  # ties follow `trainable`

    # vmap of the forward pass only; one ordinary backward then gives every client's gradient
    # (clients' losses do not share parameters, so the gradient of their sum is each one's
    # own), which costs far less Python per step than vmap of grad.
    forward = vmap(logits_of, randomness="error")
    anchor = {n: params[n].detach() for n in names}
    optimizer = None if config.optimizer is None else _ChunkOptimizer(config.optimizer, anchor)
    state: Tree = optimizer.init(count) if optimizer is not None else {}
    totals = torch.zeros(count, dtype=torch.float64, device=device)
    for t in range(max(steps, default=0)):
        x = x_pool[rows[:, t]]
        if config.augment is not None:
            x = _augment(x, per_step[t], augments, config.augment)
        losses, grads = _losses_and_grads(forward, stacked, x, y_pool[rows[:, t]], masks[:, t])
        active = None if all(s > t for s in steps) else (sizes[:, t] > 0)
        present = {n: g for n, g in grads.items() if g is not None}
        if optimizer is not None and present:
            # `train` passes the stages only the gradients that exist, as here.
            directions, new_state = optimizer.update(present, state, stacked, t)
            state = {n: _where(active, new_state[n], state.get(n)) for n in new_state}
        else:
            directions = present
        stacked = {n: _stepped(stacked[n], directions.get(n), config.lr, active) for n in names}
        totals = totals + losses.detach().to(torch.float64) * sizes[:, t]
    _check_buffers_untouched(fixed, params)
    seen: list[int] = valid.sum(dim=(1, 2)).numpy().tolist()
    means: list[float] = (totals.cpu() / torch.tensor(seen, dtype=torch.float64)).numpy().tolist()
    # New tensors per client, as `train` returns: no client's uplink holds the chunk.
    return [
        Trained(
            params={
                n: (stacked[aliases[n]][c] if n in aliases else params[n]).clone() for n in params
            },
            result=LocalResult(
                examples=len(clients[c]), steps=steps[c], loss=means[c] if seen[c] else math.nan
            ),
            optimizer_state={n: s[c].clone() for n, s in state.items()},
        )
        for c in range(count)
    ]


def _losses_and_grads(
    forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    stacked: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Each client's mean loss over its real rows ``(C,)``, and its gradient (stacked)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in stacked.items()}
    with torch.enable_grad():
        logits = forward(leaves, x)
        rows = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        losses = (rows.view(mask.shape) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        # A parameter the forward pass does not use has no gradient (None), as per client.
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    return losses.detach(), dict(zip(leaves, grads, strict=True))


def _augment(
    x: torch.Tensor,
    sizes: list[int],
    generators: list[torch.Generator],
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
) -> torch.Tensor:
    # One call per client with its real batch, drawing from its own generator, exactly as
    # the per-client path does; padded rows are zeros (masked out of the loss).
    outs: list[torch.Tensor | None] = [
        transform(x[c, :n], generators[c]) if n else None for c, n in enumerate(sizes)
    ]
    first = next(o for o in outs if o is not None)
    padded = first.new_zeros((len(sizes), x.shape[1], *first.shape[1:]))
    for c, out in enumerate(outs):
        if out is not None:
            padded[c, : out.shape[0]] = out
    return padded


def _stepped(
    value: torch.Tensor, direction: torch.Tensor | None, lr: float, active: torch.Tensor | None
) -> torch.Tensor:
    if direction is None:
        return value  # `train` skips a parameter without a gradient, stages included
    return _where(active, value.add(direction, alpha=-lr), value)


def _where(
    active: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor | None
) -> torch.Tensor:
    """``new`` for the clients still training, ``old`` for those done (all of them: None)."""
    if active is None or old is None:
        return new
    return torch.where(active.view(-1, *([1] * (new.dim() - 1))), new, old)


class _ChunkOptimizer:
    """A `GradientTransform` over stacked clients: ``vmap`` of it, or a loop where ``vmap`` fails.

    ``vmap`` cannot run a stage with data-dependent control flow (``if grad.norm() > c``); such
    an optimizer is then called once per client, as on the per-client path (slower, same
    values). The choice is made once per chunk, at the first step.
    """

    def __init__(self, optimizer: GradientTransform, anchor: Params) -> None:
        self._optimizer = optimizer
        self._anchor = anchor
        self._looped = False
        # Made once per chunk: the step index goes in unbatched.
        self._mapped = vmap(self._one, in_dims=(0, 0, 0, None), randomness="error")

    def init(self, count: int) -> dict[str, torch.Tensor]:
        # Every client starts from the same anchor, so from the same state.
        first = self._optimizer.init(self._anchor)
        return {n: s.expand(count, *s.shape).clone() for n, s in first.items()}

    def _one(self, grads: Params, state: Params, current: Params, step: int) -> tuple[Tree, Tree]:
        inputs = StepInput(params=current, anchor=self._anchor, trees={}, step=step)
        return self._optimizer.update(grads, state, inputs)

    def update(self, grads: Params, state: Params, current: Params, step: int) -> tuple[Tree, Tree]:
        if not self._looped:
            try:
                return self._mapped(dict(grads), dict(state), dict(current), step)
            except RuntimeError:
                self._looped = True
        count = next(iter(grads.values())).shape[0]
        outs = [
            self._one(
                {n: g[c] for n, g in grads.items()},
                {n: s[c] for n, s in state.items()},
                {n: p[c] for n, p in current.items()},
                step,
            )
            for c in range(count)
        ]
        directions = {n: torch.stack([o[0][n] for o in outs]) for n in outs[0][0]}
        states = {n: torch.stack([o[1][n] for o in outs]) for n in outs[0][1]}
        return directions, states


def _untied(tree: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """``tree`` without the second names of tied parameters (`functional_call` ties them)."""
    return {n: t for n, t in tree.items() if aliases.get(n, n) == n}


def _check_buffers_untouched(copies: Params, params: Params) -> None:
    """Refuse a model that wrote into a buffer during training (its value is per client)."""
    changed = [n for n, t in copies.items() if not trees_equal({n: t}, {n: params[n]})]
    if changed:
        raise ValueError(
            f"the model wrote into {changed} during training; vectorised training keeps one "
            "copy of each buffer for the whole chunk: train it with a per-client executor"
        )
