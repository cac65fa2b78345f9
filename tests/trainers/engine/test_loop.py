"""The per-worker loop on plain tensors: schedules, strategies, exact resume, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.engine.checkpoint import CheckpointError, load_state, save_state
from trainers.engine.loop import LineTrainer, LoopConfig, learning_rate
from trainers.schedules import WarmupCosine
from trainers.views.augment import AugmentConfig


def config(**overrides) -> LoopConfig:
    base = dict(method="simclr", strategy="sequential", image_size=16,
                views=(AugmentConfig(size=16, blur_p=0.0), AugmentConfig(size=16, blur_p=0.0)),
                backbone_width=8, lr=0.05, epochs_per_chunk=2, batch_size=8, seed=3,
                method_options={"proj_hidden": 32, "proj_out": 16})
    base.update(overrides)
    return LoopConfig(**base)


def run_line(trainer: LineTrainer, chunks, batches, steps_per_epoch) -> None:
    """The chunks still to do (from `trainer.position`), as the runner drives them."""
    for chunk in chunks[trainer.position["chunks_done"]:]:
        trainer.train_chunk(chunk, lambda epoch, skip, c=chunk: batches(c, epoch, skip), steps_per_epoch(chunk))


def data(n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


def batches_of(images: torch.Tensor, batch: int = 8):
    """`batches(epoch, skip)` over `images`: a different, fixed order every epoch, from the `skip`-th batch on."""

    def batches(epoch: int, skip: int):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        starts = range(0, len(images) - batch + 1, batch)
        return (images[order[i : i + batch]] for i in list(starts)[skip:])

    return batches


class Interrupted(Exception):
    pass


def assert_same_weights(a: LineTrainer, b: LineTrainer) -> None:
    for (name, x), y in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs by {(x.float() - y.float()).abs().max().item()}"


def test_learning_rate_warmup_then_cosine() -> None:
    cfg = config(lr=1.0, warmup_epochs=1)
    values = [learning_rate(cfg, s, steps_total=20, steps_per_epoch=5) for s in range(20)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert values[5] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))
    assert all(a >= b for a, b in zip(values[5:], values[6:]))
    assert learning_rate(config(lr=0.3, schedule="constant"), 7, 20, 5) == 0.3


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        config(method="no_such_method")
    with pytest.raises(ValueError, match="precision"):
        config(precision="fp8")
    trainer = LineTrainer(config())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        trainer.train_chunk(0, batches_of(data()), steps_per_epoch=0)


def test_chunk_report_and_position() -> None:
    trainer = LineTrainer(config())
    steps = []
    report = trainer.train_chunk(0, batches_of(data()), steps_per_epoch=4, on_step=steps.append)
    assert report.steps == 8 and report.samples == 64 and len(report.losses) == 8
    assert all(math.isfinite(v) for v in report.losses)
    assert trainer.position == {"chunks_done": 1, "chunk": -1, "epoch": 0, "step": 0, "epoch_step": 0, "line_step": 8,
                                "model_start": 0, "model_epochs": 2}
    assert steps == []  # log_every (10) > 8 steps


def test_joint_resets_weights_and_sequential_keeps_them() -> None:
    images = data()
    for strategy, expect_reset in (("joint", True), ("sequential", False)):
        trainer = LineTrainer(config(strategy=strategy))
        initial = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
        trainer.train_chunk(0, batches_of(images), 4)
        trainer.start_chunk(1)
        after = trainer.backbone.state_dict()
        same = all(torch.equal(initial[k], after[k]) for k in initial)
        assert same is expect_reset, strategy


def test_checkpoint_resume_is_exact(tmp_path) -> None:
    """Stopping after chunk 0 and resuming from its checkpoint gives bit-identical weights after chunk 1."""
    images = [data(seed=1), data(seed=2)]
    reference = LineTrainer(config())
    run_line(reference, [0, 1], lambda c, e, skip: batches_of(images[c])(e, skip), lambda c: 4)

    first = LineTrainer(config())
    run_line(first, [0], lambda c, e, skip: batches_of(images[c])(e, skip), lambda c: 4)
    save_state(tmp_path, first.state_dict())
    resumed = LineTrainer(config())
    resumed.load_state_dict(load_state(tmp_path))
    assert resumed.position["chunks_done"] == 1
    run_line(resumed, [0, 1], lambda c, e, skip: batches_of(images[c])(e, skip), lambda c: 4)
    for (name, a), b in zip(reference.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stop_at", [3, 6])  # inside epoch 0 and inside epoch 1 (4 steps per epoch)
def test_resume_inside_a_chunk_is_exact(tmp_path, stop_at: int) -> None:
    """Killed right after an in-chunk checkpoint, then resumed from it: the weights equal an uninterrupted chunk's
    bit for bit (the resumed epoch continues with its unseen batches, not its first ones again)."""
    images = data()
    reference = LineTrainer(config(checkpoint_every_steps=3))
    reference.train_chunk(0, batches_of(images), 4, on_checkpoint=lambda: None)

    interrupted = LineTrainer(config(checkpoint_every_steps=3))

    def checkpoint_then_die() -> None:
        save_state(tmp_path, interrupted.state_dict())
        if interrupted.position["step"] == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        interrupted.train_chunk(0, batches_of(images), 4, on_checkpoint=checkpoint_then_die)
    state = load_state(tmp_path)
    assert state["position"] == {"chunks_done": 0, "chunk": 0, "epoch": stop_at // 4, "step": stop_at,
                                 "epoch_step": stop_at % 4, "line_step": stop_at, "model_start": 0,
                                 "model_epochs": stop_at // 4}
    resumed = LineTrainer(config(checkpoint_every_steps=3))
    resumed.load_state_dict(state)
    report = resumed.train_chunk(0, batches_of(images), 4)
    assert report.steps == 8 - stop_at and report.first_step == stop_at
    assert_same_weights(reference, resumed)


def test_short_epochs_end_when_batches_run_out_and_resume_exactly(tmp_path) -> None:
    """An epoch with fewer batches than planned (rows dropped as corrupt) ends when they run out; a resume inside
    the next epoch continues at its own position instead of a negative or oversized offset."""
    images = data(n=24)  # 3 batches per epoch, though 4 are planned

    def run(trainer: LineTrainer, on_checkpoint=None):
        return trainer.train_chunk(0, batches_of(images), 4, on_checkpoint=on_checkpoint)

    reference = LineTrainer(config(checkpoint_every_steps=4))
    report = run(reference, on_checkpoint=lambda: None)
    assert report.steps == 6 and report.samples == 48

    interrupted = LineTrainer(config(checkpoint_every_steps=4))

    def checkpoint_then_die() -> None:  # step 4 = the first step of epoch 1
        save_state(tmp_path, interrupted.state_dict())
        raise Interrupted

    with pytest.raises(Interrupted):
        run(interrupted, on_checkpoint=checkpoint_then_die)
    state = load_state(tmp_path)
    assert state["position"] == {"chunks_done": 0, "chunk": 0, "epoch": 1, "step": 4, "epoch_step": 1, "line_step": 4,
                                 "model_start": 0, "model_epochs": 1}
    resumed = LineTrainer(config())
    resumed.load_state_dict(state)
    assert run(resumed).steps == 2
    assert_same_weights(reference, resumed)


def test_broken_checkpoints_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no state.pt"):
        load_state(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="too short"):
        load_state(tmp_path)
    # A complete save, then copies of it cut short (an upload killed midway) or with one byte flipped.
    good = tmp_path / "good"
    save_state(good, {"w": torch.arange(10_000)})
    full = (good / "state.pt").read_bytes()
    for name, content, error in [("partial", full[:-100], "no streamssl footer"),
                                 ("flipped", full[:50] + bytes([full[50] ^ 1]) + full[51:], "sha256")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(content)
        with pytest.raises(CheckpointError, match=error):
            load_state(tmp_path / name)
    assert torch.equal(load_state(good)["w"], torch.arange(10_000))
    assert not list(good.glob(".state-*"))


def test_byol_line_trains_and_moves_its_target() -> None:
    trainer = LineTrainer(config(method="byol", method_options={"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32}))
    before = [p.clone() for p in trainer.method.target_backbone.parameters()]
    report = trainer.train_chunk(0, batches_of(data()), 4)
    assert report.steps == 8
    moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.method.target_backbone.parameters()))
    assert moved


def test_lars_line_schedule_spans_chunks_and_resumes_exactly(tmp_path) -> None:
    """`cosine_line`: one warm-up + cosine over the line's 16 steps (chunk 1 does not restart it), at the linearly
    scaled peak; with LARS, dying inside chunk 1 and resuming gives the straight run's weights bit for bit."""
    cfg = config(optimizer="lars", lr=0.4, lr_scaling="linear", global_batch=16, schedule="cosine_line",
                 line_steps=16, line_warmup_steps=3, log_every=1, checkpoint_every_steps=3)
    expected = [WarmupCosine(0.4 * 16 / 256, 16, 3).lr(s) for s in range(16)]
    images = [data(seed=1), data(seed=2)]
    reference, lrs = LineTrainer(cfg), []
    for chunk in (0, 1):
        reference.train_chunk(chunk, batches_of(images[chunk]), 4, on_step=lambda info: lrs.append(info.lr))
    assert lrs == pytest.approx(expected)
    assert expected[3] == pytest.approx(0.025) and lrs[8] < lrs[7]  # the peak at step 3, still decaying at 8
    assert reference.position["line_step"] == 16

    interrupted = LineTrainer(cfg)
    interrupted.train_chunk(0, batches_of(images[0]), 4)

    def checkpoint_then_die() -> None:
        save_state(tmp_path, interrupted.state_dict())
        raise Interrupted

    with pytest.raises(Interrupted):
        interrupted.train_chunk(1, batches_of(images[1]), 4, on_checkpoint=checkpoint_then_die)
    resumed, resumed_lrs = LineTrainer(cfg), []
    resumed.load_state_dict(load_state(tmp_path))
    assert resumed.position["line_step"] == 11
    resumed.train_chunk(1, batches_of(images[1]), 4, on_step=lambda info: resumed_lrs.append(info.lr))
    assert resumed_lrs == pytest.approx(expected[11:])
    assert_same_weights(reference, resumed)


