"""The run loop, checkpoints, the metrics log, progress output and plots."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import pytest
import torch

from blazefl_fn.client.evaluation import evaluate_clients
from blazefl_fn.executors import Executor, Processes, Sequential, Vectorized
from blazefl_fn.executors.base import ClosingContext
from blazefl_fn.keys import Key
from blazefl_fn.records import RoundReport, ServerState
from blazefl_fn.run import checkpoint as checkpoint_module
from blazefl_fn.run.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointWriter,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.loop import Callback, EarlyStop, LoopResult, RoundEvent, run_loop
from blazefl_fn.run.metrics_log import MetricsLog, read_metrics
from blazefl_fn.run.plot import plot_runs
from blazefl_fn.run.progress import BarProgress, LineProgress, progress_callback
from blazefl_fn.run.simulate import load_federation, model_factory, simulate
from blazefl_fn.tree import digest

T = TypeVar("T")
R = TypeVar("R")
SMALL = RunConfig(clients=6, clients_per_round=3, rounds=6)


def _counter_round(state: ServerState, key: Key) -> tuple[ServerState, RoundReport]:
    """A toy round: adds the round's key-derived number to ``w``."""
    bump = float(key.randbelow(100))
    params = {"w": state.params["w"] + bump}
    report = RoundReport(state.round, (0,), 1, {"loss": bump}, 4, 4, 0.0)
    return ServerState(params=params, round=state.round + 1), report


def _start() -> ServerState:
    return ServerState(params={"w": torch.zeros(2)})


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_begin(self, state: ServerState, rounds: int) -> None:
        self.calls.append(("begin", state.round))

    def on_round_end(self, event: RoundEvent) -> None:
        self.calls.append(("round", event.state.round))

    def on_interrupt(self, state: ServerState) -> None:
        self.calls.append(("interrupt", state.round))

    def on_end(self, result: LoopResult) -> None:
        self.calls.append(("end", result.state.round))


# -- run_loop -------------------------------------------------------------------------------------


def test_loop_evaluates_on_schedule_and_after_the_last_round() -> None:
    evaluated: list[int] = []

    def evaluate(state: ServerState) -> dict[str, float]:
        evaluated.append(state.round)
        return {"accuracy": float(state.round)}

    recorder = Recorder()
    result = run_loop(
        _counter_round, _start(), Key.from_seed(0), 7, evaluate=evaluate, eval_every=3,
        callbacks=[recorder],
    )  # fmt: skip
    assert evaluated == [3, 6, 7]
    assert result.metrics == {"accuracy": 7.0}
    assert recorder.calls[0] == ("begin", 0)
    assert recorder.calls[-1] == ("end", 7)
    assert [r for kind, r in recorder.calls if kind == "round"] == list(range(1, 8))


def test_loop_resumed_midway_equals_the_whole_loop() -> None:
    key = Key.from_seed(4)
    whole = run_loop(_counter_round, _start(), key, 6)
    half = run_loop(_counter_round, _start(), key, 3)
    rest = run_loop(_counter_round, half.state, key, 6)
    assert digest(rest.state.params) == digest(whole.state.params)
    assert [r.round for r in rest.reports] == [3, 4, 5]


