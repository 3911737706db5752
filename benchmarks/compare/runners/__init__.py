"""One runner module per framework; each runs one `Case` and prints one `RunnerResult` line.

Invoked as ``python -m benchmarks.compare.runners.NAME '<case json>'`` with the repository
root as the working directory, by the framework's own interpreter (the peers' venvs for Flower
and BlazeFL). Start-up (imports, data loading, pools, Ray) happens before ``loop_start``.
"""
