"""Evaluation after every chunk (stage 4): the Ray actor that loads a checkpoint and runs the every-chunk protocols,
the optional studies (few-shot, sharpness, interpolation) and the `eval.downstream` sets on it.

May import `spec`, `plan`, `data` (to read the splits it scores on) and the evaluators/trainers; never `run/`,
`train/` or `tracking/`: it returns numbers, and the driver logs them.
"""
