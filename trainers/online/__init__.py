"""Online SSL from a live stream: each small stream batch is learned from with a fixed budget of steps (or seconds)
before the next arrives. Plain PyTorch, like the rest of `trainers/`.

- :mod:`~trainers.online.schedule`: the single local cycle LR scheduler (a one-cycle LR and momentum restarted
  with every stream batch);
- :mod:`~trainers.online.memory`: the replay memory (a uniform reservoir over every stream row seen, sharded over
  DDP ranks);
- :mod:`~trainers.online.rals`: Reducible Anchor Loss Selection (train on the candidates whose loss rose most
  against the model frozen at the batch's start);
- :mod:`~trainers.online.selection`: RALS's selection log (the new batch's share, per batch and per local step).
"""