def test_early_stop() -> None:
    result = run_loop(
        _counter_round, _start(), Key.from_seed(0), 10,
        evaluate=lambda s: {"accuracy": s.round / 10}, early_stop=EarlyStop("accuracy", 0.4),
    )  # fmt: skip
    assert result.state.round == 4
    assert result.stopped_early
    with pytest.raises(ValueError, match="'f1' is not among the evaluated metrics"):
        run_loop(
            _counter_round, _start(), Key.from_seed(0), 3,
            evaluate=lambda s: {"accuracy": 0.0}, early_stop=EarlyStop("f1", 0.5),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_every": 0}, "eval_every must be an integer >= 1, got 0"),
        ({"early_stop": EarlyStop("accuracy", 0.9)}, "early_stop needs an evaluate function"),
    ],
)
def test_loop_refuses_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_loop(_counter_round, _start(), Key.from_seed(0), 2, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounds=1 is below the state's completed rounds 2"):
        run_loop(_counter_round, ServerState(params={}, round=2), Key.from_seed(0), 1)


def test_early_stop_validation() -> None:
    with pytest.raises(ValueError, match="finite number, got nan"):
        EarlyStop("accuracy", float("nan"))
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'up'"):
        EarlyStop("accuracy", 0.5, mode="up")
    assert EarlyStop("loss", 0.2, mode="min").reached({"loss": 0.1})


def test_interrupt_hands_the_last_observed_state_to_callbacks() -> None:
    def round_fn(state: ServerState, key: Key) -> tuple[ServerState, RoundReport]:
        if state.round == 3:
            raise KeyboardInterrupt
        return _counter_round(state, key)

    recorder = Recorder()
    with pytest.raises(KeyboardInterrupt):
        run_loop(round_fn, _start(), Key.from_seed(0), 10, callbacks=[recorder])
    assert recorder.calls[-1] == ("interrupt", 3)


# -- checkpoints ----------------------------------------------------------------------------------


@attrs.frozen
class Moments:
    m: dict[str, torch.Tensor]
    steps: int


def _state_with_aux() -> ServerState:
    aux = {"opt": Moments({"w": torch.full((2,), 0.5)}, steps=3), "extra": (torch.ones(1),)}
    return ServerState(params={"w": torch.arange(2.0)}, round=5, aux=aux)  # type: ignore[arg-type]


def test_checkpoint_round_trip_with_structured_aux(tmp_path: Path) -> None:
    state = _state_with_aux()
    path = save_checkpoint(tmp_path / "ck", state, {"seed": 3, "lr": 0.1})
    assert path == tmp_path / "ck" / CHECKPOINT_NAME
    assert read_config(tmp_path / "ck") == {"seed": 3, "lr": 0.1}
    loaded = load_checkpoint(tmp_path / "ck", aux_template=state.aux)
    assert loaded.state.round == 5
    assert digest(loaded.state.params) == digest(state.params)
    aux = loaded.state.aux
    assert isinstance(aux["opt"], Moments)  # type: ignore[index]
    assert aux["opt"].steps == 3  # type: ignore[index]
    assert torch.equal(aux["opt"].m["w"], torch.full((2,), 0.5))  # type: ignore[index]
    assert not list(tmp_path.glob("ck/.*")), "a temporary file was left behind"


def test_checkpoint_refuses_other_aux_structure(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state_with_aux(), {})
    with pytest.raises(ValueError, match="algorithm state has structure"):
        load_checkpoint(tmp_path)
    other = {"opt": Moments({"w": torch.zeros(3)}, steps=0), "extra": (torch.ones(1),)}
    with pytest.raises(ValueError, match="aux leaf 1 has the wrong shape or dtype"):
        load_checkpoint(tmp_path, aux_template=other)


def _local_record() -> type:
    @attrs.frozen
    class Local:  # qualname "_local_record.<locals>.Local": a "<" inside the name
        m: dict[str, torch.Tensor]
        clients: tuple[dict[str, torch.Tensor], ...]

    return Local


def test_client_states_that_appear_during_a_run_are_restored(tmp_path: Path) -> None:
    local = _local_record()
    template = local({"a:b": torch.zeros(2)}, ({}, {}, {}))  # keys may hold ":"
    kept = {"1.weight": torch.ones(2, 3), "1.bias": torch.zeros(2)}
    state = ServerState({"w": torch.ones(1)}, aux=local({"a:b": torch.ones(2)}, ({}, kept, {})))
    save_checkpoint(tmp_path, state, {})
    aux = load_checkpoint(tmp_path, aux_template=template).state.aux
    assert isinstance(aux, local)
    assert aux.clients[0] == {}
    assert aux.clients[1].keys() == kept.keys()
    assert all(torch.equal(aux.clients[1][n], kept[n]) for n in kept)


@pytest.mark.parametrize(
    "stored",
    [
        {"zz": torch.tensor(3.0)},  # a top-level empty aux takes nothing
        {"c": ({"w": 1},)},  # a client tree of scalars
    ],
)
def test_only_client_trees_may_fill_an_empty_mapping(stored: object, tmp_path: Path) -> None:
    template = {} if "zz" in stored else {"c": ({},)}  # type: ignore[operator]
    save_checkpoint(tmp_path, ServerState({"w": torch.ones(1)}, aux=stored), {})
    with pytest.raises(ValueError, match="algorithm state has structure"):
        load_checkpoint(tmp_path, aux_template=template)


def test_a_hostile_structure_is_refused_not_a_crash(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, ServerState({"w": torch.ones(1)}, aux={"c": ({},)}), {})
    path = tmp_path / CHECKPOINT_NAME
    data = torch.load(path, weights_only=True)
    for text in ("(" * 100_000 + ")" * 100_000, "{c:({x:T,x:T})}", "{c:({:T})}", "{c:({x"):
        data["aux_structure"] = text
        # Re-sealed, as a deliberate forger would: the structure check must hold on its own.
        data["content_sha256"] = checkpoint_module._content_sha256(data)  # pyright: ignore[reportPrivateUsage]
        torch.save(data, path)
        with pytest.raises(ValueError, match="algorithm state has structure"):
            load_checkpoint(tmp_path, aux_template={"c": ({},)})


def test_truncated_and_missing_checkpoints_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, ServerState(params={"w": torch.ones(100)}, round=2), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt or truncated"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "elsewhere")


def test_tampered_parameters_fail_the_digest(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, ServerState(params={"w": torch.ones(4)}, round=1), {})
    payload = torch.load(path, weights_only=True)
    payload["params"]["w"] = torch.zeros(4)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checkpoint(path)
    payload["content_sha256"] = checkpoint_module._content_sha256(payload)  # pyright: ignore[reportPrivateUsage]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not match their stored digest"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "blazefl_fn.checkpoint", "version": 2, "x": _Evil()}, path)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"format": "blazefl_fn.checkpoint"}))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_a_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, ServerState(params={"w": torch.ones(2)}, round=1), {})

    def broken_save(obj: object, f: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, ServerState(params={"w": torch.ones(2)}, round=2), {})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).state.round == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_checkpoint_writer_schedule(tmp_path: Path) -> None:
    saved: list[int] = []

    class Spy(CheckpointWriter):
        def _save(self, state: ServerState) -> None:
            super()._save(state)
            saved.append(state.round)

    run_loop(_counter_round, _start(), Key.from_seed(0), 7, callbacks=[Spy(tmp_path, 3, {})])
    assert saved == [3, 6, 7]
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        CheckpointWriter(tmp_path, 0, {})


