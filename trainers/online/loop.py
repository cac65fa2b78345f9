"""The online loop: learn each stream batch with a fixed number of steps (or until the next batch arrives), with a
per-batch LR cycle, a replay memory and, optionally, RALS. Plain PyTorch, one object per worker.

    online = OnlineTrainer(LineTrainer(loop_cfg, device), OnlineConfig(steps_per_batch=20, rals=True))
    for k, batch in enumerate(stream):                       # Batch of this rank's rows of stream batch k
        report = online.learn(batch, deadline=arrival[k + 1])  # wall-clock time the next batch arrives, or None
    save_state(folder, {**online.state_dict(), **online.rank_states()})

Every step draws `memory_batches` memory batches and joins them to the stream batch; with RALS the candidates are
scored under the current model and the anchor (the model as it was when the batch arrived) and only the `rals_k`
whose loss rose most are trained on. The stream batch joins the memory after its steps, so a batch is never its
own replay.

Deadlines: with `deadline`, a batch whose steps are not all done when it passes is *late*. Policy `drop` stops
its steps there (the rest are counted as dropped); `queue` finishes them, and the next batch waits. Under DDP the
ranks agree at every step (one all-reduce) whether the deadline has passed, so they always take the same steps.
With `drop` and the local cycle, `cycle_fit: measured` (the default) sizes each batch's LR cycle to the time there
is: after its first step (whose LR every cycle shares) the steps that still fit before the deadline are
estimated from the running mean of the measured step times (the last 20, wall clock per step, all of it) and
the batch's one-cycle is built over that many steps (at most `steps_per_batch`), so the last step taken is
annealed instead of cut off near the peak; steps not taken count as dropped. `planned` keeps the planned cycle.
The ranks take the smallest estimate (in the same all-reduce).

Under DDP the memory rows drawn per step and RALS's rows are dealt evenly (`OnlineConfig.uneven_shares`: a
count that does not divide by the world size is refused), so every rank's step has the same shapes.

The wrapped LineTrainer supplies the model, optimizer, views and its generator. Of the line's strategy only the
extra losses and task ends apply (CaSSLe: `sequential+cassle`); the memory is online's replay. The state is the LineTrainer's plus the stream position, every rank's
memory shard and the selection log, so a resumed stream continues at the next batch with the same memory.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainers.engine.loop import LineTrainer
from trainers.engine.step import NonFiniteLossError, train_step
from trainers.engine.types import Batch, StepContext
from trainers.online.config import OnlineConfig
from trainers.online.memory import ReplayMemory
from trainers.online.rals import RALS, SCORERS, SelectionLog, rank_part_rows
from trainers.online.schedule import LocalCycle
from trainers.optim import set_lr
from trainers.strategies import ChunkEnd
from trainers.views.plan import make_view_set


@dataclass
class BatchReport:
    """What learning one stream batch did."""

    stream_batch: int  # its position in the stream (0-based)
    steps: int  # optimizer steps taken on it
    dropped_steps: int  # steps not taken because the next batch arrived (policy drop)
    late: bool  # its steps were not all done before the deadline
    loss: float  # mean training loss over its steps (NaN when none was taken)
    lr: float  # LR of its last step
    seconds: float  # wall time of its steps
    step_seconds: float  # of that, the steps themselves: views and train_step
    rals_seconds: float  # of that, RALS's scoring and selection (0 without RALS); the rest is memory and checks
    new_fraction: float  # share of the trained rows from this stream batch (NaN without RALS)
    memory_rows: int  # rows in this rank's memory shard after the batch joined it
    cycle_steps: int  # length of the LR cycle it ran (steps_per_batch unless fitted to the time budget)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ddp() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_TIMED_STEPS = 20  # step times kept to compare with the time budget, and to fit a batch's cycle to it


class OnlineTrainer:
    def __init__(self, trainer: LineTrainer, cfg: OnlineConfig, clock=time.time) -> None:
        self.trainer, self.cfg = trainer, cfg
        self.clock = clock  # wall-clock seconds, what deadlines are in (a test drives its own)
        rank, world = _ddp()
        self.rank, self.world = rank, world
        uneven = cfg.uneven_shares(world)
        if uneven:
            raise ValueError("; ".join(uneven))
        self.memory_draw = cfg.memory_draw // world  # this rank's memory rows per memory batch
        self.memory = ReplayMemory(cfg.memory_size, seed=cfg.seed) if cfg.memory_size else None
        if self.memory is not None:
            self.memory.setup(rank, world)
        self.selection = SelectionLog()
        self.cycle = LocalCycle(cfg.max_lr, cfg.steps_per_batch, pct_start=cfg.pct_start, div_factor=cfg.div_factor,
                                final_div_factor=cfg.final_div_factor, base_momentum=cfg.base_momentum,
                                max_momentum=cfg.max_momentum) if cfg.schedule == "local_cycle" else None
        # Memory draws and RALS's part permutation: seeded per rank, checkpointed with the rest.
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
        self.rals = RALS(cfg.rals_k, part_size=cfg.rals_part_size, generator=self.generator) if cfg.rals else None
        parted = SCORERS.get(getattr(trainer.method, "name", ""), (None, False))[1]
        if self.rals is not None and parted and world > 1 and cfg.rals_part_size % world:
            used = rank_part_rows(cfg.rals_part_size, world) * world
            warnings.warn(f"online.rals_part_size ({cfg.rals_part_size}) does not divide by the {world} workers: a "
                          f"part takes {used // world} rows of each, {used} rows in all", RuntimeWarning, stacklevel=2)
        self.batches_done = 0  # stream batches learned (the next one to learn is this index)
        self.task: int | None = None  # the task of the last batch learned, when the stream says
        self.steps_done = 0  # optimizer steps over the whole stream
        self.late_batches = 0
        self.dropped_steps = 0
        self._warned_budget = False
        self.budget_warning: str | None = None  # set once, when the budget proves shorter than a step
        self._step_times: list[float] = []
        self._step_walls: deque[float] = deque(maxlen=_TIMED_STEPS)  # clock seconds per step, for fitting cycles
        self._last_read: float | None = None  # the clock's last reading in this batch

    # ----------------------------------------------------------------- one stream batch
    def learn(self, batch: Batch | torch.Tensor, deadline: float | None = None, task: int | None = None) -> BatchReport:
        """Learn this rank's rows of the next stream batch; `deadline` is the wall-clock time (time.time()) the
        following batch arrives, or None when the stream waits for training. `task`, where the stream knows it,
        is the batch's task: when it moves on, the strategies see the end of the previous one (CaSSLe freezes its
        copy of the model there)."""
        cfg, lt = self.cfg, self.trainer
        if task is not None and task != self.task:
            if self.task is not None:
                lt.strategy.on_chunk_end(ChunkEnd(lt.method, self.task, lambda: iter(()), lt.device, self.rank,
                                                  self.world))
            self.task = task
        if not isinstance(batch, Batch):
            batch = Batch.from_images(batch)
        batch = batch.to(lt.device, non_blocking=True)
        method, lc = lt.method, lt.cfg
        method.train()
        if self.rals is not None:
            self.rals.reset_anchor(method)
        autocast = (torch.autocast(device_type=lt.device.type, dtype=torch.bfloat16) if lc.precision == "bf16"
                    else nullcontext())
        lt.strategy.setup(self.rank, self.world)
        extra_losses = lt.strategy.extra_losses(method)  # CaSSLe's distillation, once a task has ended
        started = time.perf_counter()
        losses, lr, late, taken = [], 0.0, False, 0
        step_s = rals_s = 0.0
        fractions = []
        cycle, steps = self.cycle, cfg.steps_per_batch
        fit = (deadline is not None and cycle is not None and cfg.cycle_fit == "measured"
               and cfg.late_policy == "drop")
        self._last_read = None
        step = 0
        while step < steps:
            if deadline is not None:
                past, fitted = self._check(deadline, fit and step == 1)
                if fitted is not None:  # after the first step, whose LR and momentum every cycle shares
                    cycle = cycle.fitted(min(fitted, steps))
                    steps = min(cycle.steps_per_batch, steps)
                if past:
                    late = True
                    if cfg.late_policy == "drop":
                        break
            if cycle is not None:
                lr = cycle.lr(step)
                cycle.apply(lt.optimizer, step)  # the LR (through set_lr: fixed_lr groups keep theirs), momentum
            else:
                lr = cfg.max_lr
                set_lr(lt.optimizer, lr)
            candidates = batch
            if self.memory is not None:
                for _ in range(cfg.memory_batches):
                    drawn = self.memory.draw(self.memory_draw, self.generator)
                    if drawn is not None:
                        candidates = candidates.cat(drawn.to(lt.device))
            ctx = StepContext(step=self.steps_done, total_steps=None, chunk=-1, epoch=0, lr=lr, rank=self.rank,
                              world_size=self.world, stream_batch=self.batches_done)
            stepping = time.perf_counter()  # the step: views and train_step (RALS's scoring is timed apart)
            views = make_view_set(candidates.images, lc.views, generator=lt.generator)
            selecting = 0.0
            if self.rals is not None and len(candidates) * self.world > self.rals.k:
                selection = self.rals.select(method, views, candidates, ctx, new_rows=len(batch))
                selecting = selection.seconds
                rals_s += selecting
                fractions.append(selection.new_fraction)
                rows = selection.rows.to(lt.device)
                views, candidates = views.map(lambda v: v[rows]), candidates.select(rows)
            if lc.channels_last:
                views = views.map(lambda v: v.contiguous(memory_format=torch.channels_last))
            out = train_step(lt.model, method, lt.optimizer, views, candidates, ctx, autocast=autocast,
                             extra_losses=extra_losses)
            took = time.perf_counter() - stepping - selecting
            step_s += took
            if len(self._step_times) <= _TIMED_STEPS:  # enough to judge the budget; an endless stream keeps no more
                self._step_times.append(took)
            losses.append(out.loss.detach().float())
            taken += 1
            step += 1
            self.steps_done += 1
        if deadline is not None and not late and taken == steps and self._check(deadline)[0]:
            late = True  # the last step ended after the next batch arrived
        self._check_finite(losses, lr)
        if self.memory is not None:
            self.memory.add(batch.to("cpu"))
        if fractions:
            self.selection.add_batch(fractions)
        self._warn_if_budget_too_short()
        report = BatchReport(
            stream_batch=self.batches_done, steps=taken, dropped_steps=cfg.steps_per_batch - taken, late=late,
            loss=torch.stack(losses).mean().item() if losses else math.nan, lr=lr,
            seconds=time.perf_counter() - started, step_seconds=step_s, rals_seconds=rals_s,
            new_fraction=sum(fractions) / len(fractions) if fractions else math.nan,
            memory_rows=len(self.memory) if self.memory is not None else 0, cycle_steps=steps)
        self.batches_done += 1
        self.late_batches += int(late)
        self.dropped_steps += report.dropped_steps
        return report

    def _check(self, deadline: float, fit: bool = False) -> tuple[bool, int | None]:
        """(whether the deadline has passed, and with `fit` the cycle length that fits), agreed by all ranks in one
        all-reduce: any rank past the deadline stops them all, the smallest fit wins. Reads the clock once; the
        time since this batch's previous read is the last step's wall time."""
        now = self.clock()
        if self._last_read is not None:
            self._step_walls.append(now - self._last_read)
        self._last_read = now
        fits = 0.0
        if fit:  # 1 step taken; the steps still fitting before the deadline at the mean step time
            mean = sum(self._step_walls) / len(self._step_walls)
            fits = -float(1 + max(0, math.floor((deadline - now) / mean)) if mean > 0 else self.cfg.steps_per_batch)
        # On the trainer's device: NCCL reduces only device tensors.
        agreed = torch.tensor([1.0 if now >= deadline else 0.0, fits], device=self.trainer.device)
        if self.world > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed[0].item()), int(-agreed[1].item()) if fit else None

    def _check_finite(self, losses: list[torch.Tensor], lr: float) -> None:
        bad = torch.tensor([0.0 if not losses else float((~torch.isfinite(torch.stack(losses))).sum())],
                           device=self.trainer.device)
        if self.world > 1:
            dist.all_reduce(bad)
        if bad.item():
            raise NonFiniteLossError(f"{self.trainer.cfg.method}: the loss became non-finite on stream batch "
                                     f"{self.batches_done} (lr {lr:.4g}); lower online.max_lr")

    def _warn_if_budget_too_short(self) -> None:
        budget = self.cfg.time_budget_s
        if budget is None or self._warned_budget or len(self._step_times) < 2:
            return
        step = sorted(self._step_times[1:])[len(self._step_times[1:]) // 2]  # the median, past the first step
        if budget < step:
            self._warned_budget = True
            self.budget_warning = (f"online.time_budget_s ({budget:g} s) is shorter than one training step "
                                   f"({step:.3g} s measured): every batch will be late")
            warnings.warn(self.budget_warning, RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- state
    def counters(self) -> dict[str, Any]:
        last, mean = self.selection.last, self.selection.running_mean
        return {"stream_batches": self.batches_done, "online_steps": self.steps_done,
                "late_batches": self.late_batches, "dropped_steps": self.dropped_steps,
                "rals_new_fraction_last": math.nan if last is None else last,
                "rals_new_fraction_mean100": math.nan if mean is None else mean,
                # per local step index, the mean new fraction over every batch (the paper's Fig. 3b)
                "rals_new_fraction_by_step": self.selection.profile}

    def state_dict(self) -> dict[str, Any]:
        """This rank's view; under DDP the caller adds `rank_states()` (every rank's memory and generators)."""
        memory = [self.memory.state_dict()] if self.memory is not None else []
        return {**self.trainer.state_dict(), "online": self._online_state(memory, [self.generator.get_state()])}

    def _online_state(self, memory: list[dict[str, Any]], generators: list[Any]) -> dict[str, Any]:
        return {"batches_done": self.batches_done, "steps_done": self.steps_done, "late_batches": self.late_batches,
                "dropped_steps": self.dropped_steps, "selection": self.selection.state_dict(), "task": self.task,
                "memory": memory, "generators": generators}

    def rank_states(self) -> dict[str, Any]:
        """Every rank's memory shard and generators, gathered by rank. A collective under DDP."""
        own = (self.memory.state_dict() if self.memory is not None else None, self.generator.get_state())
        states = [own]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, own)
        online = self._online_state([m for m, _ in states if m is not None], [g for _, g in states])
        return {**self.trainer.rank_states(), "online": online}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        online = state["online"]
        self.batches_done, self.steps_done = online["batches_done"], online["steps_done"]
        self.late_batches, self.dropped_steps = online["late_batches"], online["dropped_steps"]
        self.selection.load_state_dict(online["selection"])
        self.task = online.get("task")
        if self.memory is not None and online["memory"]:
            self.memory.load_state_dict(online["memory"], self.rank, self.world)
        if self.rank < len(online["generators"]):
            self.generator.set_state(online["generators"][self.rank])


__all__ = ["BatchReport", "OnlineTrainer"]
