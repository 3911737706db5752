"""The run loop: rounds with evaluation, callbacks and early stopping.

`run_loop` applies a round function until the state has completed ``rounds`` rounds. Round
``t`` uses ``run_key.fold_in(t)`` (as `blazefl_fn.run.simulate.run_rounds` does), so a loop started
from a
saved state of round ``t`` continues bitwise as the uninterrupted run would. Callbacks observe
the loop; they never change what it computes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic

import attrs
from typing_extensions import TypeVar

from ..keys import Key
from ..records import RoundReport, ServerState
from ..round import RoundFn

A = TypeVar("A", default=Any)
# Covariant, as `ServerState`'s: a result of any algorithm is a ``LoopResult[object]``.
A_co = TypeVar("A_co", covariant=True, default=object)

__all__ = ["Callback", "EarlyStop", "LoopResult", "RoundEvent", "run_loop"]

Evaluate = Callable[[ServerState], Mapping[str, float]]


@attrs.frozen(eq=False)
class RoundEvent:
    """What a callback sees after a round.

    Attributes:
        state: the state after the round (``state.round`` rounds completed).
        report: the round's report.
        metrics: evaluation metrics of ``state`` when this round was evaluated, else None.
        elapsed: seconds since the loop began.
        privacy: what the run has spent after this round (``{"epsilon": ..., "delta": ...}``,
            from `run_loop`'s ``account``), or None.
    """

    state: ServerState
    report: RoundReport
    metrics: Mapping[str, float] | None
    elapsed: float
    privacy: Mapping[str, float] | None = None


class Callback:
    """Hooks into `run_loop`; every method is a no-op unless overridden.

    Examples:
        >>> class Count(Callback):
        ...     rounds = 0
        ...     def on_round_end(self, event: RoundEvent) -> None:
        ...         self.rounds += 1
    """

    def on_begin(self, state: ServerState, rounds: int) -> None:
        """Before the first round of this loop; ``state.round`` may be > 0 when resuming."""

    def on_round_end(self, event: RoundEvent) -> None:
        """After every round (and its evaluation, if any)."""

    def on_interrupt(self, state: ServerState) -> None:
        """On KeyboardInterrupt, with the last state all callbacks saw; then it propagates."""

    def on_end(self, result: LoopResult) -> None:
        """After the last round or an early stop."""


@attrs.frozen
class EarlyStop:
    """Stop once an evaluated ``metric`` reaches ``target`` (``>=`` if ``mode="max"``, else ``<=``).

    Raises:
        ValueError: ``target`` is not finite or ``mode`` is not ``"max"`` / ``"min"``.
    """

    metric: str
    target: float
    mode: str = "max"

    def __attrs_post_init__(self) -> None:
        if isinstance(self.target, bool) or not math.isfinite(self.target):
            raise ValueError(f"early-stop target must be a finite number, got {self.target!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"early-stop mode must be 'max' or 'min', got {self.mode!r}")

    def reached(self, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics`` meets the target.

        Raises:
            ValueError: ``metrics`` has no entry ``metric``.
        """
        if self.metric not in metrics:
            raise ValueError(
                f"early-stop metric {self.metric!r} is not among the evaluated metrics "
                f"{sorted(metrics)}"
            )
        value = metrics[self.metric]
        return value >= self.target if self.mode == "max" else value <= self.target


@attrs.frozen(eq=False)
class LoopResult(Generic[A_co]):
    """The outcome of `run_loop`.

    Attributes:
        state: the final state.
        reports: the reports of the rounds this loop ran (not those before a resume).
        metrics: the last evaluation's metrics (empty if nothing was evaluated).
        stopped_early: the `EarlyStop` target was reached before ``rounds``.
        stop_reason: why ``stop_before`` ended the loop before ``rounds`` (e.g. a privacy
            budget), or None.
    """

    state: ServerState[A_co]
    reports: tuple[RoundReport, ...]
    metrics: Mapping[str, float]
    stopped_early: bool
    stop_reason: str | None = None


def run_loop(
    round_fn: RoundFn[A],
    state: ServerState[A],
    run_key: Key,
    rounds: int,
    *,
    evaluate: Evaluate | None = None,
    eval_every: int = 1,
    callbacks: Sequence[Callback] = (),
    early_stop: EarlyStop | None = None,
    account: Callable[[ServerState], Mapping[str, float]] | None = None,
    stop_before: Callable[[ServerState], str | None] | None = None,
) -> LoopResult[A]:
    """Run rounds until ``state.round == rounds``, evaluating every ``eval_every`` rounds.

    A round is evaluated when ``state.round % eval_every == 0`` and after the last round. If the
    loop starts with ``state.round == rounds`` (nothing to run) and ``evaluate`` is given, the
    state is evaluated once.

    Args:
        round_fn: ``(state, round_key) -> (state, report)``, e.g. from `make_round`.
        state: the state to start from (round 0, or a restored checkpoint).
        run_key: the run's key; round ``t`` uses ``run_key.fold_in(t)``.
        rounds: the total number of rounds the run should have completed at the end.
        evaluate: metrics of a state (e.g. test accuracy); None evaluates nothing.
        eval_every: evaluate every this many rounds (>= 1).
        callbacks: observers, called in order.
        early_stop: stop after an evaluation that reaches its target.
        account: what a state has spent (`blazefl_fn.privacy.privatize.Accountant.spent`), given to
            callbacks after every round as `RoundEvent.privacy`.
        stop_before: checked before every round: a reason (a str) ends the loop without
            running that round (`blazefl_fn.privacy.privatize.PrivacyBudget.stop_before`); the
            result
            keeps it as `LoopResult.stop_reason`, and callbacks see a normal end.

    Raises:
        ValueError: ``rounds < state.round``, ``eval_every < 1``, or an ``early_stop`` without
            ``evaluate``.

    Examples:
        >>> import blazefl_fn as fl
        >>> from blazefl_fn.run.simulate import RunConfig, load_federation, model_factory
        >>> config = RunConfig(clients=4, clients_per_round=2)
        >>> key = fl.Key.from_seed(0)
        >>> data = load_federation(config, key.fold_in("data"))
        >>> algo = fl.fedavg(model_factory(config, data), num_clients=4, clients_per_round=2,
        ...                  local=fl.LocalSGD())
        >>> with fl.Sequential() as ex:
        ...     result = run_loop(fl.make_round(algo, data.clients, ex),
        ...                       algo.init(key.fold_in("init")), key, rounds=3)
        >>> result.state.round, len(result.reports)
        (3, 3)
    """
    if isinstance(eval_every, bool) or eval_every < 1:
        raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    if rounds < state.round:
        raise ValueError(f"rounds={rounds} is below the state's completed rounds {state.round}")
    if early_stop is not None and evaluate is None:
        raise ValueError("early_stop needs an evaluate function")
    start = time.perf_counter()
    for callback in callbacks:
        callback.on_begin(state, rounds)
    reports: list[RoundReport] = []
    metrics: Mapping[str, float] = {}
    stopped = False
    reason: str | None = None
    if state.round == rounds and evaluate is not None:
        metrics = evaluate(state)
    # The last state every callback has seen: what an interrupt hands over for saving.
    observed = state
    try:
        while state.round < rounds:
            reason = None if stop_before is None else stop_before(state)
            if reason is not None:
                if evaluate is not None and (not reports or state.round % eval_every != 0):
                    metrics = evaluate(state)  # the final state, as after the last round
                break
            state, report = round_fn(state, run_key.fold_in(state.round))
            reports.append(report)
            evaluated: Mapping[str, float] | None = None
            if evaluate is not None and (state.round % eval_every == 0 or state.round == rounds):
                evaluated = metrics = evaluate(state)
            spent = None if account is None else account(state)
            event = RoundEvent(state, report, evaluated, time.perf_counter() - start, spent)
            for callback in callbacks:
                callback.on_round_end(event)
            observed = state
            if early_stop is not None and evaluated is not None and early_stop.reached(evaluated):
                stopped = state.round < rounds
                break
    except KeyboardInterrupt:
        for callback in callbacks:
            callback.on_interrupt(observed)
        raise
    result = LoopResult(state, tuple(reports), metrics, stopped, reason)
    for callback in callbacks:
        callback.on_end(result)
    return result
