"""Side-by-side FedAvg benchmark: blazefl_fn against Flower, BlazeFL and a bare PyTorch loop.

``python -m benchmarks.compare`` creates the peers' virtual environments under
``benchmarks/.peers/`` (once), writes one data set per workload, runs every (workload,
framework, mode, parallelism) case as a fresh subprocess ``--repeats`` times, and writes JSON,
a markdown table and a PNG chart into ``benchmarks/results/``.

Layout (each runner is a separate process; peer runners run inside the peer's venv, so the
modules they import -- `spec`, `common`, `models`, `runners` -- need only torch and numpy):

- `spec`: workloads, cases and runner results as plain JSON-able dataclasses.
- `common`, `models`: the client update, data loading and the models every runner shares.
- `runners`: one module per framework (bare loop, blazefl_fn, Flower, BlazeFL).
- `data`, `envs`, `execute`, `report`, `plot`, `cli`: the orchestration (main venv).
"""
