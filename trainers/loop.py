"""The per-worker training loop of one line (method x strategy) over its chunks. Plain PyTorch.

    trainer = LineTrainer(config, device="cpu")
    for chunk in chunks:
        report = trainer.train_chunk(chunk, batches=lambda epoch, skip: my_uint8_batches[skip:],
                                     steps_per_epoch=rows // batch_size)
        save_state(folder, trainer.state_dict())

Whoever drives it (Ray Train in `orchestrator/runner.py`, or a test with a plain iterable) supplies uint8 image
batches `[B, 3, H, W]`, a `wrap_model` hook (DDP) and callbacks; the loop never knows where data comes from.

Resuming inside a chunk is data-exact: `batches(epoch, skip)` must yield the same batches in the same order every
time it is called for an epoch, starting at the `skip`-th (those were trained on before the checkpoint), so an
interrupted and resumed chunk sees exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainers.backbones import build_backbone
from trainers.methods import METHODS
from trainers.optim import LR_SCALING, OPTIMIZERS, build_optimizer, param_groups, scaled_lr, set_lr
from trainers.schedules import SCHEDULES, SCOPE, build_schedule
from trainers.strategies import build_strategy
from trainers.views import AugmentConfig, make_views


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs to train one line; built from the spec by the orchestrator."""

    method: str
    strategy: str
    image_size: int
    views: tuple[AugmentConfig, ...]
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; known: {sorted(METHODS)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scaling not in LR_SCALING:
            raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {self.lr_scaling!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.views) < 2:
            raise ValueError(f"views: need at least 2 view configs, got {len(self.views)}")
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


# `line_step` counts optimizer steps from the line's start (across chunks and weight resets): the step of a
# line-wide schedule.
_START_OF_LINE = {"chunks_done": 0, "chunk": -1, "epoch": 0, "step": 0, "epoch_step": 0, "line_step": 0}


class LineTrainer:
    """Owns the model, optimizer and strategy of one line on one worker."""

    def __init__(
        self,
        cfg: LoopConfig,
        device: str | torch.device = "cpu",
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        rank: int = 0,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.wrap_model = wrap_model or (lambda m: m)
        self.rank = rank
        self.strategy = build_strategy(cfg.strategy, **cfg.strategy_options)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + rank)
        self._build()
        # Where the line stands: chunks finished, and inside the current chunk which epoch, which step of the chunk,
        # and how many batches of the current epoch were consumed (epochs can be shorter than planned, so this is
        # counted, not derived from the step).
        self.position: dict[str, int] = dict(_START_OF_LINE)

    def _build(self) -> None:
        """(Re)create model and optimizer from the seed: every worker and every reset starts identically."""
        torch.manual_seed(self.cfg.seed)
        backbone = build_backbone(self.cfg.backbone, self.cfg.image_size, **self.cfg.resolved_backbone_options())
        self.method = METHODS[self.cfg.method](backbone, **self.cfg.method_options).to(self.device)
        if self.cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.model = self.wrap_model(self.method)
        # A method may bring its own groups (e.g. a predictor at a fixed LR); otherwise biases and norm
        # parameters go to a group without weight decay (and without LARS adaptation).
        own_groups = getattr(self.method, "param_groups", None)
        groups = own_groups(self.cfg.weight_decay) if callable(own_groups) else param_groups(
            self.method, self.cfg.weight_decay
        )
        self.optimizer = build_optimizer(self.cfg.optimizer, groups, lr=peak_lr(self.cfg), momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay, eeta=self.cfg.eeta)

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "position": dict(self.position),
            # Every rank's augmentation generator, by rank: this rank's only; under DDP the caller stores
            # `generator_states()` (gathered from all ranks) here instead.
            "generators": [self.generator.get_state()],
            "generator_device": self.device.type,
            "config": asdict(self.cfg),
        }

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's generator state, by rank. Under DDP a collective: all ranks call it together."""
        own = self.generator.get_state()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [own]
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, own)
        return states

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.position = {**_START_OF_LINE, **state["position"]}
        generators = state.get("generators") or ([state["generator"]] if "generator" in state else [])
        # A rank restores its own stream of crops and colours; a state from another kind of device (a CUDA checkpoint
        # evaluated on a CPU) cannot be set and is not needed there; a rank the checkpoint did not have keeps its seed.
        if self.rank < len(generators) and state.get("generator_device", "cpu") == self.device.type:
            self.generator.set_state(generators[self.rank])

    # ----------------------------------------------------------------- training
    def start_chunk(self, chunk: int) -> None:
        """Called before a chunk's first step (not when resuming inside it)."""
        if self.strategy.reset_weights_at(chunk):
            self._build()
        self.position.update(chunk=chunk, epoch=0, step=0, epoch_step=0)

    def train_chunk(
        self,
        chunk: int,
        batches: Callable[[int, int], Iterable[torch.Tensor]],
        steps_per_epoch: int,
        on_step: Callable[[StepInfo], None] | None = None,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> ChunkReport:
        """Train `epochs_per_chunk` passes; `batches(epoch, skip)` yields uint8 `[B,3,H,W]` tensors of an epoch from
        its `skip`-th batch on (0 unless resuming inside that epoch), in the same order on every call.

        An epoch runs at most `steps_per_epoch` steps (the planned length, which also shapes the LR schedule) and
        ends early when the batches run out: rows dropped as undecodable make the real epoch shorter than the
        manifest says. Under DDP the ranks agree at every step whether all of them still have a batch, so every
        rank steps the same number of times. Resumes inside the chunk when `self.position` says so.
        """
        if steps_per_epoch < 1:
            raise ValueError(f"chunk {chunk}: steps_per_epoch must be >= 1 (too few rows for the batch size?)")
        if self.position.get("chunk") != chunk:
            self.start_chunk(chunk)
        cfg = self.cfg
        steps_total = cfg.epochs_per_chunk * steps_per_epoch
        schedule = chunk_schedule(cfg, steps_total, steps_per_epoch)
        line_scope = SCOPE[cfg.schedule] == "line"
        self.method.train()
        losses: list[torch.Tensor] = []
        samples = 0
        first_step = self.position["step"]
        started = time.perf_counter()
        interval_start, interval_samples = started, 0
        first_batch_s, data_wait_s, checkpoint_s = None, 0.0, 0.0
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else nullcontext()
        )
        for epoch in range(self.position["epoch"], cfg.epochs_per_chunk):
            self.position["epoch"] = epoch
            skip = self.position["epoch_step"]  # batches of this epoch trained on before a resume
            iterator = iter(batches(epoch, skip))
            for _ in range(max(0, steps_per_epoch - skip)):
                waiting = time.perf_counter()
                images = self._next_batch(iterator)
                if images is None:  # this epoch's rows are used up (on some rank)
                    break
                now = time.perf_counter()
                data_wait_s += now - waiting
                if first_batch_s is None:
                    first_batch_s = now - started
                step = self.position["step"]
                lr = schedule.lr(self.position["line_step"] if line_scope else step)
                set_lr(self.optimizer, lr)
                images = images.to(self.device, non_blocking=True)
                views = make_views(images, cfg.views, generator=self.generator)
                if cfg.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                with autocast:
                    out = self.model(views)
                loss = out["loss"]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.method.momentum_update((step + 1) / steps_total)
                losses.append(loss.detach().float())
                batch = images.shape[0]
                samples += batch
                interval_samples += batch
                self.position["step"] = step + 1
                self.position["epoch_step"] += 1
                self.position["line_step"] += 1
                if on_step and (step + 1) % cfg.log_every == 0:
                    now = time.perf_counter()
                    recent = torch.stack(losses[-cfg.log_every :]).mean().item()
                    on_step(StepInfo(chunk, epoch, step + 1, steps_total, recent, lr,
                                     interval_samples / max(now - interval_start, 1e-9)))
                    interval_start, interval_samples = now, 0
                if on_checkpoint and cfg.checkpoint_every_steps and (step + 1) % cfg.checkpoint_every_steps == 0:
                    if step + 1 < steps_total:
                        saving = time.perf_counter()
                        on_checkpoint()
                        checkpoint_s += time.perf_counter() - saving
            self.position.update(epoch=epoch + 1, epoch_step=0)
        loss_values = torch.stack(losses).cpu().tolist() if losses else []
        if loss_values and not all(math.isfinite(v) for v in loss_values):
            raise FloatingPointError(f"chunk {chunk}: the loss became {loss_values[-1]} (lower optim.lr?)")
        self.position.update(chunks_done=self.position["chunks_done"] + 1, chunk=-1, epoch=0, step=0, epoch_step=0)
        return ChunkReport(
            chunk=chunk,
            steps=len(loss_values),
            samples=samples,
            seconds=time.perf_counter() - started,
            losses=loss_values,
            final_loss=loss_values[-1] if loss_values else float("nan"),
            first_step=first_step,
            first_batch_s=first_batch_s or 0.0,
            data_wait_s=data_wait_s,
            checkpoint_s=checkpoint_s,
        )


    def _next_batch(self, iterator: Iterator[torch.Tensor]) -> torch.Tensor | None:
        """The next batch, or None when this rank's iterator is dry or (under DDP) any other rank's is."""
        images = next(iterator, None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            have = torch.tensor([0 if images is None else 1], device=self.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if not have.item():
                return None
        return images


def views_from_spec_dicts(image_size: int, count: int, options: dict[str, Any]) -> tuple[AugmentConfig, ...]:
    """`count` identical view configs from a flat options dict (the spec's views.global block)."""
    opts = dict(options)
    size = opts.pop("size", None) or image_size
    opts.pop("count", None)
    if "scale" in opts:
        opts["scale"] = tuple(opts["scale"])
    return tuple(AugmentConfig(size=size, **opts) for _ in range(count))


def run_line(
    trainer: LineTrainer,
    chunks: Sequence[int],
    batches: Callable[[int, int, int], Iterable[torch.Tensor]],
    steps_per_epoch: Callable[[int], int],
    on_chunk_end: Callable[[ChunkReport], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> list[ChunkReport]:
    """Train the chunks still to do (from `trainer.position`), calling `on_chunk_end` after each."""
    reports = []
    for chunk in chunks[trainer.position["chunks_done"] :]:
        report = trainer.train_chunk(
            chunk, lambda epoch, skip, c=chunk: batches(c, epoch, skip), steps_per_epoch(chunk), on_step=on_step
        )
        reports.append(report)
        if on_chunk_end:
            on_chunk_end(report)
    return reports
