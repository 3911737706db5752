"""What FedRep and FedPer share around their training: a client's model is the global body
under its own head, and it sends the body and keeps the head."""

from __future__ import annotations

import torch

from ..tree import Params, select


def with_head(params: Params, stored: Params, head: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``params`` with the client's stored head (the global head before its first round)."""
    own = stored if stored else select(params, head)
    return {n: own.get(n, t) for n, t in params.items()}


def body_and_head(
    params: Params, head: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``params`` split into the shared body (sent) and the personal ``head`` (kept)."""
    return select(params, [n for n in params if n not in head]), select(params, head)
