"""The model's own clock: a weight reset (joint training `from_scratch`) restarts every per-model schedule at the
chunk that rebuilt the model (EMA momentum, DINO's teacher-temperature warm-up and last-layer freeze, SwAV's
prototype freeze and queue start, a line-scoped LR with its warm-up), and the epoch those schedules read counts
the model's epochs over chunks of any size, so it never goes back (issue 21, items 5 and 6).

Each test trains a tiny line of 2 chunks with the real loop and reads what the steps used: the momentum and the
teacher temperature a step reports, the LR the loop set, and the weights before every step."""

from __future__ import annotations

import pytest
import torch

from tests.trainers.engine.test_loop import batches_of, data
from trainers.engine.loop import LineTrainer, LoopConfig
from trainers.schedules import WarmupCosine
from trainers.views.augment import AugmentConfig
from trainers.views.plan import ViewPlan

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is fastest, two thrash

GLOBAL = (AugmentConfig(size=16, blur_p=0.0), AugmentConfig(size=16, blur_p=0.0))
LOCAL = (AugmentConfig(size=8, scale=(0.05, 0.4), blur_p=0.0),)
BYOL = {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32, "base_momentum": 0.9, "final_momentum": 1.0}
DINO = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "clip_grad": 0.0}
SWAV = {"proj_hidden": 32, "proj_out": 16, "n_prototypes": 10}


def config(method: str, options: dict, strategy: str = "joint", **overrides) -> LoopConfig:
    local = LOCAL if method in ("dino", "swav") else ()
    base = dict(method=method, strategy=strategy, image_size=16, views=ViewPlan(GLOBAL, local), backbone_width=8,
                lr=0.05, epochs_per_chunk=2, batch_size=4, seed=3, log_every=1, method_options=options)
    base.update(overrides)
    return LoopConfig(**base)


class Recorder:
    """What every step of every model the trainer builds saw: passed as `wrap_model`, so a rebuilt model is
    recorded too. `watch(method)` names the weights to snapshot before each step."""

    def __init__(self, watch=lambda method: {}) -> None:
        self.watch = watch
        self.steps: list[dict] = []
        self.outputs: list = []

    def __call__(self, method: torch.nn.Module) -> torch.nn.Module:
        def before(module, args) -> None:
            ctx = args[2]
            self.steps.append({"chunk": ctx.chunk, "model": id(module),
                               **{k: v.detach().clone() for k, v in self.watch(module).items()}})

        def after(module, args, out) -> None:
            self.outputs.append(out)  # the engine adds the momentum to its terms after the forward
            self.steps[-1].update({f"after_{k}": v.detach().clone() for k, v in self.watch(module).items()})

        method.register_forward_pre_hook(before)
        method.register_forward_hook(after)
        return method

    def term(self, name: str) -> list[float]:
        return [out.terms[name].item() for out in self.outputs]

    def changed(self, name: str) -> list[bool]:
        """Per step: did the optimizer step move `name` (compared with the next step's snapshot of it)?"""
        moved = []
        for i, now in enumerate(self.steps):
            nxt = self.steps[i + 1] if i + 1 < len(self.steps) and self.steps[i + 1]["model"] == now["model"] else None
            if nxt is not None:
                moved.append(not torch.equal(now[name], nxt[name]))
        return moved


def train(trainer: LineTrainer, chunk_rows: list[int], steps_per_epoch: list[int], lrs: list | None = None) -> None:
    for chunk, (n, spe) in enumerate(zip(chunk_rows, steps_per_epoch, strict=True)):
        trainer.train_chunk(chunk, batches_of(data(n, seed=chunk), batch=4), spe,
                            on_step=(lambda info: lrs.append(info.lr)) if lrs is not None else None)


# ---------------------------------------------------------------------------------------------- item 5
def test_a_rebuilt_model_restarts_its_ema_momentum_at_base_momentum() -> None:
    recorder = Recorder()
    trainer = LineTrainer(config("byol", BYOL, line_steps=10), wrap_model=recorder)
    train(trainer, [12, 8], [3, 2])  # chunk 0: 6 steps, chunk 1: 4 steps (each from scratch, joint)
    momentum = recorder.term("momentum")
    method = trainer.method
    # Each model's momentum rises on BYOL's cosine over its own life (its chunk: the next chunk rebuilds it),
    # from base_momentum at its first step; the line's progress (0.995 at step 6 of 10) is not the model's.
    expected = [method.momentum_at(k / 6) for k in range(6)] + [method.momentum_at(k / 4) for k in range(4)]
    assert momentum == pytest.approx(expected, abs=1e-7)
    assert momentum[6] == pytest.approx(0.9)
    assert len({s["model"] for s in recorder.steps}) == 2


def test_without_a_reset_the_momentum_runs_over_the_whole_line() -> None:
    recorder = Recorder()
    trainer = LineTrainer(config("byol", BYOL, strategy="sequential", line_steps=10), wrap_model=recorder)
    train(trainer, [12, 8], [3, 2])
    assert recorder.term("momentum") == pytest.approx([trainer.method.momentum_at(k / 10) for k in range(10)],
                                                      abs=1e-7)


