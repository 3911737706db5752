"""The client-state store: persistent versions, the memory budget, spill files, checkpoints."""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blazefl_fn as fl
from blazefl_fn.algorithms.scaffold import ScaffoldState, scaffold
from blazefl_fn.algorithms.scarlet import scarlet
from blazefl_fn.data.datasets import ClientData, TensorDataset
from blazefl_fn.executors import Sequential
from blazefl_fn.keys import Key
from blazefl_fn.models import mlp
from blazefl_fn.records import Uplink
from blazefl_fn.round import make_round
from blazefl_fn.run.checkpoint import load_checkpoint, save_checkpoint
from blazefl_fn.run.simulate import run_rounds
from blazefl_fn.server.client_state import (
    ClientStore,
    StateLayout,
    StoreOptions,
    collect_states,
    initial_states,
)
from blazefl_fn.tree import Params, digest, flatten, tree_spec, trees_equal

DTYPES = [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool, torch.bfloat16]


def _tree(seed: int, size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(size, generator=g) * 100
    return {"w": values.to(dtype), "n": torch.arange(seed % 5, dtype=torch.int64)}


def _equal(store: ClientStore, model: dict[int, Params]) -> None:
    assert store.num_stored == len(model)
    assert store.ids() == tuple(sorted(model))
    for cid, tree in model.items():
        assert trees_equal(store[cid], tree), cid
    for cid, tree in store.items():
        assert trees_equal(tree, model[cid])


batches = st.lists(
    st.dictionaries(
        st.integers(0, 999_999),
        st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.sampled_from(DTYPES)),
        max_size=6,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(batches=batches, budget=st.sampled_from([None, 0, 200, 2_000]))
def test_every_version_reads_back_what_was_put_in(
    batches: list[dict[int, tuple[int, int, torch.dtype]]], budget: int | None
) -> None:
    store = ClientStore(1_000_000, StoreOptions(memory_bytes=budget))
    versions: list[tuple[ClientStore, dict[int, Params]]] = [(store, {})]
    for batch in batches:
        trees = {cid: _tree(*spec) for cid, spec in batch.items()}
        model = dict(versions[-1][1])
        model.update(trees)
        versions.append((versions[-1][0].updated(trees), model))
        if budget is not None:
            assert store.memory_bytes <= budget
    # Older versions are unchanged by the newer ones, spilled or not.
    for version, model in versions:
        _equal(version, model)


def test_an_empty_tree_forgets_the_client() -> None:
    store = ClientStore(10).updated({3: {"a": torch.ones(1)}, 4: {"a": torch.zeros(2)}})
    after = store.updated({3: {}})
    assert after.ids() == (4,)
    assert store.ids() == (3, 4)
    assert 3 not in after
    assert 3 in store
    assert "3" not in store
    assert -1 not in store
    assert after[3] == {}


def test_spilled_trees_are_exact_and_files_go_when_no_version_holds_them(tmp_path: Path) -> None:
    store = ClientStore(100, StoreOptions(memory_bytes=0, spill_dir=str(tmp_path)))
    trees = {cid: _tree(cid, 33, DTYPES[cid % len(DTYPES)]) for cid in range(12)}
    trees[12] = {"empty": torch.zeros(0), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    full = store.updated(trees)
    assert full.memory_bytes == 0
    assert full.spilled_bytes > 0
    (spill_dir,) = tmp_path.iterdir()
    assert len(list(spill_dir.glob("*.bin"))) == 13
    _equal(full, trees)
    # A reader cannot change what is stored: the map is private (copy-on-write).
    read = full[5]
    read["w"].zero_()
    assert trees_equal(full[5], trees[5])
    # Replacing a client drops its old file once no version holds it.
    half = full.updated({cid: {} for cid in range(6)})
    assert len(list(spill_dir.glob("*.bin"))) == 13
    del full, read
    gc.collect()
    assert len(list(spill_dir.glob("*.bin"))) == 7
    del half, store
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_memory_stays_flat_when_the_same_clients_update_every_round() -> None:
    store = ClientStore(1_000_000, StoreOptions(memory_bytes=None))
    clients = range(0, 1_000_000, 100_003)
    trees: dict[int, Params] = {}
    for round_index in range(200):
        trees = {cid: _tree(round_index + cid, 256, torch.float32) for cid in clients}
        store = store.updated(trees)
    assert store.num_stored == len(clients)
    # Exactly the latest trees (aligned), nothing of the 199 older versions.
    assert store.memory_bytes == sum(tree_spec(t).nbytes for t in trees.values())


def test_a_store_of_a_million_clients_costs_nothing_until_used() -> None:
    from _memory import traced_peak

    with traced_peak() as peak:
        store = initial_states(1_000_000)
        store = collect_states(store, [Uplink(999_999, 1, {}, state={"c": torch.ones(4)})])
    assert peak.bytes < 100_000
    assert store.ids() == (999_999,)


def test_bad_input_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="num_clients must be >= 1, got 0"):
        ClientStore(0)
    with pytest.raises(TypeError, match="num_clients must be an int, got bool"):
        ClientStore(True)
    with pytest.raises(TypeError, match="options must be StoreOptions, got dict"):
        ClientStore(3, {"memory_bytes": 1})  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="memory_bytes"):
        StoreOptions(memory_bytes=-1)
    with pytest.raises(TypeError, match="spill_dir must be a path or None, got int"):
        StoreOptions(spill_dir=3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="spill_dir '/nonexistent/x' is not a directory"):
        StoreOptions(spill_dir="/nonexistent/x")
    assert StoreOptions(spill_dir=Path("/tmp")).spill_dir == "/tmp"  # pyright: ignore[reportArgumentType]
    store = ClientStore(5)
    with pytest.raises(IndexError, match="client 5 is outside"):
        store.updated({5: {"a": torch.ones(1)}})
    with pytest.raises(IndexError, match="client -1 is outside"):
        store[-1]
    with pytest.raises(TypeError, match="not iterated"):
        list(store)
    with pytest.raises(TypeError, match="client ids are ints, got bool"):
        store.updated({True: {"a": torch.ones(1)}})
    with pytest.raises(TypeError, match="client 1's state must be a mapping"):
        store.updated({1: torch.ones(1)})  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="client 1's state must map str names to tensors"):
        store.updated({1: {"a": 1.0}})  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="options must be StoreOptions"):
        scaffold(MODEL, num_clients=12, clients_per_round=3, local=LOCAL, store=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="uplink of client 7 is outside the 5 stored clients"):
        collect_states(store, [Uplink(7, 1, {}, state={"a": torch.ones(1)})])


