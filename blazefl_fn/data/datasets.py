"""Dataset records: one base tensor pair per split, clients as index views onto it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs
import torch

from ..keys import Key

__all__ = ["ClientData", "FederatedDataset", "TensorDataset", "hold_out_clients"]


def _check_pair(instance: TensorDataset, _attribute: object, y: torch.Tensor) -> None:
    if y.dim() != 1 or y.dtype != torch.int64:
        raise ValueError(
            f"labels must be a 1-D int64 tensor, got {y.dtype} of shape {tuple(y.shape)}"
        )
    if instance.x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {instance.x.shape[0]} rows but y has {y.shape[0]} labels")


@attrs.frozen(eq=False)
class TensorDataset:
    """Features ``x`` (N, ...) and int64 class labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor = attrs.field(validator=_check_pair)

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _check_indices(instance: ClientData, _attribute: object, indices: torch.Tensor) -> None:
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"client indices must be a 1-D int64 tensor, got {indices.dtype}")
    n = len(instance.base)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"client indices out of range for a base dataset of {n} examples")


@attrs.frozen(eq=False)
class ClientData:
    """One client's examples: ``indices`` into a ``base`` dataset shared by all clients.

    The base tensors are never copied per client; a batch gathers its rows on demand.

    Examples:
        >>> import torch
        >>> from blazefl_fn.keys import Key
        >>> base = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
        >>> client = ClientData(base, torch.tensor([2, 5, 7]))
        >>> [y.tolist() for _, y in client.batches(2, Key.from_seed(3).torch_generator())]
        [[7, 5], [2]]
    """

    base: TensorDataset
    indices: torch.Tensor = attrs.field(validator=_check_indices)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of ``(x, y)``, shuffled by ``generator`` (in order when it is None).

        With ``drop_last``, a final batch smaller than ``batch_size`` is left out (a client
        with fewer examples than ``batch_size`` then yields none), as a BatchNorm model needs:
        it cannot train on a batch of one example. The shuffle is drawn all the same, so the
        full batches are those of ``drop_last=False``.

        Examples:
            >>> import torch
            >>> base = TensorDataset(torch.zeros(5, 1), torch.arange(5))
            >>> client = ClientData(base, torch.arange(5))
            >>> [y.tolist() for _, y in client.batches(2)]
            [[0, 1], [2, 3], [4]]
            >>> [y.tolist() for _, y in client.batches(2, drop_last=True)]
            [[0, 1], [2, 3]]
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = self.indices
        if generator is not None:
            # Drawn by the (CPU) generator and then moved: every device sees the same order.
            permutation = torch.randperm(order.shape[0], generator=generator)
            order = order[permutation.to(order.device)]
        end = order.shape[0] - order.shape[0] % batch_size if drop_last else order.shape[0]
        for start in range(0, end, batch_size):
            rows = order[start : start + batch_size]
            yield self.base.x[rows], self.base.y[rows]

    def to_device(self, device: torch.device) -> ClientData:
        """This client's examples gathered onto ``device`` (``self`` if they are there already).

        Only the client's own rows move; the copy indexes them in the same order, so
        `batches` yields the same batches for the same generator on any device.
        """
        tensors = (self.base.x, self.base.y, self.indices)
        if all(t.device == device for t in tensors):
            return self
        return self.gathered(device)

    def gathered(self, device: torch.device) -> ClientData:
        """A compact copy on ``device``: only this client's rows, indexed ``0..n-1`` in order.

        Examples:
            >>> import torch
            >>> from blazefl_fn.keys import Key
            >>> base = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
            >>> client = ClientData(base, torch.tensor([2, 5, 7])).gathered(torch.device("cpu"))
            >>> [y.tolist() for _, y in client.batches(2, Key.from_seed(3).torch_generator())]
            [[7, 5], [2]]
        """
        rows = self.indices.to(self.base.x.device)
        local = TensorDataset(self.base.x[rows].to(device), self.base.y[rows].to(device))
        return ClientData(local, torch.arange(int(rows.shape[0]), device=device))


@attrs.frozen(eq=False)
class FederatedDataset:
    """Client training data plus a central test set.

    Attributes:
        clients: client ``k``'s data at index ``k``: a tuple, or a lazy sequence that makes
            each client when it is read (`blazefl_fn.data.synthetic.SyntheticClients`). Code
            that runs rounds indexes only the clients it samples, never iterates them all.
        public: unlabeled inputs every party may see, for distillation-based algorithms
            (DS-FL, SCARLET); None when the federation has no public set.
        client_tests: client ``k``'s own held-out examples at index ``k``, never trained on
            (`hold_out_clients`); None when the clients hold none.
    """

    name: str
    clients: Sequence[ClientData]
    test: TensorDataset
    num_classes: int
    public: torch.Tensor | None = None
    client_tests: Sequence[ClientData] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch dimension)."""
        return tuple(self.test.x.shape[1:])


def hold_out_clients(data: FederatedDataset, fraction: float, key: Key) -> FederatedDataset:
    """``data`` with ``round(fraction * n)`` of each client's ``n`` examples held out as its
    own test split (`FederatedDataset.client_tests`), drawn with ``key.fold_in(k)`` for client
    ``k``; both parts keep the client's order of examples.

    A client's split depends only on its examples, ``fraction`` and its own key, not on the
    other clients.

    Raises:
        ValueError: ``fraction`` not in ``(0, 1)``, or a lazy federation (its clients are not
            a tuple) or one that already holds client test splits.

    Examples:
        >>> from blazefl_fn.keys import Key
        >>> base = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
        >>> fed = FederatedDataset("toy", (ClientData(base, torch.arange(10)),), base, 10)
        >>> out = hold_out_clients(fed, 0.3, Key.from_seed(0))
        >>> len(out.clients[0]), len(out.client_tests[0])
        (7, 3)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"the client test fraction must be in (0, 1), got {fraction!r}")
    if not isinstance(data.clients, tuple) or data.client_tests is not None:
        raise ValueError(
            "client test splits are made once, from a federation whose clients are a tuple "
            f"(got {type(data.clients).__name__})"
        )
    trains: list[ClientData] = []
    tests: list[ClientData] = []
    for k, client in enumerate(data.clients):
        n = len(client)
        held = torch.zeros(n, dtype=torch.bool)
        chosen = key.fold_in(k).choice(n, round(fraction * n)) if n else ()
        held[torch.tensor(chosen, dtype=torch.int64)] = True
        trains.append(ClientData(client.base, client.indices[~held]))
        tests.append(ClientData(client.base, client.indices[held]))
    return attrs.evolve(data, clients=tuple(trains), client_tests=tuple(tests))
