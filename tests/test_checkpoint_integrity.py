"""Checkpoints are verified before use, their writers' leftovers are removed, and one run at a
time writes a checkpoint directory or a metrics log (issue 21, items 4 and 5: an edited seed
was resumed with exit 0; a truncated file gave "[Errno 22]"; temp files of killed writers
stayed forever; two runs shared a directory silently; a fresh run overwrote a checkpoint)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from blazefl_fn import OutputLockedError
from blazefl_fn._files import holding, remove_stale_temps
from blazefl_fn.cli._commands import main
from blazefl_fn.keys import STREAMS_VERSION
from blazefl_fn.records import ServerState
from blazefl_fn.run import checkpoint as checkpoint_module
from blazefl_fn.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_config, save_checkpoint
from blazefl_fn.run.config import RunConfig
from blazefl_fn.run.simulate import simulate
from blazefl_fn.tree import digest, flatten

SMALL = ["run", "--rounds", "2", "--clients", "6", "--clients-per-round", "2", "--quiet"]


def _saved(tmp_path: Path) -> Path:
    state = ServerState(params={"w": torch.arange(4.0)}, round=2, aux={"m": torch.ones(3)})
    return save_checkpoint(tmp_path, state, {"seed": 0, "lr": 0.1})


def _edit(path: Path, change: Any, *, reseal: bool = False) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    if reseal:
        data["content_sha256"] = checkpoint_module._content_sha256(data)  # pyright: ignore[reportPrivateUsage]
    torch.save(data, path)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.__setitem__("config", d["config"].replace('"seed": 0', '"seed": 1')),
        lambda d: d.__setitem__("round", 3),
        lambda d: d["aux_leaves"].__setitem__(0, torch.zeros(3)),
        lambda d: d.__setitem__("numerics", '{"portable": true}'),
    ],
    ids=["config-seed", "round", "aux", "numerics"],
)
def test_any_edit_fails_the_content_checksum(tmp_path: Path, change: Any) -> None:
    path = _saved(tmp_path)
    _edit(path, change)
    with pytest.raises(ValueError, match="content does not match its checksum"):
        load_checkpoint(path, aux_template={"m": torch.ones(3)})
    with pytest.raises(ValueError, match="content does not match its checksum"):
        read_config(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("config"), "field 'config' is missing"),
        (lambda d: d.__setitem__("round", True), "field 'round' has type bool"),
        (lambda d: d.__setitem__("round", -1), "bad round -1"),
        (lambda d: d.__setitem__("config", "[1, 2]"), "field 'config' is not a JSON object"),
        (lambda d: d.__setitem__("config", "{not json"), "field 'config' is not a JSON object"),
        (lambda d: d.__setitem__("aux_leaves", "x"), "field 'aux_leaves' has type str"),
        (lambda d: d["aux_leaves"].append({"a": 1}), "aux leaf 1 is a dict"),
        # Compared elementwise, a tensor raised "Boolean value of Tensor ... is ambiguous".
        (lambda d: d.__setitem__("streams", torch.tensor([2, 2])), "streams version a Tensor"),
        (lambda d: d.__setitem__("version", torch.tensor([3, 3])), "format version a Tensor"),
    ],
    ids=[
        "no-config",
        "bool-round",
        "negative-round",
        "list-config",
        "bad-json",
        "leaves",
        "leaf",
        "tensor-streams",
        "tensor-version",
    ],
)
def test_a_malformed_field_is_one_line_naming_it(tmp_path: Path, change: Any, message: str) -> None:
    path = _saved(tmp_path)
    _edit(path, change, reseal=False)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, aux_template={"m": torch.ones(3)})


def test_parameters_are_checked_against_the_model(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"parameter 'w' is torch.float32 \(4,\), the model's"):
        load_checkpoint(path, {"m": torch.ones(3)}, params_template={"w": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \[\]"):
        load_checkpoint(
            path, {"m": torch.ones(3)}, params_template={"w": torch.zeros(4), "b": torch.zeros(1)}
        )
    ok = load_checkpoint(path, {"m": torch.ones(3)}, params_template={"w": torch.zeros(4)})
    assert torch.equal(ok.state.params["w"], torch.arange(4.0))


def test_a_checkpoint_of_another_model_is_refused_by_simulate(tmp_path: Path) -> None:
    base = RunConfig(rounds=1, clients=6, clients_per_round=2)
    simulate(base, checkpoint_dir=tmp_path)
    data = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    data["params"] = {k: torch.zeros(2, 2) for k in data["params"]}
    data["params_sha256"] = digest(data["params"])
    data["content_sha256"] = checkpoint_module._content_sha256(data)  # pyright: ignore[reportPrivateUsage]
    torch.save(data, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=r"the model.s is torch\.float32"):
        simulate(attrs.evolve(base, rounds=2), resume=tmp_path)


def test_a_resume_reads_and_verifies_the_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RunConfig(rounds=2, clients=4, clients_per_round=2, algorithm="fedadam")
    whole = simulate(config)
    simulate(attrs.evolve(config, rounds=1), checkpoint_dir=tmp_path)
    reads: list[Path] = []
    verify = checkpoint_module._read  # pyright: ignore[reportPrivateUsage]

    def counted(path: Path) -> dict[str, Any]:
        reads.append(path)
        return verify(path)

    monkeypatch.setattr(checkpoint_module, "_read", counted)
    resumed = simulate(config, resume=tmp_path, checkpoint_dir=tmp_path)
    assert reads == [tmp_path / CHECKPOINT_NAME]  # the settings check and the state share it
    assert resumed.params_sha256 == whole.params_sha256
    stored = checkpoint_module.read_checkpoint(tmp_path)
    assert stored.config == read_config(tmp_path)
    loaded = stored.load(aux_template=resumed.state.aux, params_template=resumed.state.params)
    assert loaded.state.round == 2


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_a_truncated_checkpoint_is_corrupt_not_an_errno(tmp_path: Path, fraction: float) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="is corrupt or truncated") as info:
        load_checkpoint(path)
    assert "Errno" not in str(info.value)


def test_cli_refuses_an_edited_seed_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = str(tmp_path / "ck")
    assert main([*SMALL, "--checkpoint-dir", ck]) == 0
    _edit(tmp_path / "ck" / CHECKPOINT_NAME, lambda d: d.__setitem__(
        "config", d["config"].replace('"seed": 0', '"seed": 1')))  # fmt: skip
    capsys.readouterr()
    assert main([*SMALL, "--rounds", "3", "--resume", ck]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "does not match its checksum" in err[0]


# -- temporary files of killed writers ---------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_write_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / f".checkpoint.tmp-{dead}.pt"
    stale_thread = tmp_path / f".checkpoint.tmp-{dead}-140123456789.pt"
    live = tmp_path / f".checkpoint.tmp-{os.getppid()}-1.pt"  # a live process: kept
    lookalike = tmp_path / f".checkpoint.tmp-{dead}.pt.bak"  # not our pattern: kept
    huge = tmp_path / ".checkpoint.tmp-99999999999999999999.pt"  # no such pid: not ours, kept
    other = tmp_path / f".metrics.tmp-{dead}.jsonl"  # another target's: kept
    for p in (stale, stale_thread, live, lookalike, huge, other):
        p.write_bytes(b"x")
    _saved(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert stale.name not in names
    assert stale_thread.name not in names
    assert {live.name, lookalike.name, huge.name, other.name, CHECKPOINT_NAME} <= set(names)
    assert remove_stale_temps(tmp_path / "metrics.jsonl") == [other]


def test_a_writer_killed_mid_write_leaves_a_temp_that_the_next_run_removes(
    tmp_path: Path,
) -> None:
    ck = tmp_path / "ck"
    # A writer that dies (SIGKILL) inside torch.save: its temp file stays behind.
    script = (
        "import os, signal, torch\n"
        "from blazefl_fn.run.checkpoint import save_checkpoint\n"
        "from blazefl_fn.records import ServerState\n"
        "real = torch.save\n"
        "def dying(obj, f):\n"
        "    real(obj, f)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying\n"
        f"save_checkpoint({str(ck)!r}, ServerState(params={{'w': torch.ones(2)}}), {{}})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    assert done.returncode == -signal.SIGKILL
    leftovers = [p.name for p in ck.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1
    assert not (ck / CHECKPOINT_NAME).exists()
    assert main([*SMALL, "--checkpoint-dir", str(ck)]) == 0
    assert sorted(p.name for p in ck.iterdir() if not p.name.endswith(".lock")) == [CHECKPOINT_NAME]


# -- one writer per output ---------------------------------------------------------------------

_HOLD = (
    "import sys, time\n"
    "from blazefl_fn._files import holding\n"
    "from blazefl_fn.run.checkpoint import locked\n"
    "path, kind = sys.argv[1:]\n"
    "with locked(path) if kind == 'checkpoint' else holding(path, 'x'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _holder(path: Path, kind: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), kind], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def test_a_second_run_on_a_locked_checkpoint_dir_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    # Held under another spelling of the same checkpoint: the lock is the file's.
    proc = _holder(ck / CHECKPOINT_NAME, "checkpoint")
    try:
        assert main([*SMALL, "--checkpoint-dir", str(ck)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"checkpoint {ck} is in use by pid {proc.pid}" in err[0]
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            simulate(RunConfig(rounds=1, clients=4, clients_per_round=2), checkpoint_dir=ck)
    finally:
        _stop(proc)
    # The kernel dropped the lock with its holder: no stale lock.
    assert main([*SMALL, "--checkpoint-dir", str(ck)]) == 0


def test_a_second_run_on_a_locked_metrics_log_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "m.jsonl"
    proc = _holder(log, "file")
    try:
        assert main([*SMALL, "--metrics", str(log)]) == 1
        err = capsys.readouterr().err
        assert f"metrics log {log} is in use by pid {proc.pid}" in err
        assert not log.exists()  # nothing written, nothing lost
    finally:
        _stop(proc)


def test_two_real_runs_on_one_directory_one_is_refused(tmp_path: Path) -> None:
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    args = [sys.executable, "-m", "blazefl_fn", *SMALL[:-1], "--rounds", "400",
            "--checkpoint-dir", str(ck), "--quiet"]  # fmt: skip
    first = subprocess.Popen([*args, "--metrics", str(log)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Its own metrics log: only the checkpoint directory is shared.
        second = subprocess.run(
            [*args, "--overwrite", "--metrics", str(tmp_path / "other.jsonl")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1
        assert f"checkpoint {ck} is in use by pid {first.pid}" in second.stderr
        assert not (tmp_path / "other.jsonl").exists()
    finally:
        _stop(first)


def test_the_lock_is_reentrant_within_a_thread_and_refuses_other_threads(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out.jsonl"
    with holding(target, "out"):
        with holding(target, "out"):
            pass
        # Still held by this thread after the inner release: another process is refused...
        proc = subprocess.run(
            [sys.executable, "-c", _HOLD, str(target), "file"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode != 0
        assert "OutputLockedError" in proc.stderr
        # ... and so is another thread of this process (two writers would race the same way).
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with holding(target, "out"):
                    pass
            except OutputLockedError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert "another thread of this process" in str(errors[0])
    with holding(target, "out"):  # released: free again
        pass


# -- a fresh run does not replace what another run wrote ---------------------------------------


def test_a_fresh_run_refuses_an_existing_checkpoint_unless_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = str(tmp_path / "ck")
    assert main([*SMALL, "--checkpoint-dir", ck]) == 0
    before = (tmp_path / "ck" / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    assert main([*SMALL, "--seed", "1", "--checkpoint-dir", ck]) == 1
    err = capsys.readouterr().err
    assert f"{ck} already holds a checkpoint; continue it (--resume {ck})" in err
    assert (tmp_path / "ck" / CHECKPOINT_NAME).read_bytes() == before
    assert main([*SMALL, "--rounds", "3", "--resume", ck]) == 0
    assert main([*SMALL, "--seed", "1", "--checkpoint-dir", ck, "--overwrite"]) == 0
    assert read_config(ck)["seed"] == 1
    assert sorted(os.listdir(ck)) == [CHECKPOINT_NAME]  # no lock or temp file left behind
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        simulate(RunConfig(rounds=1, clients=4, clients_per_round=2), checkpoint_dir=ck)


def test_a_fresh_run_refuses_an_existing_metrics_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "m.jsonl"
    assert main([*SMALL, "--metrics", str(log)]) == 0
    before = log.read_text()
    capsys.readouterr()
    assert main([*SMALL, "--metrics", str(log)]) == 1
    assert "already holds records" in capsys.readouterr().err
    assert log.read_text() == before
    assert main([*SMALL, "--metrics", str(log), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "tensor",
    [
        lambda: torch.zeros(1).expand(10**9),  # 4 bytes in the file, 4 GB if made contiguous
        lambda: torch.zeros(4).to_sparse(),
        lambda: torch.arange(8.0)[::2],  # a strided view: not the storage it carries
    ],
    ids=["expanded", "sparse", "view"],
)
@pytest.mark.parametrize("where", ["params", "aux"])
def test_only_plain_dense_tensors_are_read(tmp_path: Path, tensor: Any, where: str) -> None:
    path = _saved(tmp_path)
    data = torch.load(path, weights_only=True)
    if where == "params":
        data["params"]["w"] = tensor()
    else:
        data["aux_leaves"][0] = tensor()
    torch.save(data, path)
    message = "malformed parameter 'w'" if where == "params" else "aux leaf 0 is a torch"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, aux_template={"m": torch.ones(3)})


_CONTEND = """
import importlib, os, sys, time, types
# The lock module and the stdlib-only modules it imports, under a stand-in package: importing
# blazefl_fn itself would import torch in every contending process.
package = types.ModuleType("files")
package.__path__ = [os.path.dirname(sys.argv[1])]
sys.modules["files"] = package
locks = importlib.import_module("files._files")
target, marker = sys.argv[2], sys.argv[3]
held = 0
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        with locks.holding(target, "x"):
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)  # fails if two hold it at once
            os.close(fd)
            held += 1
            os.unlink(marker)
    except locks.OutputLockedError:
        pass