def test_a_rebuilt_dino_warms_its_teacher_temperature_and_freezes_its_last_layer_again() -> None:
    options = {**DINO, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 2,
               "freeze_last_layer": 1}
    recorder = Recorder(lambda m: {"last": m.head.last_layer.weight_v})
    trainer = LineTrainer(config("dino", options), wrap_model=recorder)
    train(trainer, [8, 12], [2, 3])  # chunk 0: epochs of 2 steps, chunk 1 (rebuilt): epochs of 3 steps
    temps = recorder.term("teacher_temp")
    assert temps == pytest.approx([0.04] * 2 + [0.07] * 2 + [0.04] * 3 + [0.07] * 3)
    # The last layer stays put through each model's first epoch, then learns.
    moved = recorder.changed("last")  # steps 0..2 of chunk 0, 0..4 of chunk 1 (the last step has no successor)
    assert moved == [False, False, True] + [False, False, False, True, True]


def test_a_rebuilt_swav_freezes_its_prototypes_and_delays_its_queue_again() -> None:
    options = {**SWAV, "freeze_prototypes_iters": 3, "queue_length": 64, "epoch_queue_starts": 1}
    recorder = Recorder(lambda m: {"prototypes": m.prototypes.weight, "filled": m.queue_filled})
    trainer = LineTrainer(config("swav", options), wrap_model=recorder)
    train(trainer, [8, 12], [2, 3])
    assert recorder.changed("prototypes") == [False, False, False] + [False, False, False, True, True]
    # The queue fills (4 rows a step) from each model's epoch 1: chunk 0's steps 2-3, chunk 1's steps 3-5.
    filled = [int(s["after_filled"]) for s in recorder.steps]
    assert filled == [0, 0, 4, 8] + [0, 0, 0, 4, 8, 12]


def test_a_rebuilt_model_restarts_a_line_scoped_lr_and_its_warm_up() -> None:
    lrs: list[float] = []
    trainer = LineTrainer(config("simclr", {"proj_hidden": 32, "proj_out": 16}, schedule="cosine_line",
                                 line_steps=10, line_warmup_steps=2, lr=0.1))
    train(trainer, [12, 8], [3, 2], lrs)
    expected = [WarmupCosine(0.1, 6, 2).lr(k) for k in range(6)] + [WarmupCosine(0.1, 4, 2).lr(k) for k in range(4)]
    assert lrs == pytest.approx(expected)
    assert lrs[6] == pytest.approx(0.05)  # warming up again


def test_a_checkpoint_without_the_model_clock_resumes_it() -> None:
    """Checkpoints written before the clock was kept: it is derived from the strategy's resets."""
    trainer = LineTrainer(config("simclr", {"proj_hidden": 32, "proj_out": 16}))
    train(trainer, [8], [2])
    trainer.start_chunk(1)
    trainer.position.update(epoch=1, step=3, epoch_step=1, line_step=7, model_epochs=1)  # in chunk 1's 2nd epoch
    state = trainer.state_dict()
    assert state["position"]["model_start"] == 4  # the rebuild's line step
    old = {k: v for k, v in state["position"].items() if not k.startswith("model_")}
    fresh = LineTrainer(config("simclr", {"proj_hidden": 32, "proj_out": 16}))
    fresh.load_state_dict({**state, "position": old})
    assert (fresh.position["model_start"], fresh.position["model_epochs"]) == (4, 1)
    sequential = LineTrainer(config("simclr", {"proj_hidden": 32, "proj_out": 16}, strategy="sequential"))
    sequential.load_state_dict({**state, "position": {**old, "chunk": -1, "chunks_done": 2, "epoch": 0}})
    assert (sequential.position["model_start"], sequential.position["model_epochs"]) == (0, 4)


# ---------------------------------------------------------------------------------------------- item 6
def test_the_epoch_never_goes_back_when_chunks_differ_in_size() -> None:
    # Chunk 0: 2 epochs of 1 step; chunk 1: 2 epochs of 3 steps. The line's epochs are 0, 1 | 2, 2, 2, 3, 3, 3;
    # step // (the current chunk's steps per epoch) gave 0, 1 | 0, 1, 1, 1, 2, 2.
    options = {**DINO, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 4,
               "freeze_last_layer": 3}
    recorder = Recorder(lambda m: {"last": m.head.last_layer.weight_v})
    trainer = LineTrainer(config("dino", options, strategy="sequential"), wrap_model=recorder)
    train(trainer, [4, 12], [1, 3])
    temps = recorder.term("teacher_temp")
    assert temps == pytest.approx([0.04, 0.05, 0.06, 0.06, 0.06, 0.07, 0.07, 0.07])
    assert all(a <= b for a, b in zip(temps, temps[1:]))
    # Frozen through epoch 2 (steps 0-4), trained from epoch 3 (step 5 on).
    assert recorder.changed("last") == [False] * 5 + [True, True]
    assert trainer.position["model_epochs"] == 4


def test_swav_queue_starts_at_the_lines_epoch_with_unequal_chunks() -> None:
    options = {**SWAV, "freeze_prototypes_iters": 0, "queue_length": 64, "epoch_queue_starts": 2}
    recorder = Recorder(lambda m: {"filled": m.queue_filled})
    trainer = LineTrainer(config("swav", options, strategy="sequential"), wrap_model=recorder)
    train(trainer, [4, 12], [1, 3])
    # Epoch 2 is chunk 1's first epoch: the queue fills from its first step.
    assert [int(s["after_filled"]) for s in recorder.steps] == [0, 0, 4, 8, 12, 16, 20, 24]
