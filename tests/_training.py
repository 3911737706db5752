"""The older call shapes of local training, over the one `train`, for tests that compare them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blazefl_fn.client.chunk import train_chunk
from blazefl_fn.client.training import LocalTraining, train
from blazefl_fn.data.datasets import ClientData
from blazefl_fn.keys import Key
from blazefl_fn.tree import Params


def train_local(
    template: torch.nn.Module, params: Params, data: ClientData, key: Key, config: LocalTraining
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`train`'s parameters and ``{"loss": ...}``."""
    trained = train(template, params, data, key, config)
    return trained.params, {"loss": trained.result.loss}


def train_local_chunk(
    template: torch.nn.Module,
    params: Params,
    clients: Sequence[ClientData],
    keys: Sequence[Key],
    config: LocalTraining,
) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """`train_chunk`'s parameters and ``{"loss": ...}`` per client."""
    out = train_chunk(template, params, clients, keys, config)
    return [(t.params, {"loss": t.result.loss}) for t in out]
