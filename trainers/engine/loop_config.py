"""A line's configuration, its learning-rate schedule and its starting weights (what `trainers.engine.loop` trains with).

    cfg = LoopConfig(method="simclr", strategy="sequential", image_size=32, views=view_plan(...))
    learning_rate(cfg, step, steps_total, steps_per_epoch)   # the schedule the loop follows
    initial_backbone(cfg)                                     # the seeded random initialisation
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from trainers.backbones import build_backbone
from trainers.optim import LR_SCALING, OPTIMIZERS, scaled_lr
from trainers.registry import METHOD_REGISTRY, check_backbone_for_method
from trainers.schedules import SCHEDULES, SCOPE, build_schedule
from trainers.views.augment import AugmentConfig
from trainers.views.plan import ViewPlan


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs to train one line; built from the spec by the orchestrator."""

    method: str
    strategy: str
    image_size: int
    views: ViewPlan  # (a sequence of AugmentConfig is taken as the global views, no local ones)
    backbone: str = "resnet18"
    backbone_options: dict[str, Any] = field(default_factory=dict)  # the backbone record's Config options
    backbone_width: int | None = None  # shorthands for backbone_options' `width` / `cifar_stem` (ResNets)
    cifar_stem: bool | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"  # sgd | adamw | lars
    lr: float = 0.3  # the peak LR, or the LR per 256 samples with lr_scaling "linear"
    momentum: float = 0.9
    weight_decay: float = 1e-4  # never applied to biases and normalisation parameters
    eeta: float = 0.001  # LARS trust coefficient
    lr_scaling: str = "none"  # none | linear (lr x global_batch / 256)
    epochs_per_chunk: int = 1
    batch_size: int = 256  # per worker
    global_batch: int = 0  # over all workers, for lr_scaling; 0: batch_size (one worker)
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # cosine (per chunk) | cosine_line (over the line) | constant
    line_steps: int = 0  # planned optimizer steps of the whole line (cosine_line needs it)
    line_warmup_steps: int = 0  # warm-up steps at the line's start (cosine_line)
    seed: int = 0
    precision: str = "fp32"  # or "bf16" (autocast)
    channels_last: bool = False
    log_every: int = 10
    checkpoint_every_steps: int = 0
    sync_bn: bool = False  # the method's heads (not the backbone) use SyncBatchNorm under DDP

    def __post_init__(self) -> None:
        if not isinstance(self.views, ViewPlan):
            if isinstance(self.views, dict):  # a LoopConfig read back from a checkpoint's asdict()
                ties = {k: self.views[k] for k in ("min_iou", "max_iou", "local_loss_weight") if k in self.views}
                plan = ViewPlan(*(tuple(AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                        for k, v in c.items()}) for c in group)
                                  for group in (self.views["global_"], self.views["local"])), **ties)
            else:
                plan = ViewPlan(tuple(self.views))
            object.__setattr__(self, "views", plan)
        METHOD_REGISTRY.require(self.method)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scaling not in LR_SCALING:
            raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {self.lr_scaling!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        needed = METHOD_REGISTRY[self.method].min_global_views
        if len(self.views.global_) < needed:
            raise ValueError(f"views: {self.method} needs at least {needed} global views, got "
                             f"{len(self.views.global_)}")
        if METHOD_REGISTRY[self.method].needs_local_views and not self.views.local:
            raise ValueError(f"views: {self.method} needs local (multi-crop) views")
        check_backbone_for_method(self.method, self.backbone)  # US3L needs a slimmable backbone
        self.resolved_backbone_options()

    def resolved_backbone_options(self) -> dict[str, Any]:
        """`backbone_options` with the `backbone_width` / `cifar_stem` shorthands merged in (when set)."""
        options = dict(self.backbone_options)
        for key, value in (("width", self.backbone_width), ("cifar_stem", self.cifar_stem)):
            if value is None:
                continue
            if key in options and options[key] != value:
                raise ValueError(
                    f"backbone {key} given twice: {value!r} and backbone_options[{key!r}]={options[key]!r}"
                )
            options[key] = value
        return options


@dataclass
class StepInfo:
    chunk: int
    epoch: int
    step: int  # inside the chunk
    steps_total: int  # of the chunk
    loss: float  # mean over the last log interval
    lr: float
    samples_per_s: float


@dataclass
class ChunkReport:
    chunk: int
    steps: int
    samples: int
    seconds: float
    losses: list[float]  # one per step, this worker
    final_loss: float
    first_step: int = 0  # > 0 when the chunk resumed from a checkpoint taken inside it
    first_batch_s: float = 0.0  # from the chunk's start to its first batch in hand (pipeline start-up)
    data_wait_s: float = 0.0  # total time blocked waiting for batches (the input path's share of `seconds`)
    checkpoint_s: float = 0.0  # total time in on_checkpoint (in-chunk checkpoints)
    overlap_fallbacks: int = 0  # local crops that found no box in the plan's IoU band (took the nearest), this worker

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_lr(cfg: LoopConfig) -> float:
    """The LR the schedule peaks at: `cfg.lr`, scaled by the global batch when `lr_scaling` is linear."""
    return scaled_lr(cfg.lr, cfg.global_batch or cfg.batch_size, cfg.lr_scaling)


def chunk_schedule(cfg: LoopConfig, steps_total: int, steps_per_epoch: int):
    """The schedule object for a chunk of `steps_total` steps: per chunk (its steps), or the line's (`cosine_line`,
    over `cfg.line_steps` steps counted from the line's start)."""
    if SCOPE[cfg.schedule] == "line":
        if cfg.line_steps < 1:
            raise ValueError("schedule 'cosine_line' needs line_steps (the line's planned total steps)")
        return build_schedule(cfg.schedule, peak_lr(cfg), cfg.line_steps, cfg.line_warmup_steps)
    return build_schedule(cfg.schedule, peak_lr(cfg), steps_total, int(cfg.warmup_epochs * steps_per_epoch))


def learning_rate(cfg: LoopConfig, step: int, steps_total: int, steps_per_epoch: int) -> float:
    """The LR at `step` (of the chunk; of the line for `cosine_line`) of a chunk of `steps_total` steps."""
    return chunk_schedule(cfg, steps_total, steps_per_epoch).lr(step)


def initial_backbone(cfg: LoopConfig) -> nn.Module:
    """The backbone a line starts from: the seeded random initialisation every worker and reset builds."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, cfg.image_size, **cfg.resolved_backbone_options())
