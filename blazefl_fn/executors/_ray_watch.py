"""Run as a script: kill a local Ray instance's processes once the driver that started it dies.

    python _ray_watch.py DRIVER_PID DRIVER_START PID:START [PID:START ...]

Ray's own reaper stops its GCS and raylet when the driver is killed (SIGKILL runs no cleanup),
but the raylet's agents (DashboardAgent, RuntimeEnvAgent) lived on for a minute or more. The
`Ray` executor starts this watcher as soon as it has started a Ray instance itself, with that
instance's processes; the watcher adds whatever they start later (the agents, the workers),
and when the driver is gone it kills those still running and exits. When the executor
closes, it shuts the instance down and then sends this watcher SIGTERM: what is still running
of the instance (Ray leaves its agents to notice on their own, for a minute) is killed too.
It also exits once all of them are gone. Standard library only, run by path: it never
imports blazefl_fn or torch. A process counts as the one recorded only if its start time
(``/proc/PID/stat``) still matches, so a reused pid is never killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

_POLL_SECONDS = 0.2


def started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def main(argv: list[str]) -> int:
    """Watch ``argv``'s driver; kill ``argv``'s processes, and what they start, when it dies."""
    # A terminal's Ctrl-C reaches the driver's process group; this watcher has its own
    # session, and ignores it all the same.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM from the executor: it shut the instance down; whatever of it still runs goes now.
    closing: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: closing.append(signum))
    driver, driver_start = int(argv[0]), int(argv[1])
    watched = {int(p): int(s) for p, s in (item.split(":") for item in argv[2:])}
    while True:
        mine = {pid: start for pid, start in watched.items() if started(pid) == start}
        if not mine:
            return 0
        if closing or started(driver) != driver_start:
            for pid in mine:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return 0
        # What the instance starts later (the raylet's agents, workers) joins the watch.
        children = _children()
        todo = list(mine)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in watched and (start := started(child)) is not None:
                    watched[child] = start
                    todo.append(child)
        time.sleep(_POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