print(held)
"""


def test_contending_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    # Holders remove the lock file as they let go: a process that opened the old file must
    # notice and retry, or two processes could hold "the" lock at once.
    from blazefl_fn import _files

    target, marker = tmp_path / "m.jsonl", tmp_path / "inside"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTEND, _files.__file__, str(target), str(marker)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert sum(int(out) for out, _ in results) > 50
    assert not (tmp_path / ".m.jsonl.lock").exists()


# -- the random streams a checkpoint ran on ----------------------------------------------------

# Written by blazefl_fn 0.1.0, whose torch generators kept 32 bits of each key (tests/data).
STREAMS_V1 = Path(__file__).parent / "data" / "checkpoint_streams_v1.pt"


def test_a_checkpoint_records_the_stream_version(tmp_path: Path) -> None:
    data = torch.load(_saved(tmp_path), weights_only=True)
    assert data["streams"] == STREAMS_VERSION


def test_a_checkpoint_of_the_old_streams_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="ran on random streams version 1 and this blazefl_fn"):
        load_checkpoint(STREAMS_V1)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / CHECKPOINT_NAME).write_bytes(STREAMS_V1.read_bytes())
    capsys.readouterr()
    args = ["run", "--rounds", "4", "--clients", "6", "--clients-per-round", "3", "--quiet"]
    assert main([*args, "--resume", str(ck), "--checkpoint-dir", str(ck)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "random streams version 1" in err[0]
    assert "start the run again" in err[0]
    # Nothing was written over it.
    assert (ck / CHECKPOINT_NAME).read_bytes() == STREAMS_V1.read_bytes()


def test_a_resealed_checkpoint_of_other_streams_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _edit(path, lambda d: d.__setitem__("streams", STREAMS_VERSION + 1), reseal=True)
    with pytest.raises(ValueError, match=f"random streams version {STREAMS_VERSION + 1}"):
        load_checkpoint(path, aux_template={"m": torch.ones(3)})


# -- outputs that are not regular files: refused, never replaced or written through ------------


def _make(kind: str, path: Path, target: Path) -> None:
    """A node of ``kind`` at ``path``, made in the test's scratch directory (never /dev)."""
    if kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("making a device node needs CAP_MKNOD")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind == "symlink":
        path.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, path)
    else:
        assert kind == "directory"
        path.mkdir()


