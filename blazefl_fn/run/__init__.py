"""A whole simulation: its configuration, the round loop and what observes and saves it.

`config` is `RunConfig` (every setting of a run, validated) and the names it accepts;
`simulate` builds a run from a config and runs it (`simulate`, `RunResult`); `loop` the round
loop under callbacks (`run_loop`, `run_rounds`, `Callback`, `EarlyStop`); `checkpoint` saving
and resuming a run's full state; `metrics_log` the JSON-lines metrics log; `progress` the
progress bar; `plot` curves from metrics logs.
"""

__all__: list[str] = []
