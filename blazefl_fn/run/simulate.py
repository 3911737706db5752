"""Whole simulations: a validated config in, the final state, reports and test metrics out.

Key layout of a run (``run_key = Key.from_seed(seed)``): ``run_key.fold_in("data")`` builds the
federated dataset, ``run_key.fold_in("init")`` the initial model, and round ``t`` uses
``run_key.fold_in(t)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from .. import portable
from ..algorithms.personal import PersonalState
from ..client.evaluation import evaluate, evaluate_clients
from ..data.datasets import ClientData, TensorDataset
from ..executors.base import Executor
from ..executors.devices import check_device, cuda_determinism, parse_devices, to_device, uses_cuda
from ..keys import Key
from ..models import build_module, intra_op_threads
from ..privacy.privatize import PrivacyBudget
from ..records import RoundReport, ServerState
from ..round import A, RoundFn, make_round, on_server
from ..server.client_state import ClientStore
from ..tree import digest
from ._build import (
    SYNTHETIC_EAGER_CLIENTS,
    check_executor,
    evaluation_clients,
    load_central,
    load_federation,
    make_algorithm,
    make_executor,
    model_factory,
    privacy_accountant,
    split,
    train_transform,
)
from .checkpoint import CheckpointWriter, StoredCheckpoint, check_fresh, locked, read_checkpoint
from .config import (
    RunConfig,
)
from .loop import Callback, EarlyStop, run_loop

__all__ = [
    "RESUMABLE_CHANGES",
    "SYNTHETIC_EAGER_CLIENTS",
    "RunResult",
    "check_resumable",
    "config_dict",
    "config_from_dict",
    "load_central",
    "load_federation",
    "make_algorithm",
    "make_executor",
    "model_factory",
    "run_rounds",
    "simulate",
    "split",
    "train_transform",
]


@attrs.frozen
class RunResult:
    """The outcome of `simulate`."""

    state: ServerState
    reports: tuple[RoundReport, ...]
    accuracy: float
    loss: float
    params_sha256: str
    wall_seconds: float
    metrics: Mapping[str, float] = attrs.field(factory=dict[str, float])
    stopped_early: bool = False
    numerics: Mapping[str, object] = attrs.field(factory=dict[str, object])
    privacy: Mapping[str, float] | None = None
    """A private run's spent budget after its last round (``epsilon``, ``delta``), else None."""
    stop_reason: str | None = None
    """Why the run ended before ``rounds`` for its privacy budget (names the round), or None."""
    client_state_sha256: str | None = None
    """`ClientStore.digest` of the final state's client store (``aux.clients``: the personal
    trees of Ditto, FedRep and FedPer, SCAFFOLD's and FedDyn's client states, DS-FL's and
    SCARLET's local models), or None for an algorithm that keeps no client state."""


def _client_store(aux: object) -> ClientStore | None:
    """The client store a server state's ``aux`` holds: ``aux`` itself, or its ``clients``
    field (the stock stateful algorithms' records); None when it holds none."""
    if isinstance(aux, ClientStore):
        return aux
    clients = getattr(aux, "clients", None) if attrs.has(type(aux)) else None
    return clients if isinstance(clients, ClientStore) else None