def test_simulate_resume_is_bitwise_and_refuses_other_settings(tmp_path: Path) -> None:
    whole = simulate(SMALL)
    simulate(attrs.evolve(SMALL, rounds=2), checkpoint_dir=tmp_path)
    resumed = simulate(SMALL, resume=tmp_path, checkpoint_dir=tmp_path)
    assert resumed.params_sha256 == whole.params_sha256
    assert [r.round for r in resumed.reports] == [2, 3, 4, 5]
    # Execution settings may change, the computation may not.
    simulate(attrs.evolve(SMALL, executor="threads", eval_every=3), resume=tmp_path)
    with pytest.raises(ValueError, match=r"lr=0\.01 \(requested 0\.5\)"):
        simulate(attrs.evolve(SMALL, lr=0.5), resume=tmp_path)
    with pytest.raises(ValueError, match="completed 6 rounds, more than rounds=3"):
        simulate(attrs.evolve(SMALL, rounds=3), resume=tmp_path)


def test_simulate_on_a_given_executor_gives_the_configs_bits_and_leaves_it_open() -> None:
    config = attrs.evolve(SMALL, rounds=2, executor="processes", workers=2)
    with Processes(2) as pool:
        first = simulate(config, executor=pool)
        pids = [w.process.pid for w in pool._workers]  # pyright: ignore[reportPrivateUsage]
        second = simulate(attrs.evolve(config, seed=1), executor=pool)
        assert [w.process.pid for w in pool._workers] == pids  # pyright: ignore[reportPrivateUsage]
        assert pool.map(abs, [-3]) == [3]  # still open
    assert (
        first.params_sha256 == simulate(attrs.evolve(config, executor="sequential")).params_sha256
    )
    assert second.params_sha256 != first.params_sha256