def _snapshot(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_mode, info.st_ino


KINDS = {
    "device": "a character device",
    "fifo": "a FIFO",
    "socket": "a socket",
    "symlink": "a symbolic link",
    "directory": "a directory",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_metrics_log_that_is_not_a_regular_file_is_refused_untouched(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the atomic rewrite renamed a regular file over the node (/dev/null replaced).
    target = tmp_path / "precious"
    target.write_text("precious\n")
    path = tmp_path / "m.jsonl"
    _make(kind, path, target)
    before = _snapshot(path)
    capsys.readouterr()
    assert main([*SMALL, "--metrics", str(path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"blazefl-fn: error: metrics log {path} is {KINDS[kind]}, not a regular file; "
        + ("give the path of the file it points to" if kind == "symlink"
           else "blazefl-fn writes only regular files")
    )  # fmt: skip
    assert _snapshot(path) == before
    assert target.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["precious", "m.jsonl"])


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
def test_a_checkpoint_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "precious"
    target.write_text("precious\n")
    (tmp_path / "ck").mkdir()
    path = tmp_path / "ck" / CHECKPOINT_NAME
    _make(kind, path, target)
    before = _snapshot(path)
    with pytest.raises(ValueError, match=f"is {KINDS[kind]}, not a regular file"):
        save_checkpoint(path, ServerState(params={"w": torch.ones(2)}), {"seed": 0})
    assert _snapshot(path) == before
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink", "device"])
def test_a_planted_lock_file_is_refused_and_its_target_untouched(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a symlink at ck/.checkpoint.pt.lock made the run truncate and overwrite its target.
    target = tmp_path / "precious"
    target.write_text("precious\n")
    (tmp_path / "ck").mkdir()
    lock = tmp_path / "ck" / f".{CHECKPOINT_NAME}.lock"
    _make(kind, lock, target)
    capsys.readouterr()
    assert main([*SMALL, "--checkpoint-dir", str(tmp_path / "ck")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    expected = "a hard link" if kind == "hardlink" else KINDS[kind]
    assert line == (
        f"blazefl-fn: error: lock file {lock} is {expected}, not one blazefl-fn made; remove it"
    )
    assert target.read_text() == "precious\n"
    assert os.listdir(tmp_path / "ck") == [lock.name]  # no checkpoint written


def test_a_checkpoint_directory_may_be_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "ck").symlink_to(tmp_path / "disk")
    assert main([*SMALL, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "disk" / CHECKPOINT_NAME).is_file()


# -- forged client state: the checksum is recomputed, the layout still has to fit ---------------


def _scaffold_checkpoint(tmp_path: Path) -> Path:
    config = RunConfig(algorithm="scaffold", rounds=2, clients=6, clients_per_round=3)
    simulate(config, checkpoint_dir=tmp_path / "ck")
    return tmp_path / "ck" / CHECKPOINT_NAME


_WEIGHT = '["1.weight","float32",[10,60]]'
_BIAS = '["1.bias","float32",[10]]'
_FORGERIES: dict[str, tuple[str, dict[str, torch.Tensor] | None, str]] = {
    # kind: (the stored layout of client 0's tree, its tree, what the refusal says)
    "dtype": (
        '[["1.weight","int32",[10,60]],["1.bias","int32",[10]]]',
        {
            "1.weight": torch.zeros(10, 60, dtype=torch.int32),
            "1.bias": torch.zeros(10, dtype=torch.int32),
        },
        "client 0's stored state has '1.weight' int32 [10, 60]; this algorithm keeps '1.weight' "
        "float32 [10, 60]",
    ),
    "shape": (
        '[["1.weight","float32",[1]],["1.bias","float32",[1]]]',
        {"1.weight": torch.zeros(1), "1.bias": torch.zeros(1)},
        "client 0's stored state has '1.weight' float32 [1]",
    ),
    # Broadcast against the model's [10, 60] it allocated ~1000x the file's size mid-round.
    "broadcasting": (
        f'[["1.weight","float32",[100000,1,1]],{_BIAS}]',
        {"1.weight": torch.zeros(100000, 1, 1), "1.bias": torch.zeros(10)},
        "client 0's stored state has '1.weight' float32 [100000, 1, 1]",
    ),
    "names": (
        f'[["x","float32",[10,60]],{_BIAS}]',
        {"x": torch.zeros(10, 60), "1.bias": torch.zeros(10)},
        "client 0's stored state holds ['1.bias', 'x']; this algorithm keeps ['1.bias', "
        "'1.weight']",
    ),
    "overflow": (
        '[["1.weight","float32",[' + ",".join(["281474976710656"] * 8) + f"]],{_BIAS}]",
        None,
        "its algorithm state has structure",
    ),
    "nesting": ("[" * 100_000 + "]" * 100_000, None, "its algorithm state has structure"),
}


@pytest.mark.parametrize("kind", list(_FORGERIES))
def test_a_forged_client_state_is_refused_at_load_naming_the_file(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the first four resumed silently (with other bits, or failing rounds later), the
    # last two ended in an error that did not name the file (exit 3).
    path = _scaffold_checkpoint(tmp_path)
    layout, tree, message = _FORGERIES[kind]

    def forge(data: dict[str, Any]) -> None:
        original = f"0:P[{_WEIGHT},{_BIAS}]"
        assert original in data["aux_structure"]
        data["aux_structure"] = data["aux_structure"].replace(original, f"0:P{layout}")
        if tree is not None:
            index = next(
                i for i, leaf in enumerate(data["aux_leaves"]) if leaf.dtype == torch.uint8
            )
            data["aux_leaves"][index] = flatten(tree)[0]

    _edit(path, forge, reseal=True)
    capsys.readouterr()
    args = ["run", "--algorithm", "scaffold", "--rounds", "4", "--clients", "6",
            "--clients-per-round", "3", "--quiet"]  # fmt: skip
    assert main([*args, "--resume", str(tmp_path / "ck")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"blazefl-fn: error: checkpoint {path}: {message}"), line
