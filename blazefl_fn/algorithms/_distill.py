"""What DS-FL and SCARLET share: public-set selection, the server's key, client models."""

from __future__ import annotations

import attrs
import torch

from ..client.distillation import Distillation, distill, predict_probs
from ..client.training import LocalTraining, train
from ..data.datasets import ClientData
from ..keys import Key
from ..models import ModelFactory, build_module
from ..tree import Params, from_module

# Client stored state: the local model's entries carry this prefix; other entries are the
# algorithm's own (SCARLET's cache).
MODEL = "model."


def key_bits(key: Key) -> torch.Tensor:
    """``key`` as 16 uint8s, so that it can live (and be checkpointed) in a server state."""
    return torch.tensor(list(key.bits), dtype=torch.uint8)


def key_of(bits: torch.Tensor) -> Key:
    """The `Key` that `key_bits` stored."""
    return Key(bits.cpu().numpy().tobytes())


def select_public(
    server_key: torch.Tensor, round_index: int, size: int, count: int
) -> torch.Tensor:
    """The public indices the server uses in round ``round_index`` (ascending int64)."""
    chosen = key_of(server_key).fold_in(round_index).fold_in("public").choice(size, count)
    return torch.tensor(sorted(chosen), dtype=torch.int64, device=server_key.device)


def initial(
    model_fn: ModelFactory, key: Key
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The server's model, the server's key and the clients' key (both as `key_bits`).

    No client model is made here: client ``k``'s first model comes from its own key,
    ``key.fold_in("clients").fold_in(k)``, when it is first sampled (`first_model`).
    """
    return (
        from_module(build_module(model_fn, key)),
        key_bits(key.fold_in("server")),
        key_bits(key.fold_in("clients")),
    )


def first_model(model_fn: ModelFactory, clients_key: torch.Tensor, client_id: int) -> Params:
    """Client ``client_id``'s model before it first took part, as stored state."""
    module = build_module(model_fn, key_of(clients_key).fold_in(client_id))
    return {MODEL + n: t for n, t in from_module(module).items()}


def server_distill(
    step: LocalStep,
    params: Params,
    indices: torch.Tensor,
    labels: torch.Tensor,
    server_key: torch.Tensor,
    round_index: int,
) -> dict[str, torch.Tensor]:
    """The server's model distilled on ``labels`` for the public ``indices`` of a round."""
    key = key_of(server_key).fold_in(round_index).fold_in("distill")
    new, _ = distill(step.template, params, step.public[indices], labels, key, step.distillation)
    return new


def model_part(state: Params) -> dict[str, torch.Tensor]:
    """The local model's parameters in a client's stored state."""
    return {n[len(MODEL) :]: t for n, t in state.items() if n.startswith(MODEL)}


def with_model(state: Params, params: Params) -> dict[str, torch.Tensor]:
    """``state`` with its local model replaced by ``params``."""
    out = {n: t for n, t in state.items() if not n.startswith(MODEL)}
    out.update({MODEL + n: t for n, t in params.items()})
    return out


def check_setup(
    public: torch.Tensor, public_per_round: int, num_clients: int, clients_per_round: int
) -> None:
    """Raise ValueError for a public set or participation that cannot work."""
    if public.dim() < 2 or public.shape[0] == 0:
        raise ValueError(
            f"the public set must be a non-empty batch of inputs, got shape {tuple(public.shape)}"
        )
    if not 1 <= public_per_round <= public.shape[0]:
        raise ValueError(
            f"public_per_round must be in [1, {public.shape[0]}] (the public set's size), "
            f"got {public_per_round}"
        )
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round must be in [1, num_clients={num_clients}], got {clients_per_round}"
        )


@attrs.frozen(eq=False)
class LocalStep:
    """The client's work both algorithms share: distill, train on private data, predict.

    Attributes:
        template: the model architecture (its values are always overwritten).
        public: the public inputs (labels never included), shared by all clients.
        local: private training.
        distillation: distillation on the public set.
        num_classes: the width of a soft label.
    """

    template: torch.nn.Module
    public: torch.Tensor
    local: LocalTraining
    distillation: Distillation
    num_classes: int

    def run(
        self,
        params: Params,
        targets: tuple[torch.Tensor, torch.Tensor],
        request: torch.Tensor,
        data: ClientData,
        key: Key,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """Distill on ``targets`` = (indices, soft labels), train, predict ``request``.

        Returns:
            The new local parameters, the soft labels for ``request`` (float32), metrics.
        """
        metrics: dict[str, float] = {}
        indices, labels = targets
        if indices.numel() > 0:
            params, distilled = distill(
                self.template,
                params,
                self.public[indices],
                labels,
                key.fold_in("distill"),
                self.distillation,
            )
            metrics.update(distilled)
        trained = train(self.template, params, data, key, self.local)
        params = trained.params
        metrics["loss"] = trained.result.loss
        if request.numel() == 0:
            probs = torch.empty(0, self.num_classes, device=self.public.device)
        else:
            probs = predict_probs(self.template, params, self.public[request])
        return params, probs, metrics
