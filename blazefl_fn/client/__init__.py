"""What a client runs: local training and its optimizer, vectorised training, distillation.

`training` holds the one local training loop (`train`) and its one configuration
(`LocalTraining`, with `LocalSGD` building the plain one); `optim` the client optimizer's stages
(`add_proximal`, `add_trees`, `momentum`, `chain`) and loss terms; `chunk` the same training for
a whole chunk of clients in one vectorised step (what `blazefl_fn.executors.Vectorized` runs);
`distillation` knowledge distillation and prediction on a public set (DS-FL, SCARLET);
`evaluation` a model's accuracy on a dataset or on each client's own data; `stochastic` layers
that draw from the client's key (`KeyedDropout`). Everything here works on a private copy of a
template module and never writes into the tensors it is given.
"""

__all__: list[str] = []