@pytest.mark.parametrize(
    ("config", "executor", "message"),
    [
        (SMALL, Sequential(threads=2), r"runs at threads=2, the config at threads=1"),
        (attrs.evolve(SMALL, threads=2), Sequential(), r"threads=1, the config at threads=2"),
        (SMALL, Sequential(devices=["cpu", "cpu"]), r"trains on \['cpu', 'cpu'\], the config on "
         r"device='cpu'"),
        (SMALL, Vectorized(4), r"cannot stand in for executor='sequential'"),
        (attrs.evolve(SMALL, executor="vectorized"), Sequential(), r"Vectorized computes bits"),
    ],
)  # fmt: skip
def test_simulate_refuses_an_executor_that_would_change_the_bits(
    config: RunConfig, executor: Executor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(config, executor=executor)


class _SpelledDevices(ClosingContext):
    """A user's executor that keeps its devices as names, as `Ray` does for its actors."""

    threads = 1

    def __init__(self, names: tuple[str, ...]) -> None:
        self.devices = names

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        return [fn(task) for task in tasks]


def test_simulate_takes_devices_kept_as_names() -> None:
    config = attrs.evolve(SMALL, rounds=1)
    result = simulate(config, executor=_SpelledDevices(("cpu",)))
    assert result.params_sha256 == simulate(config).params_sha256
    with pytest.raises(ValueError, match=r"trains on \['cpu', 'cpu'\]"):
        simulate(config, executor=_SpelledDevices(("cpu", "cpu")))


def test_simulate_refuses_what_is_not_an_executor() -> None:
    with pytest.raises(TypeError, match=r"executor must be an Executor .* got 3"):
        simulate(SMALL, executor=3)  # type: ignore[arg-type]


def test_simulate_early_stop_and_client_metrics() -> None:
    result = simulate(attrs.evolve(SMALL, rounds=30, target_accuracy=0.3, eval_clients=True))
    assert result.stopped_early
    assert result.accuracy >= 0.3
    assert result.state.round < 30
    assert {"client_accuracy", "client_accuracy_uniform", "client_accuracy_p10"} <= set(
        result.metrics
    )


def test_evaluate_clients_summaries() -> None:
    config = RunConfig(clients=5, clients_per_round=2)
    data = load_federation(config, Key.from_seed(0).fold_in("data"))
    model = model_factory(config, data)()
    params = {k: v.detach() for k, v in model.state_dict().items()}
    out = evaluate_clients(model, params, data.clients)
    sizes = [len(c) for c in data.clients]
    from blazefl_fn.client.evaluation import evaluate
    from blazefl_fn.data import TensorDataset

    each = [
        evaluate(model, params, TensorDataset(c.base.x[c.indices], c.base.y[c.indices]))["accuracy"]
        for c in data.clients
    ]
    assert out["client_accuracy"] == pytest.approx(
        sum(a * n for a, n in zip(each, sizes, strict=True)) / sum(sizes)
    )
    assert out["client_accuracy_uniform"] == pytest.approx(sum(each) / 5)
    assert out["client_accuracy_p10"] == min(each)  # nearest rank of 5 clients: the lowest


# -- metrics log ----------------------------------------------------------------------------------


def test_metrics_log_writes_each_round_and_truncates_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    key = Key.from_seed(0)

    class Peek(Callback):
        lines: list[int] = []  # noqa: RUF012

        def on_round_end(self, event: RoundEvent) -> None:
            # The log is flushed as each round ends: a reader sees it at once.
            self.lines.append(len(path.read_text().splitlines()))

    evaluate = lambda s: {"accuracy": float("nan")}  # noqa: E731
    first = run_loop(
        _counter_round, _start(), key, 5, callbacks=[MetricsLog(path), Peek()], evaluate=evaluate
    )
    assert Peek.lines == [1, 2, 3, 4, 5]
    records = read_metrics(path)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["eval"] == {"accuracy": None}  # NaN becomes null: valid JSON
    assert records[0]["bytes_up"] == 4
    assert records[0]["clients"] == [0]
    # A crash mid-line after round 5, then a resume from a checkpoint of round 3.
    with open(path, "a") as f:
        f.write('{"round": 6, "clie')
    state3 = run_loop(_counter_round, _start(), key, 3).state
    run_loop(_counter_round, state3, key, 6, callbacks=[MetricsLog(path)])
    assert [r["round"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6]
    assert read_metrics(path)[3]["train"] == records[3]["train"]
    assert first.state.round == 5


def test_the_first_record_of_each_loop_carries_the_config(tmp_path: Path) -> None:
    path, key = tmp_path / "m.jsonl", Key.from_seed(0)
    first = run_loop(
        _counter_round, _start(), key, 2, callbacks=[MetricsLog(path, config={"lr": 0.1})]
    )
    run_loop(_counter_round, first.state, key, 4, callbacks=[MetricsLog(path, config={"lr": 0.2})])
    configs = [r.get("config") for r in read_metrics(path)]
    assert configs == [{"lr": 0.1}, None, {"lr": 0.2}, None]
    run_loop(
        _counter_round,
        _start(),
        key,
        1,
        callbacks=[MetricsLog(path)],
    )
    assert "config" not in read_metrics(path)[0]  # none given, none written


def test_read_metrics_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"round": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON record"):
        read_metrics(path)
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="needs an integer 'round'"):
        read_metrics(path)


# -- progress -------------------------------------------------------------------------------------


def test_progress_lines_and_choice() -> None:
    out = io.StringIO()
    result = run_loop(
        _counter_round, ServerState(params={"w": torch.zeros(1)}, round=1), Key.from_seed(0), 3,
        callbacks=[LineProgress(out)], evaluate=lambda s: {"accuracy": 0.5, "loss": 1.0},
        eval_every=2,
    )  # fmt: skip
    lines = out.getvalue().splitlines()
    assert lines[0] == "resuming after round 1/3"
    assert lines[1].startswith("round 2/3  clients 1  train_loss ")
    assert "test_acc 0.5000  test_loss 1.0000" in lines[1]
    assert "test_acc" in lines[2]
    assert result.state.round == 3
    assert isinstance(progress_callback(io.StringIO()), LineProgress)  # not a terminal
    assert type(progress_callback(io.StringIO(), quiet=True)) is Callback


def test_progress_bar_with_tqdm() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    run_loop(
        _counter_round, _start(), Key.from_seed(0), 4, callbacks=[BarProgress(out)],
        evaluate=lambda s: {"accuracy": 0.25},
    )  # fmt: skip
    text = out.getvalue()
    assert "4/4" in text
    assert "acc=0.2500" in text


# -- plots ----------------------------------------------------------------------------------------


def test_plot_runs_writes_an_image(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    logs = []
    for name, seed in (("a", 0), ("b", 1)):
        path = tmp_path / f"{name}.jsonl"
        run_loop(
            _counter_round, _start(), Key.from_seed(seed), 4, callbacks=[MetricsLog(path)],
            evaluate=lambda s: {"accuracy": s.round / 4, "loss": 1 / (1 + s.round)},
        )  # fmt: skip
        logs.append(path)
    out = plot_runs(logs, tmp_path / "curves.png", labels=["fedavg", "other"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "curves.png"]
    with pytest.raises(ValueError, match="got 1 labels for 2 logs"):
        plot_runs(logs, tmp_path / "x.png", labels=["one"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records to plot"):
        plot_runs([empty], tmp_path / "x.png")
    assert json.loads(logs[0].read_text().splitlines()[0])["round"] == 1
