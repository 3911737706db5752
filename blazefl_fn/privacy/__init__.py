"""Client-level differential privacy: all of DP lives here.

`mechanisms` holds the mechanisms and their records (`CentralDP`, `LocalDP`, `AdaptiveClipping`,
the noised mean of clipped updates, per-client noise); `privatize` turns an algorithm of the
FedAvg family into a private one and accounts for it (`privatize`, `Accountant`,
`PrivacyBudget`, with Opacus's RDP or PRV accountants, imported lazily).
"""

__all__: list[str] = []
