"""Test kits for code users write against the library.

`aggregators` holds the aggregator property kit: hypothesis strategies and checks that a custom
aggregator keeps the properties the stock ones are tested for (permutation invariance, the
identity on equal inputs, bounded output, determinism).
"""

__all__: list[str] = []