def test_cosine_line_needs_the_lines_length() -> None:
    trainer = LineTrainer(config(schedule="cosine_line"))
    with pytest.raises(ValueError, match="line_steps"):
        trainer.train_chunk(0, batches_of(data()), 4)
    with pytest.raises(ValueError, match="schedule"):
        config(schedule="step")
    with pytest.raises(ValueError, match="lr_scaling"):
        config(lr_scaling="sqrt")


def test_a_methods_own_groups_are_used_and_fixed_lr_is_kept(monkeypatch) -> None:
    """A method's `param_groups(weight_decay)` replaces the default split; the schedule skips `fixed_lr` groups."""
    from trainers.methods.simclr import SimCLR

    def groups(self, weight_decay):
        return [{"params": list(self.backbone.parameters()), "weight_decay": weight_decay},
                {"params": list(self.projector.parameters()), "weight_decay": 0.0, "fixed_lr": True, "lr": 0.0123}]

    monkeypatch.setattr(SimCLR, "param_groups", groups, raising=False)
    cfg = config(warmup_epochs=1, log_every=1)
    trainer = LineTrainer(cfg)
    assert len(trainer.optimizer.param_groups) == 2
    lrs = []
    trainer.train_chunk(0, batches_of(data()), 4, on_step=lambda info: lrs.append(info.lr))
    assert lrs == pytest.approx([learning_rate(cfg, s, 8, 4) for s in range(8)])
    assert lrs[0] == pytest.approx(0.05 / 4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    assert trainer.optimizer.param_groups[1]["lr"] == 0.0123


def test_default_groups_keep_weight_decay_off_batch_norm() -> None:
    trainer = LineTrainer(config(weight_decay=0.1))
    decay, no_decay = trainer.optimizer.param_groups
    bn_ids = {id(p) for m in trainer.method.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
              for p in m.parameters()}
    assert bn_ids and bn_ids <= {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_a_loss_that_turns_nan_stops_the_chunk_naming_method_step_and_lr(tmp_path) -> None:
    """An LR far too high blows the weights up: the chunk stops with a message naming the method, the step and the
    LR, before the checkpoint after the bad step is written, so the newest checkpoint holds finite weights."""
    from trainers.engine.step import NonFiniteLossError

    trainer = LineTrainer(config(lr=1e12, optimizer="sgd", checkpoint_every_steps=1, log_every=1,
                                 schedule="constant", epochs_per_chunk=4))
    saved: list[int] = []

    def checkpoint() -> None:
        save_state(tmp_path, trainer.state_dict())
        saved.append(trainer.position["step"])

    with pytest.raises(NonFiniteLossError, match=r"simclr: the loss became (nan|inf) at step \d+ of chunk 0 "
                                                 r"\(lr 1e\+12\).*newest checkpoint is the last good one"):
        trainer.train_chunk(0, batches_of(data()), 4, on_step=lambda info: None, on_checkpoint=checkpoint)
    state = load_state(tmp_path)
    assert saved and state["position"]["step"] == saved[-1]
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_epoch_end_callbacks_come_after_every_epoch_but_the_last_and_resume_from_them(tmp_path) -> None:
    """`on_epoch_end` (eval.every_epochs) sees each finished epoch but the chunk's last; a state saved there resumes
    at the next epoch and ends with the uninterrupted chunk's weights."""
    images = data()
    reference = LineTrainer(config(epochs_per_chunk=3))
    seen: list[tuple[int, dict]] = []
    reference.train_chunk(0, batches_of(images), 4, on_epoch_end=lambda done: seen.append((done, dict(reference.position))))
    assert [done for done, _ in seen] == [1, 2]
    assert seen[0][1] == {"chunks_done": 0, "chunk": 0, "epoch": 1, "step": 4, "epoch_step": 0, "line_step": 4,
                          "model_start": 0, "model_epochs": 1}

    first = LineTrainer(config(epochs_per_chunk=3))

    def save_then_die(done: int) -> None:
        save_state(tmp_path, first.state_dict())
        raise Interrupted

    with pytest.raises(Interrupted):
        first.train_chunk(0, batches_of(images), 4, on_epoch_end=save_then_die)
    resumed = LineTrainer(config(epochs_per_chunk=3))
    resumed.load_state_dict(load_state(tmp_path))
    later: list[int] = []
    report = resumed.train_chunk(0, batches_of(images), 4, on_epoch_end=later.append)
    assert later == [2] and report.first_step == 4 and report.steps == 8
    assert_same_weights(reference, resumed)
