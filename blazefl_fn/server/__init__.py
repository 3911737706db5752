"""What the server does between rounds: sample, aggregate, step, and keep client state.

`sampling` picks each round's clients (`uniform_sampler`, `poisson_sampler`); `aggregators`
combines client trees (`mean`, `median`, `trimmed_mean`, `krum`, clipping); `optim` the server
optimizers in the manner of optax (`sgd`, `momentum`, `adam`, `yogi`, `adagrad`, `chain`); and
`client_state` the per-client state stateful algorithms keep between rounds (`ClientStore`, its
memory budget and spill files, and the dispatch/collect helpers).
"""

__all__: list[str] = []
