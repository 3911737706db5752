"""The ``blazefl-fn`` command line (also ``python -m blazefl_fn``).

Every error is one line ``blazefl-fn: error: ...`` on stderr, never a traceback (unless
``--debug`` or ``BLAZEFL_FN_DEBUG=1`` asks for one), and the exit status says what kind:

- 1: a missing, malformed, locked or already existing file (data, checkpoint, metrics log,
  an experiment file that is not TOML),
  a failed ``data`` download (no server answers, a broken connection, a checksum mismatch),
  or a Ray cluster that does not answer at ``--ray-address``;
- 2: a bad flag or value (in an experiment file too);
- 3: the run failed: a client raised, a worker died or exceeded ``--client-timeout``, training
  diverged (NaN or Inf), any error once the round loop began (other than a file's), or an
  unexpected error; for ``sweep``, a cell that failed;
- 130: interrupted (Ctrl-C); 143: terminated (SIGTERM, handled as Ctrl-C is: workers stopped,
  a final checkpoint written).

Ctrl-C while the command is still importing torch ends it at once, in one line; a second
Ctrl-C while the first is being handled waits for the cleanup (a third quits at once).

`main` is the entry point; the command's machinery loads when it is called, so that importing
`blazefl_fn` arms the Ctrl-C handling before torch is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

# First, before torch: Ctrl-C while the blazefl-fn command is still importing ends it quietly.
from . import _signals  # noqa: F401  # pyright: ignore[reportUnusedImport] (arms it)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``blazefl-fn`` command; returns the process exit status (see the module docstring).

    With ``argv=None`` it is the process's command line (``sys.argv``): ``run --portable``
    then starts the process again with the portable pins (`os.execve`) when they are missing.
    Given an ``argv`` list, it pins this process instead, refusing if a kernel already ran.
    """
    from ._commands import main as run  # the run machinery (and torch) load here

    return run(argv)
