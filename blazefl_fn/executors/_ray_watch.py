"""Run as a script: kill a local Ray instance's processes once the driver that started it dies.

    python _ray_watch.py DRIVER_PID DRIVER_START PID:START [PID:START ...]

Ray's own reaper stops its GCS and raylet when the driver is killed (SIGKILL runs no cleanup),
but the raylet's agents (DashboardAgent, RuntimeEnvAgent) lived on for a minute or more. The
`Ray` executor starts this watcher for a Ray instance it started itself, with every process of
that instance; when the driver is gone it kills those still running and exits. It also exits
once all of them are gone (the instance was shut down normally), and the executor stops it
when it closes. Standard library only, run by path: it never imports blazefl_fn or torch.
A process counts as the one recorded only if its start time (``/proc/PID/stat``) still
matches, so a reused pid is never killed.
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


def main(argv: list[str]) -> int:
    """Watch ``argv``'s driver; kill ``argv``'s processes when it dies."""
    # A terminal's Ctrl-C reaches the driver's process group; this watcher has its own
    # session, and ignores it all the same.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    driver, driver_start = int(argv[0]), int(argv[1])
    watched = [tuple(int(x) for x in item.split(":")) for item in argv[2:]]
    while True:
        mine = [(pid, start) for pid, start in watched if started(pid) == start]
        if not mine:
            return 0
        if started(driver) != driver_start:
            for pid, _ in mine:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return 0
        time.sleep(_POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
