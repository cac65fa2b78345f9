"""The per-worker training loop of one line (method x strategy) over its chunks. Plain PyTorch.

    trainer = LineTrainer(config, device="cpu")
    for chunk in chunks:
        report = trainer.train_chunk(chunk, batches=lambda epoch, skip: my_uint8_batches[skip:],
                                     steps_per_epoch=rows // batch_size)
        save_state(folder, trainer.state_dict())

Whoever drives it (Ray Train in `orchestrator/train/runner.py`, or a test with a plain iterable) supplies `Batch`es
(uint8 images with labels, row ids and domains; a bare uint8 `[B, 3, H, W]` tensor is taken as a Batch without
labels), a `wrap_model` hook (DDP) and callbacks; the loop never knows where data comes from. Every step is the
engine's `train_step` (trainers.engine.step): views from the config's ViewPlan, the method's training_step, the
optimizer over the method's param_groups, the EMA of its momentum_pairs at the model's progress.

A weight reset (joint training `from_scratch`: `strategy.reset_weights_at(chunk)`) rebuilds the model as a fresh
run would start it, and every schedule that belongs to the model starts over with it, measured from the chunk where
it was rebuilt (`position["model_start"]`, the line step of the rebuild, and `position["model_epochs"]`, the epochs
the model has completed, counted over its chunks whatever their sizes): the EMA momentum restarts at base_momentum
and rises over the model's planned life (to the next reset when the strategy resets at the next chunk, else to the
line's end); DINO's teacher-temperature warm-up and last-layer freeze and SwAV's prototype freeze and queue start
count the model's epochs and steps; a line-scoped LR schedule (`cosine_line`, with its warm-up) runs over the
model's life too. Per-chunk LR schedules (`cosine`, `constant`) restart every chunk anyway. Loss buffers (DINO's
centre, the MoCo and SwAV queues) are rebuilt with the model. Without resets the model's clock is the line's.

Resuming inside a chunk is data-exact: `batches(epoch, skip)` must yield the same batches in the same order every
time it is called for an epoch, starting at the `skip`-th (those were trained on before the checkpoint), so an
interrupted and resumed chunk sees exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

# The config and its schedule live in trainers.engine.loop_config; re-exported, since callers import them from here.
from trainers.engine.loop_config import (  # noqa: F401
    ChunkReport,
    LoopConfig,
    StepInfo,
    chunk_schedule,
    initial_backbone,
    learning_rate,
    peak_lr,
)
from trainers.engine.step import NonFiniteLossError, train_step
from trainers.engine.types import Batch, StepContext
from trainers.methods.global_bn import convert_global_bn
from trainers.optim import build_optimizer, param_groups, set_lr
from trainers.registry import METHOD_REGISTRY
from trainers.schedules import SCOPE, build_schedule
from trainers.strategies import ChunkEnd, build_strategy
from trainers.views.plan import make_view_set

# `line_step` counts optimizer steps from the line's start (across chunks and weight resets): the step of a
# line-wide schedule.
# `model_start` is the line step at which the current model was built (a weight reset rebuilds it) and
# `model_epochs` the epochs it has completed: the clock of the per-model schedules (see the module docstring).
_START_OF_LINE = {"chunks_done": 0, "chunk": -1, "epoch": 0, "step": 0, "epoch_step": 0, "line_step": 0,
                  "model_start": 0, "model_epochs": 0}


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
        self.strategy = build_strategy(cfg.strategy, cfg.strategy_options)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + rank)
        self._build()
        # Where the line stands: chunks finished, and inside the current chunk which epoch, which step of the chunk,
        # and how many batches of the current epoch were consumed (epochs can be shorter than planned, so this is
        # counted, not derived from the step).
        self.position: dict[str, int] = dict(_START_OF_LINE)

    def _build(self) -> None:
        """(Re)create model and optimizer from the seed: every worker and every reset starts identically."""
        backbone = initial_backbone(self.cfg)
        method = METHOD_REGISTRY[self.cfg.method].build(backbone, **self.cfg.method_options)
        if self.cfg.sync_bn:
            # Global BN statistics in the heads, as SimCLR's paper: per-worker BN lets each worker's statistics
            # leak which samples share a worker. The backbone keeps per-worker BN (the usual DDP recipe). A target
            # network's heads (BYOL, MoCo, DINO) are converted too and stay frozen: the EMA alone moves them.
            for name, child in list(method.named_children()):
                if "backbone" not in name:
                    setattr(method, name, convert_global_bn(child))
        targets = {id(p) for _, target in method.momentum_pairs() for p in target.parameters()}
        trainable_targets = [name for name, p in method.named_parameters() if p.requires_grad and id(p) in targets]
        if trainable_targets:  # they would reach the optimizer, and DDP would wait for their gradients forever
            raise RuntimeError(f"{self.cfg.method}: EMA target parameters must be frozen, these are trainable: "
                               f"{trainable_targets[:5]}")
        self.method = method.to(self.device)
        if self.cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.model = self.wrap_model(self.method)
        # The strategies' own modules (CaSSLe's predictor and frozen copy): trained with the method, each trainable
        # one through its own wrapper, checkpointed once like the method.
        self.strategy_modules = nn.ModuleDict(self.strategy.modules(
            self.method, lambda module: self.wrap_model(module.to(self.device)))).to(self.device)
        groups = self.method.param_groups(self.cfg.weight_decay)
        if any(p.requires_grad for p in self.strategy_modules.parameters()):
            groups += param_groups(self.strategy_modules, self.cfg.weight_decay)
        self.optimizer = build_optimizer(self.cfg.optimizer, groups, lr=peak_lr(self.cfg), momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay, eeta=self.cfg.eeta)

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "strategy_modules": self.strategy_modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # Every rank's strategy state and augmentation generator, by rank: this rank's only; under DDP the
            # caller stores `rank_states()` (gathered from all ranks) here instead.
            "strategy": [self.strategy.state_dict()],
            "position": dict(self.position),
            "generators": [self.generator.get_state()],
            "generator_device": self.device.type,
            "config": asdict(self.cfg),
        }

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's generator state, by rank. Under DDP a collective: all ranks call it together."""
        return self.rank_states()["generators"]

    def rank_states(self) -> dict[str, list[Any]]:
        """What each rank holds alone (its generator, its strategy state: a replay shard), gathered by rank, as
        `state_dict()`'s "generators" and "strategy". Under DDP a collective: all ranks call it together."""
        own = (self.generator.get_state(), self.strategy.state_dict())
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            states = [own]
        else:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, own)
        return {"generators": [g for g, _ in states], "strategy": [st for _, st in states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.strategy_modules.load_state_dict(state.get("strategy_modules", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        strategy_states = state["strategy"]
        if isinstance(strategy_states, dict):  # a checkpoint from before per-rank strategy state
            strategy_states = [strategy_states]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.strategy.load_state_dict(strategy_states, self.rank, world)
        self.position = {**_START_OF_LINE, **self._with_model_clock(state["position"])}
        generators = state.get("generators") or ([state["generator"]] if "generator" in state else [])
        # A rank restores its own stream of crops and colours; a state from another kind of device (a CUDA checkpoint
        # evaluated on a CPU) cannot be set and is not needed there; a rank the checkpoint did not have keeps its seed.
        if self.rank < len(generators) and state.get("generator_device", "cpu") == self.device.type:
            self.generator.set_state(generators[self.rank])

    def _with_model_clock(self, position: dict[str, int]) -> dict[str, int]:
        """`position` with the model's clock; derived for a checkpoint from before it was kept (the model was built
        at the start of the newest chunk the strategy resets at, every chunk having `epochs_per_chunk` epochs)."""
        if "model_start" in position and "model_epochs" in position:
            return position
        chunk = position.get("chunk", -1)
        current = chunk if chunk >= 0 else position.get("chunks_done", 0) - 1  # the chunk the model last trained
        born = max([c for c in range(1, current + 1) if self.strategy.reset_weights_at(c)], default=0)
        epochs = (current - born + (0 if chunk >= 0 else 1)) * self.cfg.epochs_per_chunk + (
            position.get("epoch", 0) if chunk >= 0 else 0)
        line_step, step = position.get("line_step", 0), position.get("step", 0)
        if not born:
            start = 0
        elif born == chunk:  # rebuilt at the start of the chunk it is inside
            start = line_step - step
        else:  # a finished rebuilt model, which the next chunk's start replaces
            start = line_step
        return {**position, "model_start": start, "model_epochs": max(0, epochs)}

    # ----------------------------------------------------------------- training
    def start_chunk(self, chunk: int) -> None:
        """Called before a chunk's first step (not when resuming inside it). A weight reset rebuilds the model and
        restarts its clock here: every per-model schedule counts from this chunk (see the module docstring)."""
        if self.strategy.reset_weights_at(chunk):
            self._build()
            self.position.update(model_start=self.position["line_step"], model_epochs=0)
        self.position.update(chunk=chunk, epoch=0, step=0, epoch_step=0)

    def _model_end(self, chunk: int, steps_total: int) -> int | None:
        """The line step at which the current model's planned life ends: this chunk's end when the strategy
        rebuilds the model at the next chunk, else the line's end (`line_steps`; None when unknown)."""
        if self.strategy.reset_weights_at(chunk + 1):
            return self.position["line_step"] - self.position["step"] + steps_total
        return self.cfg.line_steps or None

    def train_chunk(
        self,
        chunk: int,
        batches: Callable[[int, int], Iterable[Batch | torch.Tensor]],
        steps_per_epoch: int,
        on_step: Callable[[StepInfo], None] | None = None,
        on_checkpoint: Callable[[], None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None,
    ) -> ChunkReport:
        """Train `epochs_per_chunk` passes; `batches(epoch, skip)` yields `Batch`es (or bare uint8 `[B,3,H,W]`
        tensors) of an epoch from its `skip`-th batch on (0 unless resuming inside that epoch), in the same order
        on every call.

        An epoch runs at most `steps_per_epoch` steps (the planned length, which also shapes the LR schedule) and
        ends early when the batches run out: rows dropped as undecodable make the real epoch shorter than the
        manifest says. Under DDP the ranks agree at every step whether all of them still have a batch, so every
        rank steps the same number of times. Resumes inside the chunk when `self.position` says so.

        `on_epoch_end(epochs_done)` is called after every epoch but the chunk's last (whose state the chunk-end
        checkpoint holds), with the weights checked finite, so the caller can checkpoint and evaluate mid-chunk.

        A loss that turns NaN or infinite raises NonFiniteLossError (naming the method, the step and the LR) at
        the next log interval or checkpoint, before anything is saved: the newest checkpoint stays a good one.
        """
        if steps_per_epoch < 1:
            raise ValueError(f"chunk {chunk}: steps_per_epoch must be >= 1 (too few rows for the batch size?)")
        if self.position.get("chunk") != chunk:
            self.start_chunk(chunk)
        cfg = self.cfg
        steps_total = cfg.epochs_per_chunk * steps_per_epoch
        schedule = chunk_schedule(cfg, steps_total, steps_per_epoch)
        line_scope = SCOPE[cfg.schedule] == "line"
        model_start, model_end = self.position["model_start"], self._model_end(chunk, steps_total)
        if line_scope and (model_start, model_end) != (0, cfg.line_steps):
            # A rebuilt model's line schedule (warm-up included) runs over its own life, as a fresh line's would.
            schedule = build_schedule(cfg.schedule, peak_lr(cfg), model_end - model_start, cfg.line_warmup_steps)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (self.rank, 1)
        self.strategy.setup(rank, world)
        extra_losses = self.strategy.extra_losses(self.method)
        augment = partial(make_view_set, plan=cfg.views, generator=self.generator)  # a strategy's extra rows' views
        self.method.train()
        losses: list[torch.Tensor] = []
        lrs: list[float] = []
        checked = 0  # losses[:checked] are known finite
        samples = 0
        fallbacks = torch.zeros((), dtype=torch.long, device=self.device)  # local crops outside the IoU band
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
                batch = self._next_batch(iterator)
                if batch is None:  # this epoch's rows are used up (on some rank)
                    break
                now = time.perf_counter()
                data_wait_s += now - waiting
                if first_batch_s is None:
                    first_batch_s = now - started
                step = self.position["step"]
                lr = schedule.lr(self.position["line_step"] - model_start if line_scope else step)
                set_lr(self.optimizer, lr)
                batch = batch.to(self.device, non_blocking=True)
                ctx = StepContext(step=self.position["line_step"], total_steps=cfg.line_steps or None, chunk=chunk,
                                  epoch=epoch, lr=lr, rank=rank, world_size=world,
                                  steps_per_epoch=steps_per_epoch, model_start=model_start, model_end=model_end,
                                  model_epochs=self.position["model_epochs"])
                mixed = self.strategy.prepare_batch(batch, ctx)  # replay's rows join here
                views = make_view_set(mixed.images, cfg.views, generator=self.generator)
                if views.overlap_fallbacks is not None:
                    fallbacks += views.overlap_fallbacks
                views, mixed = self.strategy.prepare_views(views, mixed, ctx, augment)  # LUMP mixes views
                if cfg.channels_last:
                    views = views.map(lambda v: v.contiguous(memory_format=torch.channels_last))
                out = train_step(self.model, self.method, self.optimizer, views, mixed, ctx, autocast=autocast,
                                 extra_losses=extra_losses)
                self.strategy.after_step(batch, ctx)
                losses.append(out.loss.detach().float())
                lrs.append(lr)
                size = len(batch)
                samples += size
                interval_samples += size
                self.position["step"] = step + 1
                self.position["epoch_step"] += 1
                self.position["line_step"] += 1
                if on_step and (step + 1) % cfg.log_every == 0:
                    checked = self._check_finite(chunk, losses, lrs, checked, first_step)
                    now = time.perf_counter()
                    recent = torch.stack(losses[-cfg.log_every :]).mean().item()
                    on_step(StepInfo(chunk, epoch, step + 1, steps_total, recent, lr,
                                     interval_samples / max(now - interval_start, 1e-9)))
                    interval_start, interval_samples = now, 0
                if on_checkpoint and cfg.checkpoint_every_steps and (step + 1) % cfg.checkpoint_every_steps == 0:
                    if step + 1 < steps_total:
                        checked = self._check_finite(chunk, losses, lrs, checked, first_step, weights=True)
                        saving = time.perf_counter()
                        on_checkpoint()
                        checkpoint_s += time.perf_counter() - saving
            model_epoch = self.position["model_epochs"]
            self.position.update(epoch=epoch + 1, epoch_step=0, model_epochs=model_epoch + 1)
            self.method.on_epoch_end(StepContext(step=self.position["line_step"], total_steps=cfg.line_steps or None,
                                                 chunk=chunk, epoch=epoch, rank=rank, world_size=world,
                                                 steps_per_epoch=steps_per_epoch, model_start=model_start,
                                                 model_end=model_end, model_epochs=model_epoch))
            if on_epoch_end is not None and epoch + 1 < cfg.epochs_per_chunk:
                checked = self._check_finite(chunk, losses, lrs, checked, first_step, weights=True)
                saving = time.perf_counter()
                on_epoch_end(epoch + 1)
                checkpoint_s += time.perf_counter() - saving
        self._check_finite(chunk, losses, lrs, checked, first_step, weights=True)
        # Importances, buffer merges: on every rank, before the chunk-end checkpoint the caller writes.
        self.strategy.on_chunk_end(ChunkEnd(self.method, chunk, lambda: batches(0, 0), self.device, rank, world,
                                            max_batches=steps_per_epoch))
        loss_values = torch.stack(losses).cpu().tolist() if losses else []
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
            overlap_fallbacks=int(fallbacks),
        )

    def _check_finite(self, chunk: int, losses: list[torch.Tensor], lrs: list[float], checked: int,
                      first_step: int, weights: bool = False) -> int:
        """Raise NonFiniteLossError if a loss since `losses[checked]` (or, with `weights`, a weight: before a
        checkpoint) is not finite on any rank; else len(losses).

        One small all-reduce per check keeps the ranks agreeing, so all of them stop at the same step.
        """
        if len(losses) == checked and not weights:
            return checked
        finite = torch.isfinite(torch.stack(losses[checked:])) if len(losses) > checked else torch.ones(0, dtype=bool)
        bad = (~finite).float().sum().reshape(1)
        if weights:
            broken = [name for name, p in self.method.named_parameters() if not torch.isfinite(p).all()]
            bad += len(broken)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        if bad.item() == 0:
            return len(losses)
        local = (~finite).nonzero()
        if not losses:
            raise NonFiniteLossError(f"{self.cfg.method}: the weights are not finite at the start of chunk {chunk}")
        index = max(0, checked + (int(local[0]) if len(local) else len(finite) - 1))
        value: Any = losses[index].item()
        if math.isfinite(value):
            value = f"finite ({value:.4g}) but the weights did not stay finite"
        raise NonFiniteLossError(
            f"{self.cfg.method}: the loss became {value} at step {first_step + index + 1} of chunk {chunk} "
            f"(lr {lrs[index]:.4g}); stopped before saving, so the newest checkpoint is the last good one. "
            f"Lower optim.lr, add optim.warmup_epochs, or check the data"
        )

    def _next_batch(self, iterator: Iterator[Batch | torch.Tensor]) -> Batch | None:
        """The next batch, or None when this rank's iterator is dry or (under DDP) any other rank's is."""
        item = next(iterator, None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            have = torch.tensor([0 if item is None else 1], device=self.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if not have.item():
                return None
        if item is None or isinstance(item, Batch):
            return item
        return Batch.from_images(item)