def run_rounds(
    round_fn: RoundFn[A],
    state: ServerState[A],
    run_key: Key,
    rounds: None = None,
    on_round: Callable[[ServerState[A], RoundReport], None] | None = None,
    *,
    until: int | None = None,
) -> tuple[ServerState[A], tuple[RoundReport, ...]]:
    """Run rounds until ``state.round == until``, round ``t`` with key ``run_key.fold_in(t)``.

    ``until`` is the total the run should have completed, as in `run_loop`: a state restored
    at round ``t`` runs ``until - t`` more. Because the key of a round depends only on its
    index, a run that stops after round ``t`` and continues from that state gives the same bits
    as an uninterrupted one.

    Args:
        round_fn: ``(state, round_key) -> (state, report)``, e.g. from `make_round`.
        state: the state to start from (round 0, or a restored checkpoint).
        run_key: the run's key.
        rounds: refused. In 0.1.0 ``run_rounds(round_fn, state, key, N)`` ran ``N`` more
            rounds; the count is now the total and is named ``until``, so that code written
            for the old meaning fails here instead of running another number of rounds.
        on_round: called with each new state and its report.
        until: the total number of completed rounds to stop at (keyword only).

    Raises:
        TypeError: ``rounds`` was given (the old call), or ``until`` is missing or not an int.
        ValueError: ``until`` is below ``state.round``.

    Examples:
        >>> import blazefl_fn as fl
        >>> config = RunConfig(clients=4, clients_per_round=2)
        >>> key = fl.Key.from_seed(0)
        >>> data = load_federation(config, key.fold_in("data"))
        >>> algo = fl.fedavg(model_factory(config, data), num_clients=4, clients_per_round=2,
        ...                  local=fl.LocalSGD())
        >>> with fl.Sequential() as ex:
        ...     round_fn = fl.make_round(algo, data.clients, ex)
        ...     state, reports = run_rounds(round_fn, algo.init(key), key, until=2)
        ...     state, more = run_rounds(round_fn, state, key, until=state.round + 1)  # one more
        >>> state.round, len(reports), len(more)
        (3, 2, 1)
    """
    if rounds is not None:
        raise TypeError(
            f"run_rounds(..., rounds={rounds!r}) is the 0.1.0 call, which ran that many more "
            "rounds; the count is now the total to stop at, named until= (CHANGELOG.md): pass "
            f"until={rounds!r} to stop at round {rounds!r}, or until=state.round + {rounds!r} "
            f"for {rounds!r} more"
        )
    if until is None:
        raise TypeError(
            "run_rounds needs until=, the total number of completed rounds to stop at "
            "(a state restored at round t runs until - t more)"
        )
    if not isinstance(until, int) or isinstance(until, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"until must be an int, got {until!r}")
    if until < state.round:
        raise ValueError(f"until={until} is below the state's completed rounds {state.round}")
    reports: list[RoundReport] = []
    while state.round < until:
        state, report = round_fn(state, run_key.fold_in(state.round))
        reports.append(report)
        if on_round is not None:
            on_round(state, report)
    return state, tuple(reports)


RESUMABLE_CHANGES = frozenset(
    {
        "executor",
        "workers",
        "rounds",
        "eval_every",
        "target_accuracy",
        "eval_clients",
        "ray_address",
        "ray_node_ip",
        # Compared by `check_resumable` as part of how the executor rounds (`_arithmetic`).
        "chunk",
        "max_bytes",
        "client_timeout",
        # The completed rounds skipped no client (a non-finite update would have failed them),
        # so the policy may be turned on for the rest of the run.
        "skip_nonfinite",
        # Where client state lies (memory or spill files), never what it holds.
        "client_state_memory_mb",
        "client_state_dir",
        # Accounting only: how the spent budget is computed and when the run stops.
        "dp_target_epsilon",
        "dp_accountant",
        "dp_delta",
    }
)
"""Settings a checkpoint may be resumed with different values of: how a run is executed or
observed. They do not change the bits, except that a vectorized run's chunking (``executor``,
``chunk``, ``max_bytes``) is checked separately, since it groups the arithmetic."""


def _arithmetic(config: RunConfig) -> str:
    """How clients' float arithmetic is grouped: the per-client executors all agree bit for
    bit; vectorised training rounds otherwise, and may differ by chunk size."""
    if config.executor != "vectorized":
        return "per-client"
    return f"executor='vectorized' chunk={config.chunk!r} max_bytes={config.max_bytes!r}"


