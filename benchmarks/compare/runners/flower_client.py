"""Flower's ``ClientApp`` for the benchmark (runs in the Ray actors).

A module of its own, imported by `flower_peer`, so that Ray pickles the app and its functions
by reference: defined in ``__main__`` they would be pickled by value with every message, and
each message would find an empty per-actor cache (and reload the data set).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..common import FederatedArrays, client_seed, load_arrays, train_client
from ._base import ModelCache

_CACHE: dict[str, Any] = {}


def _client_state(config: ConfigRecord) -> tuple[FederatedArrays, ModelCache]:
    """The data and scratch model of this actor process, loaded on first use."""
    key = str(config["data_dir"])
    if _CACHE.get("key") != key:
        torch.set_num_threads(int(config["threads"]))
        _CACHE.update(
            key=key,
            data=load_arrays(key),
            models=ModelCache(str(config["model"]), int(config["classes"])),
        )
    return _CACHE["data"], _CACHE["models"]


client_app = ClientApp()


@client_app.query()
def warm_up(msg: Message, context: Context) -> Message:
    """Load this actor's data and model before the round loop starts."""
    _client_state(msg.content.config_records["config"])
    return Message(content=RecordDict(), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One FedAvg client update on the client's shard."""
    config = msg.content.config_records["config"]
    data, cache = _client_state(config)
    cid = int(context.node_config["partition-id"])
    generator = torch.Generator().manual_seed(
        client_seed(int(config["seed"]), int(config["server-round"]) - 1, cid)
    )
    params = train_client(
        cache.get(),
        msg.content.array_records["arrays"].to_torch_state_dict(),
        data,
        cid,
        generator,
        epochs=int(config["epochs"]),
        batch_size=int(config["batch_size"]),
        lr=float(config["lr"]),
    )
    metrics = MetricRecord({"num-examples": int(data.client(cid).shape[0])})
    content = RecordDict({"arrays": ArrayRecord(params), "metrics": metrics})
    return Message(content=content, reply_to=msg)
