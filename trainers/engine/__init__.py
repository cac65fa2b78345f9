"""The training engine: the types every loop and method share and the one step they all run.

`trainers.engine.types` (Batch, ViewSet, StepOutput, StepContext) and `trainers.engine.step` (train_step, the EMA
and its schedule). The chunk loop (`trainers.engine.loop`) and the online loop call `train_step`; methods implement
`trainers.methods.base.Method`.
"""

from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet

__all__ = ["Batch", "StepContext", "StepOutput", "ViewSet"]