def config_dict(config: RunConfig) -> dict[str, Any]:
    """``config`` as a JSON-serialisable dict (what checkpoints store)."""
    return attrs.asdict(config)


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """The `RunConfig` a `config_dict` describes.

    Raises:
        ValueError: an unknown field or an invalid value.
    """
    known = {f.name for f in attrs.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    missing = sorted(known - set(values) - _OPTIONAL_FIELDS - _LATER_FIELDS)
    if frozenset(missing) >= _ADDED_FIELDS:
        missing = [name for name in missing if name not in _ADDED_FIELDS]  # before DP: off
    if missing:
        raise ValueError(f"config fields {missing} are missing")
    return RunConfig(**values)


_ADDED_FIELDS = frozenset(f.name for f in attrs.fields(RunConfig) if f.name.startswith("dp"))
"""Fields added after checkpoint format 2 was written; a stored config without all of them
predates them and had them off, so `config_from_dict` takes their defaults (DP off). A config
with some of them is refused: it was edited."""
_OPTIONAL_FIELDS = frozenset({"client_state_memory_mb", "client_state_dir"})
"""Fields added later that never change the bits: a stored config without them takes their
defaults."""
_LATER_FIELDS = frozenset(
    {"drop_last", "ditto_lambda", "personal_epochs", "head_epochs", "head", "client_test_fraction"}
)
"""Fields added after checkpoint format 3 was written whose default is what every run before
them did (every final batch was trained on; no personalised algorithm; no client held out a
test split): a stored config without them takes the default."""


def check_resumable(stored: RunConfig, requested: RunConfig) -> None:
    """Refuse to continue a run of ``stored`` under a ``requested`` config that changes its bits.

    Raises:
        ValueError: a field outside `RESUMABLE_CHANGES` differs (the message names each).
    """
    old, new = config_dict(stored), config_dict(requested)
    diffs = [
        f"{name}={old[name]!r} (requested {new[name]!r})"
        for name in old
        if name not in RESUMABLE_CHANGES and old[name] != new[name]
    ]
    if _arithmetic(stored) != _arithmetic(requested):
        diffs.append(
            f"{_arithmetic(stored)} (requested {_arithmetic(requested)}): vectorised training "
            "rounds differently from per-client training"
        )
    if diffs:
        raise ValueError(
            "the checkpoint was written by a run with other settings: " + ", ".join(diffs)
        )


@attrs.frozen
class _Evaluator:
    """Test (and optionally per-client) metrics; built on the server's device."""

    template: torch.nn.Module
    test: TensorDataset
    clients: Sequence[ClientData] | None

    def __call__(self, state: ServerState) -> dict[str, float]:
        metrics = evaluate(self.template, state.params, self.test)
        if self.clients is not None:
            # A personalised algorithm's clients are evaluated with their own parameters.
            aux = state.aux
            personal = aux.clients if isinstance(aux, PersonalState) else None
            metrics.update(
                evaluate_clients(self.template, state.params, self.clients, personal=personal)
            )
        return metrics


def simulate(
    config: RunConfig,
    callbacks: Sequence[Callback] = (),
    *,
    resume: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> RunResult:
    """Run the simulation ``config`` describes, or continue one from a checkpoint.

    Args:
        config: the run's settings.
        callbacks: observers of the run loop (progress, metrics log, ...); see `Callback`.
        resume: a checkpoint (directory or file) to continue from; its config must agree
            with ``config`` except for `RESUMABLE_CHANGES`. The continued run gives the same
            bits as an uninterrupted one.
        checkpoint_dir: write a checkpoint here every ``checkpoint_every`` rounds, after the
            last round, and on KeyboardInterrupt.
        checkpoint_every: rounds between checkpoints (>= 1).
        overwrite: let a run that does not resume from ``checkpoint_dir``'s checkpoint replace
            it (otherwise refused).
        executor: run the clients on this executor, already started, instead of making (and
            closing) the one ``config.executor`` names; it stays open for the next run. Its
            threads and devices must be ``config``'s, so that it computes ``config``'s bits:
            several runs can share one `Processes` pool and its warm workers.

    Raises:
        ValueError: a bad setting, a malformed data file, or a corrupt or mismatching
            checkpoint.
        FileNotFoundError: a data file or the checkpoint is missing.
        FileExistsError: ``checkpoint_dir`` holds a checkpoint this run would replace.
        blazefl_fn.OutputLockedError: another process writes ``checkpoint_dir``; it stays
            locked (``flock``) while this run lasts.

    Examples:
        >>> result = simulate(RunConfig(rounds=2, clients=5, clients_per_round=2))
        >>> len(result.reports), len(result.params_sha256)
        (2, 64)
        >>> from blazefl_fn.executors import Threads
        >>> with Threads(2) as pool:  # one pool, two runs
        ...     seeds = [simulate(RunConfig(rounds=2, seed=s), executor=pool) for s in (0, 1)]
        >>> seeds[0].params_sha256 == simulate(RunConfig(rounds=2, seed=0)).params_sha256
        True
    """
    if isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if executor is not None:
        if not isinstance(executor, Executor):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"executor must be an Executor (map, close), got {executor!r}")
        check_executor(config, executor)
    if config.portable:
        portable.enable()  # before the first kernel of the run
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if checkpoint_dir is not None:
            stack.enter_context(locked(checkpoint_dir))
            check_fresh(checkpoint_dir, resume, overwrite=overwrite)
        # Read and verified once, here under the lock; `_simulate` takes it out of the list to
        # restore the state, so that this frame does not keep the file's tensors for the run.
        stored: list[StoredCheckpoint] = []
        if resume is not None:
            stored.append(read_checkpoint(resume))
            check_resumable(config_from_dict(stored[0].config), config)
        # On CUDA the server's stages and evaluation run with deterministic kernels too.
        cuda = uses_cuda((*parse_devices(config.device), check_device(config.server_device)))
        stack.enter_context(intra_op_threads(config.threads))
        stack.enter_context(cuda_determinism(cuda))
        return _simulate(
            config, callbacks, stored, checkpoint_dir, checkpoint_every, start, executor
        )


def _simulate(
    config: RunConfig,
    callbacks: Sequence[Callback],
    stored: list[StoredCheckpoint],
    checkpoint_dir: str | os.PathLike[str] | None,
    checkpoint_every: int,
    start: float,
    given: Executor | None,
) -> RunResult:
    run_key = Key.from_seed(config.seed)
    data = load_federation(config, run_key.fold_in("data"))
    model_fn = model_factory(config, data)
    server = check_device(config.server_device)
    algorithm = on_server(make_algorithm(config, model_fn, len(data.clients), data), server)
    if config.skip_nonfinite:
        algorithm = attrs.evolve(algorithm, nonfinite="skip")
    template = build_module(model_fn, run_key.fold_in("template"))
    state = algorithm.init(run_key.fold_in("init"))
    if stored:
        state = stored.pop().load(aux_template=state.aux, params_template=state.params).state
        if state.round > config.rounds:
            raise ValueError(
                f"the checkpoint has completed {state.round} rounds, more than rounds="
                f"{config.rounds}"
            )
    state = to_device(state, server)
    per_client = config.eval_clients or config.client_test_fraction is not None
    evaluator = to_device(
        _Evaluator(template, data.test, evaluation_clients(data) if per_client else None),
        server,
    )
    observers = list(callbacks)
    if checkpoint_dir is not None:
        observers.append(
            CheckpointWriter(
                checkpoint_dir,
                checkpoint_every,
                config_dict(config),
                numerics=portable.numerics(),
            )
        )
    early_stop = (
        None if config.target_accuracy is None else EarlyStop("accuracy", config.target_accuracy)
    )
    accountant = privacy_accountant(config, len(data.clients))
    budget = None
    if accountant is not None:
        accountant.epsilon(state.round + 1)  # fails now, not after a round, without Opacus
        if config.dp_target_epsilon is not None:
            budget = PrivacyBudget(accountant, config.dp_target_epsilon)
    # A given executor is the caller's to close; one made from the config is closed here.
    with contextlib.nullcontext(given) if given is not None else make_executor(config) as executor:
        loop = run_loop(
            make_round(algorithm, data.clients, executor),
            state,
            run_key,
            config.rounds,
            evaluate=evaluator,
            eval_every=config.eval_every,
            callbacks=observers,
            early_stop=early_stop,
            account=None if accountant is None else accountant.spent,
            stop_before=None if budget is None else budget.stop_before,
        )
    store = _client_store(loop.state.aux)
    return RunResult(
        state=loop.state,
        reports=loop.reports,
        accuracy=loop.metrics.get("accuracy", math.nan),
        loss=loop.metrics.get("loss", math.nan),
        params_sha256=digest(loop.state.params),
        wall_seconds=time.perf_counter() - start,
        metrics=dict(loop.metrics),
        stopped_early=loop.stopped_early,
        numerics=portable.numerics(),
        privacy=None if accountant is None else accountant.spent(loop.state),
        stop_reason=loop.stop_reason,
        client_state_sha256=None if store is None else store.digest(),
    )