def test_numpy_and_torch_ids_are_client_ids() -> None:
    import numpy as np

    store = ClientStore(10).updated({np.int64(3): {"a": torch.ones(1)}})  # pyright: ignore[reportArgumentType]
    assert store.ids() == (3,)
    assert isinstance(store.ids()[0], int)
    assert torch.equal(store[torch.tensor(3)]["a"], torch.ones(1))  # pyright: ignore[reportArgumentType]
    assert np.int32(3) in store
    assert True not in store  # a bool is not client 1


@pytest.mark.parametrize("budget", [None, 0])
def test_a_reader_that_writes_in_place_changes_no_stored_version(budget: int | None) -> None:
    store = ClientStore(4, StoreOptions(memory_bytes=budget)).updated({1: {"w": torch.ones(3)}})
    later = store.updated({2: {"w": torch.zeros(1)}})
    store[1]["w"].mul_(7)
    later[1]["w"].zero_()
    assert torch.equal(store[1]["w"], torch.ones(3))
    assert torch.equal(later[1]["w"], torch.ones(3))


def test_a_bad_batch_stores_nothing() -> None:
    store = ClientStore(4)
    with pytest.raises(IndexError, match="client 9 is outside"):
        store.updated({0: {"w": torch.ones(100)}, 9: {"w": torch.ones(1)}})
    assert store.memory_bytes == 0


def test_a_failed_spill_leaves_the_store_usable_and_accounted(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    store = ClientStore(8, StoreOptions(memory_bytes=100, spill_dir=str(spill)))
    store = store.updated({0: {"w": torch.ones(16)}})  # 64 bytes: within the budget
    spill.rmdir()  # the spill directory disappears before the first spill
    with pytest.raises(FileNotFoundError):
        store.updated({1: {"w": torch.ones(16)}})
    assert torch.equal(store[0]["w"], torch.ones(16))
    spill.mkdir()
    grown = store.updated({2: {"w": torch.full((16,), 2.0)}})
    assert grown.memory_bytes <= 100
    assert grown.spilled_bytes > 0
    assert torch.equal(grown[0]["w"], torch.ones(16))
    assert torch.equal(grown[2]["w"], torch.full((16,), 2.0))
    assert not list(spill.glob("*/*.tmp"))


def test_a_store_pickles_by_value() -> None:
    store = ClientStore(9, StoreOptions(memory_bytes=0)).updated({2: _tree(1, 5, torch.float64)})
    copy = pickle.loads(pickle.dumps(store))
    assert copy.options == store.options
    _equal(copy, {2: _tree(1, 5, torch.float64)})


# -- inside algorithms: spilling changes nothing; checkpoints keep every stored client -----------

_gen = torch.Generator().manual_seed(0)
_x = torch.randn(12 * 30, 8, generator=_gen)
_y = (_x[:, 0] > 0).long() + (_x[:, 1] > 0).long()
CLIENTS = tuple(
    ClientData(TensorDataset(_x, _y), torch.arange(i * 30, (i + 1) * 30)) for i in range(12)
)
MODEL = functools.partial(mlp, (8,), 3, hidden=(16,))
LOCAL = fl.LocalSGD(batch_size=10, lr=0.1)
PUBLIC = torch.randn(40, 8, generator=_gen)


def _scaffold(options: StoreOptions | None) -> Any:
    return scaffold(MODEL, num_clients=12, clients_per_round=3, local=LOCAL, store=options)


def _scarlet(options: StoreOptions | None) -> Any:
    return scarlet(
        MODEL, public=PUBLIC, num_classes=3, num_clients=12, clients_per_round=3, local=LOCAL,
        public_per_round=15, cache_duration=2, store=options,
    )  # fmt: skip


def _digests(state: fl.ServerState) -> dict[str, str]:
    aux = state.aux
    out = {"params": digest(state.params)}
    for field in attrs.fields(type(aux)):
        value = getattr(aux, field.name)
        if isinstance(value, ClientStore):
            out.update({f"{field.name}{cid}": digest(tree) for cid, tree in value.items()})
    return out


@pytest.mark.parametrize("factory", [_scaffold, _scarlet], ids=["scaffold", "scarlet"])
def test_a_spilled_store_gives_the_same_bits_and_resumes_bitwise(
    factory: Any, tmp_path: Path
) -> None:
    os.mkdir(tmp_path / "spill")
    spill = StoreOptions(memory_bytes=0, spill_dir=str(tmp_path / "spill"))
    key, init = Key.from_seed(3), Key.from_seed(4)
    with Sequential() as executor:
        kept_algo, spilled_algo = factory(StoreOptions(memory_bytes=None)), factory(spill)
        kept, _ = run_rounds(
            make_round(kept_algo, CLIENTS, executor), kept_algo.init(init), key, until=6
        )
        half, _ = run_rounds(
            make_round(spilled_algo, CLIENTS, executor), spilled_algo.init(init), key, until=3
        )
        assert half.aux.clients.memory_bytes == 0
        assert half.aux.clients.spilled_bytes > 0
        save_checkpoint(tmp_path / "ckpt", half, {})
        restored = load_checkpoint(tmp_path / "ckpt", spilled_algo.init(init).aux).state
        assert _digests(restored) == _digests(half)
        assert restored.aux.clients.spilled_bytes > 0  # the resumed store keeps the budget
        rest = functools.partial(run_rounds, make_round(spilled_algo, CLIENTS, executor))
        resumed, _ = rest(restored, key, until=6)
    assert _digests(resumed) == _digests(kept)
    assert resumed.aux.clients.num_stored == kept.aux.clients.num_stored < 12


def test_a_checkpoint_of_another_federation_size_is_refused(tmp_path: Path) -> None:
    algo = _scaffold(None)
    with Sequential() as executor:
        state, _ = run_rounds(
            make_round(algo, CLIENTS, executor),
            algo.init(Key.from_seed(0)),
            Key.from_seed(0),
            until=1,
        )
    save_checkpoint(tmp_path, state, {})
    other = scaffold(MODEL, num_clients=13, clients_per_round=3, local=LOCAL)
    with pytest.raises(ValueError, match=r"algorithm state has structure .*Store12\[") as info:
        load_checkpoint(tmp_path, other.init(Key.from_seed(0)).aux)
    assert "\n" not in str(info.value)
    assert isinstance(state.aux, ScaffoldState)


A = '[["a","float32",[1]]]'  # the layout of a tree {"a": one float32}


@pytest.mark.parametrize(
    "text",
    [
        f"Store12[3:P{A},3:P{A}]",  # a duplicate id
        f"Store12[5:P{A},3:P{A}]",  # out of order
        f"Store12[12:P{A}]",  # outside the federation
        f"Store12[03:P{A}]",  # not as flatten writes it
        f"Store12[\u0663:P{A}]",  # a non-ASCII digit
        f"Store12[\u00b2:P{A}]",  # a superscript int() refuses
        "Store12[3:P[]]",  # a store holds no empty tree
        f"Store12[a:P{A}]",
        "Store12[" + "1" * 30 + f":P{A}]",
        f"Store12[3:P{A}",  # unterminated
        f"Store13[3:P{A}]",  # another federation size
        'Store12[3:P[["a","float32",[1]],["a","float32",[1]]]]',  # a name twice
        'Store12[3:P[["a","nodtype",[1]]]]',
        'Store12[3:P[["a","Tensor",[1]]]]',  # a torch attribute that is not a dtype
        'Store12[3:P[["a","float32",[-1]]]]',
        'Store12[3:P[["a","float32",[1.0]]]]',
        'Store12[3:P[["a","float32",[true]]]]',
        'Store12[3:P[["a","float32",[281474976710657]]]]',
        'Store12[3:P[["a","float32"]]]',
        'Store12[3:P[[1,"float32",[1]]]]',
        "Store12[3:P{}]",
        "Store12[3:P[",
    ],
)
def test_an_edited_store_structure_is_refused(text: str) -> None:
    from blazefl_fn.run import _aux_leaves

    leaves: list[object] = [torch.zeros(64, dtype=torch.uint8)] * 2
    with pytest.raises(_aux_leaves.Mismatch):
        _aux_leaves.fit(ClientStore(12), _aux_leaves.Reader(text, leaves))


@pytest.mark.parametrize(
    "leaf",
    [torch.zeros(63, dtype=torch.uint8), torch.zeros(64), torch.zeros(2, 32, dtype=torch.uint8), 3],
)
def test_a_stored_leaf_of_the_wrong_size_or_kind_is_refused(leaf: object) -> None:
    from blazefl_fn.run import _aux_leaves

    with pytest.raises(_aux_leaves.BadLeaf):
        _aux_leaves.fit(ClientStore(12), _aux_leaves.Reader(f"Store12[3:P{A}]", [leaf]))


def test_a_stored_structure_round_trips() -> None:
    from blazefl_fn.run import _aux_leaves

    trees = {
        3: {
            "b": torch.zeros(2, 3, dtype=torch.float64),
            "a name, with: odd} chars": torch.ones(()),
        },
        11: _tree(1, 3, torch.bfloat16),
    }
    store = ClientStore(12).updated(trees)
    leaves: list[object] = []
    text = _aux_leaves.flatten(store, "aux", leaves)
    assert text.startswith('Store12[3:P[["b","float64",[2,3]],["a name, with: odd} chars",')
    assert len(leaves) == 2  # one packed leaf per client
    reader = _aux_leaves.Reader(text, leaves)
    rebuilt = _aux_leaves.fit(ClientStore(12), reader)
    assert isinstance(rebuilt, ClientStore)
    assert (reader.pos, reader.taken) == (len(text), 2)
    _equal(rebuilt, trees)
    assert list(rebuilt[3]) == list(trees[3])  # the tree's order too


def test_scarlet_shares_one_budget_between_its_two_stores() -> None:
    algo = _scarlet(StoreOptions(memory_bytes=4_000))
    with Sequential() as executor:
        state, _ = run_rounds(
            make_round(algo, CLIENTS, executor),
            algo.init(Key.from_seed(0)),
            Key.from_seed(0),
            until=3,
        )
    clients, known = state.aux.clients, state.aux.known
    assert clients.memory_bytes == known.memory_bytes <= 20_000
    assert clients.spilled_bytes == known.spilled_bytes > 0


def test_a_checkpoint_from_before_the_store_is_refused_with_the_reason(tmp_path: Path) -> None:
    algo = _scaffold(None)
    state = algo.init(Key.from_seed(0))
    old = attrs.evolve(state.aux, clients=tuple({} for _ in range(12)))
    save_checkpoint(tmp_path, attrs.evolve(state, aux=old), {})
    with pytest.raises(ValueError, match="keeps every client's state in a tuple") as info:
        load_checkpoint(tmp_path, state.aux)
    assert "\n" not in str(info.value)


def test_a_stored_config_from_before_the_store_flags_takes_their_defaults() -> None:
    from blazefl_fn.run.config import RunConfig
    from blazefl_fn.run.simulate import config_dict, config_from_dict

    stored = {k: v for k, v in config_dict(RunConfig()).items() if not k.startswith("client_state")}
    assert "client_state_memory_mb" not in stored
    assert config_from_dict(stored) == RunConfig()


_KILLED_WHILE_SPILLING = """
import os, signal, sys, torch
from blazefl_fn.server.client_state import ClientStore, StateLayout, StoreOptions
store = ClientStore(4, StoreOptions(memory_bytes=0, spill_dir=sys.argv[1]))
store = store.updated({0: {"w": torch.ones(64)}, 1: {"w": torch.zeros(64)}})
assert store.spilled_bytes > 0
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
"""


def test_a_killed_processs_spill_directory_is_removed_by_the_next_store(tmp_path: Path) -> None:
    # Before: a run killed with SIGKILL left its spill directory (and files) for ever.
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_SPILLING, str(tmp_path)], check=False, timeout=120
    )
    assert done.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith("blazefl-fn-store-")
    assert len(list(left.glob("*.bin"))) == 2
    mine = tmp_path / "not-a-store"  # anything else in the directory is left alone
    mine.mkdir()
    ClientStore(4, StoreOptions(memory_bytes=1 << 20, spill_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-store"]


# -- spill files under attack: one error naming the directory, never a signal or a short file ---

_SPILL_ATTACKS = {
    # A file-size limit (as a full disk): the write is short. Before: no error, and rounds later
    # "size <512> is smaller than the required mapping size".
    "size-limit": """
resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
store = store.updated({0: {"w": torch.ones(256)}})  # 1 KiB to spill
""",
    # A spill file truncated under the run, after a reader got a tree. Before: SIGBUS.
    "truncated": """
store = store.updated({0: {"w": torch.ones(4096)}})
tree = store[0]
(d,) = os.listdir(sys.argv[1])
(f,) = [n for n in os.listdir(os.path.join(sys.argv[1], d)) if n.endswith(".bin")]
os.truncate(os.path.join(sys.argv[1], d, f), 100)
print(float(tree["w"].sum()), flush=True)  # what was read stays readable
store[0]
""",
    # The spill directory replaced by a file. Before: one error and a finalizer traceback for
    # every stored tree.
    "replaced": """
store = store.updated({i: {"w": torch.ones(16) * i} for i in range(50)})
(d,) = os.listdir(sys.argv[1])
shutil.rmtree(os.path.join(sys.argv[1], d))
open(os.path.join(sys.argv[1], d), "w").close()
store = store.updated({i: {"w": torch.zeros(16)} for i in range(50, 60)})
""",
}
_SPILL_PRELUDE = """
import os, resource, shutil, sys, torch
from blazefl_fn.server.client_state import ClientStore, StateLayout, StoreOptions
store = ClientStore(100, StoreOptions(memory_bytes=0, spill_dir=sys.argv[1]))
"""
_SPILL_REASONS = {
    "size-limit": r"cannot write 0\.bin: File too large",
    "truncated": r"0\.bin holds 100 of its 16384 bytes \(truncated or replaced",
    "replaced": r"cannot write 50\.bin: Not a directory",
}


@pytest.mark.parametrize("attack", list(_SPILL_ATTACKS))
def test_a_spill_file_problem_is_one_error_naming_the_directory(
    tmp_path: Path, attack: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SPILL_PRELUDE + _SPILL_ATTACKS[attack], str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # an exception, not a signal
    assert "Exception ignored" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"blazefl_fn\.errors\.SpillError: client-state spill directory "
        rf"{re.escape(str(tmp_path))}/blazefl-fn-store-\d+-\w+: {_SPILL_REASONS[attack]}.*",
        last,
    ), last
    if attack == "truncated":
        assert done.stdout == "4096.0\n"


# -- the layout a store holds its trees to ---------------------------------------------------------


def test_a_layout_refuses_other_names_dtypes_and_shapes_and_keeps_to_free_rows() -> None:
    layout = StateLayout.of({"w": torch.zeros(2, 3)}).plus(
        StateLayout((("rows", torch.int64, (None,)),), max_free=4)
    )
    store = ClientStore(5, layout=layout)
    good = {"w": torch.ones(2, 3), "rows": torch.arange(4)}
    assert store.updated({1: good}).num_stored == 1
    assert store.updated({1: {}}).num_stored == 0  # forgetting a client is always allowed
    bad = {
        "other names": ({"w": torch.ones(2, 3)}, "holds ['w']; this algorithm keeps ['rows', 'w']"),
        "dtype": ({**good, "w": torch.ones(2, 3, dtype=torch.float64)}, "'w' float64 [2, 3]"),
        "shape": ({**good, "w": torch.ones(3, 2)}, "'w' float32 [3, 2]"),
        "rank": ({**good, "rows": torch.zeros(2, 2, dtype=torch.int64)}, "'rows' int64 [2, 2]"),
        "too many rows": ({**good, "rows": torch.arange(5)}, "keeps 'rows' int64 ['*']"),
    }
    for what, (tree, message) in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            store.updated({3: tree})
        buffer, spec = flatten(tree)
        with pytest.raises(ValueError, match=re.escape(message)):
            store.with_packed({3: (buffer, spec)})
        assert what


def test_a_layout_survives_versions_pickles_and_checkpoint_templates() -> None:
    layout = StateLayout.of({"w": torch.zeros(2)})
    store = ClientStore(3, layout=layout).updated({0: {"w": torch.ones(2)}})
    assert store.cleared().layout == layout
    assert pickle.loads(pickle.dumps(store)).layout == layout
    assert store.laid_out(None).updated({1: {"v": torch.ones(1)}}).num_stored == 2
    with pytest.raises(ValueError, match="client 0's stored state holds"):
        store.laid_out(StateLayout.of({"v": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"both layouts hold \['w'\]"):
        layout.plus(layout)
    with pytest.raises(TypeError, match="layout must be a StateLayout"):
        ClientStore(3, layout={"w": 1})  # type: ignore[arg-type]


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_spill_directory_whose_owner_holds_its_lock_is_kept_whatever_its_pid(
    tmp_path: Path,
) -> None:
    # A run on another machine (or container) sharing the spill directory: its pid means
    # nothing here, its lock does. Before: such a live directory was removed by pid alone.
    live = tmp_path / "blazefl-fn-store-4000000-abcd1234"
    live.mkdir()
    (live / "0.bin").write_bytes(b"x")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(live / ".owner")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        unlocked = tmp_path / "blazefl-fn-store-4000001-ef567890"  # no .owner: being made
        unlocked.mkdir()
        ClientStore(4, StoreOptions(memory_bytes=1 << 20, spill_dir=str(tmp_path)))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unlocked.name])
    finally:
        holder.kill()
        holder.communicate()
    # Its owner gone, the lock is free: the next store removes it.
    ClientStore(4, StoreOptions(memory_bytes=1 << 20, spill_dir=str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == [unlocked.name]


@settings(max_examples=30, deadline=None)
@given(
    batches=batches,
    budgets=st.tuples(st.sampled_from([None, 0, 200]), st.sampled_from([None, 0, 200])),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_digest_depends_on_contents_only(
    batches: list[dict[int, tuple[int, int, torch.dtype]]],
    budgets: tuple[int | None, int | None],
    seed: int,
) -> None:
    # One history of updates, and the final contents stored at once in a shuffled order into
    # a store with another budget: the same contents, the same digest.
    history = ClientStore(1_000_000, StoreOptions(memory_bytes=budgets[0]))
    final: dict[int, Params] = {}
    for batch in batches:
        trees = {cid: _tree(*spec) for cid, spec in batch.items()}
        history = history.updated(trees)
        final.update(trees)
    final = {cid: tree for cid, tree in final.items() if tree}
    order = torch.randperm(len(final), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = sorted(final)
    shuffled = {ids[i]: final[ids[i]] for i in order}
    direct = ClientStore(1_000_000, StoreOptions(memory_bytes=budgets[1])).updated(shuffled)
    assert history.digest() == direct.digest()
    if final:
        # Another id, or one changed value, changes it.
        first = ids[0]
        other = next(i for i in range(1_000_000) if i not in final)
        moved = direct.updated({first: {}, other: final[first]})
        assert moved.digest() != direct.digest()
        tree = dict(final[first])
        name = next(iter(tree))
        if tree[name].numel():
            bumped = tree[name].clone()
            bumped.view(-1)[0] = (
                ~bumped.view(-1)[0] if bumped.dtype == torch.bool else (bumped.view(-1)[0] + 1)
            )
            if not trees_equal({name: bumped}, {name: tree[name]}):
                changed = direct.updated({first: {**tree, name: bumped}})
                assert changed.digest() != direct.digest()
    else:
        assert direct.digest() == ClientStore(5).digest()


def test_a_store_digest_is_pinned() -> None:
    store = ClientStore(10).updated({3: {"w": torch.arange(4, dtype=torch.float32)}})
    expected = hashlib.sha256(b"blazefl_fn.ClientStore\0")
    expected.update(f"3\0{digest({'w': torch.arange(4, dtype=torch.float32)})}\0".encode())
    assert store.digest() == expected.hexdigest()
    assert ClientStore(10).updated({3: {}}).digest() == ClientStore(10).digest()
