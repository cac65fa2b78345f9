"""CaSSLe: a frozen copy of the last chunk's model, a predictor into its embedding space, the method's own loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import trainers.engine.loop as loop_module
from tests.trainers.ddp_harness import run_ddp
from tests.trainers.engine.test_loop import Interrupted, assert_same_weights, batches_of, config, data
from tests.trainers.method_helpers import SMALL_OPTIONS, forward, tiny_backbone, view_set
from trainers.engine.checkpoint import load_state, save_state
from trainers.engine.loop import LineTrainer
from trainers.engine.types import Batch, StepContext, StepOutput
from trainers.methods import BYOL, SimCLR
from trainers.registry import METHOD_REGISTRY
from trainers.strategies import CaSSLe, ChunkEnd
from trainers.strategies.cassle import contrastive_distill_loss

OPTIONS = {"cassle": {"hidden": 16, "lambd": 1.0}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
CTX = StepContext(step=0, total_steps=None, chunk=1)


def cassle_trainer(**overrides) -> LineTrainer:
    overrides = {"strategy": "sequential+cassle", "strategy_options": OPTIONS, "epochs_per_chunk": 1, **overrides}
    return LineTrainer(config(**overrides))


def cassle_of(trainer: LineTrainer) -> CaSSLe:
    return trainer.strategy.strategies[1]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def record_terms(monkeypatch) -> list[dict[str, float]]:
    """The terms of every step the loop takes (the real train_step, observed)."""
    seen: list[dict[str, float]] = []
    real = loop_module.train_step

    def observed(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append({k: float(v) for k, v in out.terms.items()})
        return out

    monkeypatch.setattr(loop_module, "train_step", observed)
    return seen


def chunk_end(method: torch.nn.Module, chunk: int = 0) -> ChunkEnd:
    return ChunkEnd(method=method, chunk=chunk, batches=lambda: iter(()), device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ the loop
def test_the_frozen_copy_is_the_last_chunks_model_and_stays_fixed_while_the_model_moves() -> None:
    trainer = cassle_trainer(log_every=1)
    trainer.train_chunk(0, batches_of(data(seed=1)), 3)
    cassle = cassle_of(trainer)
    end_of_0 = snapshot(trainer.method.embedder())
    assert cassle.frozen_chunk == 0 and same(snapshot(cassle.frozen), end_of_0)
    steps: list[tuple[dict, dict]] = []
    trainer.train_chunk(1, batches_of(data(seed=2)), 3,
                        on_step=lambda info: steps.append((snapshot(cassle.frozen), snapshot(trainer.method.embedder()))))
    assert len(steps) == 3
    assert all(same(frozen, end_of_0) for frozen, _ in steps)  # bit for bit after every step of chunk 1
    moved = [k for k, v in steps[-1][1].items() if v.is_floating_point() and not torch.equal(v, end_of_0[k])]
    assert len(moved) > 10  # the model itself trained
    assert cassle.frozen.training  # batch statistics, as the reference; its running ones never moved
    assert all(not p.requires_grad and p.grad is None for p in cassle.frozen.parameters())
    # At chunk 1's end the copy becomes chunk 1's model.
    assert cassle.frozen_chunk == 1 and same(snapshot(cassle.frozen), snapshot(trainer.method.embedder()))


def test_chunk_0_trains_as_plain_sequential_and_chunk_1_adds_the_distillation(monkeypatch) -> None:
    terms = record_terms(monkeypatch)
    plain, aided = LineTrainer(config(epochs_per_chunk=1)), cassle_trainer()
    untrained_predictor = snapshot(cassle_of(aided).predictor)
    first, second = data(seed=1), data(seed=2)
    plain_0, aided_0 = plain.train_chunk(0, batches_of(first), 3), aided.train_chunk(0, batches_of(first), 3)
    assert aided_0.losses == plain_0.losses and all("cassle_distill" not in t for t in terms)
    assert_same_weights(plain, aided)
    # Nothing reached the predictor in chunk 0 (no gradient: no weight decay or momentum either).
    assert same(snapshot(cassle_of(aided).predictor), untrained_predictor)
    del terms[:]
    plain_1 = plain.train_chunk(1, batches_of(second), 3)
    aided_1 = aided.train_chunk(1, batches_of(second), 3)
    distill = [t["cassle_distill"] for t in terms[3:]]
    assert len(distill) == 3 and all(math.isfinite(d) and d > 0 for d in distill)
    # Step 1 of chunk 1: the same model, batch and views, so the loss is the plain one plus the term.
    assert aided_1.losses[0] == pytest.approx(plain_1.losses[0] + distill[0], rel=1e-5)
    assert not same(snapshot(cassle_of(aided).predictor), untrained_predictor)  # and g trained


def test_a_line_with_cassle_resumes_inside_a_chunk_bit_for_bit(tmp_path) -> None:
    chunks = [data(seed=1), data(seed=2)]
    make = lambda: cassle_trainer(checkpoint_every_steps=2)  # noqa: E731
    reference = make()
    for c in (0, 1):
        reference.train_chunk(c, batches_of(chunks[c]), 4, on_checkpoint=lambda: None)

    interrupted = make()
    interrupted.train_chunk(0, batches_of(chunks[0]), 4, on_checkpoint=lambda: None)

    def checkpoint_then_die() -> None:
        save_state(tmp_path, interrupted.state_dict())
        if interrupted.position["step"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        interrupted.train_chunk(1, batches_of(chunks[1]), 4, on_checkpoint=checkpoint_then_die)
    state = load_state(tmp_path)
    # The frozen copy and the predictor are stored once, beside the method; the strategy state is a flag.
    assert any(k.startswith("cassle.frozen.") for k in state["strategy_modules"])
    assert any(k.startswith("cassle.predictor.") for k in state["strategy_modules"])
    assert state["strategy"] == [{"sequential": {}, "cassle": {"frozen_chunk": 0}}]
    resumed = make()
    resumed.load_state_dict(state)
    resumed.train_chunk(1, batches_of(chunks[1]), 4)
    assert_same_weights(reference, resumed)
    assert same(snapshot(resumed.strategy_modules), snapshot(reference.strategy_modules))  # predictor and copy
    assert cassle_of(resumed).frozen_chunk == 1


def _labelled(images: torch.Tensor):
    def batches(epoch: int, skip: int):
        for batch in batches_of(images)(epoch, skip):
            yield Batch.from_images(batch, labels=batch[:, 0, 0, 0].long() % 4)
    return batches


def test_supervised_with_cassle_distils_the_features(monkeypatch) -> None:
    terms = record_terms(monkeypatch)
    trainer = cassle_trainer(method="supervised", method_options={"num_classes": 4})
    cassle = cassle_of(trainer)
    assert cassle.predictor.net[0].in_features == trainer.backbone.out_dim  # g maps features to features
    trainer.train_chunk(0, _labelled(data(seed=1)), 3)
    before = snapshot(cassle.predictor)
    report = trainer.train_chunk(1, _labelled(data(seed=2)), 3)
    distill = [t["cassle_distill"] for t in terms[3:]]
    # Negative cosine: in [-1, 1], and g starts far from the frozen features.
    assert len(distill) == 3 and all(-1 <= d <= 1 for d in distill)
    assert all(math.isfinite(loss) for loss in report.losses)
    assert not same(snapshot(cassle.predictor), before)


def test_joint_with_cassle_is_refused() -> None:
    with pytest.raises(ValueError, match=r"joint\+cassle: cassle needs the base sequential, not joint"):
        LineTrainer(config(strategy="joint+cassle"))


# ------------------------------------------------------------------------------------------------ the loss
def nt_xent_by_hand(p: torch.Tensor, z: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's loss over the 2B rows [p; z], each row's positive the other half's row of the same image."""
    rows = F.normalize(torch.cat([p, z]), dim=1)
    b, terms = len(p), []
    for i in range(2 * b):
        positive = (i + b) % (2 * b)
        sims = [rows[i] @ rows[k] / t for k in range(2 * b) if k != i]
        terms.append(-(rows[i] @ rows[positive] / t) + torch.logsumexp(torch.stack(sims), dim=0))
    return torch.stack(terms).mean()


def byol_by_hand(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    cos = (p * z).sum(dim=1) / (p.norm(dim=1) * z.norm(dim=1))
    return (2 - 2 * cos).mean()


def test_simclr_and_byol_distill_with_their_own_loss() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    simclr = SimCLR(tiny_backbone(), proj_hidden=8, proj_out=7, temperature=0.3)
    assert simclr.distill_loss(p, z).item() == pytest.approx(nt_xent_by_hand(p, z, 0.3).item(), rel=1e-5)
    byol = BYOL(tiny_backbone(), proj_hidden=8, proj_out=7, pred_hidden=8)
    assert byol.distill_loss(p, z).item() == pytest.approx(byol_by_hand(p, z).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_the_term_is_lambda_times_the_view_mean_of_the_loss_between_g_of_now_and_the_past(name: str) -> None:
    """With the per-view form (contrastive: method) and the running statistics (frozen_bn: running)."""
    torch.manual_seed(0)
    method = METHOD_REGISTRY[name].build(tiny_backbone(), **SMALL_OPTIONS[name])
    cassle = CaSSLe(lambd=2.5, hidden=8, frozen_bn="running", contrastive="method")
    cassle.modules(method, lambda module: module)
    past = copy.deepcopy(method).eval()
    cassle.on_chunk_end(chunk_end(method))
    with torch.no_grad():  # the model moves on from the frozen one
        for param in method.parameters():
            param.add_(0.05 * torch.randn_like(param))
    views = view_set(b=6)
    out = forward(method, views)
    term = cassle.extra_loss(method, out, views, None, CTX)["cassle_distill"]
    by_hand = nt_xent_by_hand if name == "simclr" else lambda p, z, t: byol_by_hand(p, z)
    with torch.no_grad():
        expected = 2.5 * torch.stack([
            by_hand(cassle.predictor.net(out.embeddings[v]), past.projector(past.backbone(views.global_[v])),
                    SMALL_OPTIONS["simclr"]["temperature"])
            for v in range(2)]).mean()
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    term.backward()  # the gradient reaches the predictor and the model, never the frozen copy
    assert cassle.predictor.net[0].weight.grad.abs().sum() > 0
    assert method.backbone.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cassle.frozen.parameters())


@pytest.mark.parametrize("name", METHOD_REGISTRY.names)
def test_every_method_reports_its_embeddings_and_its_distill_loss_rewards_a_match(name: str) -> None:
    record = METHOD_REGISTRY[name]
    torch.manual_seed(0)
    method = record.build(tiny_backbone(method=name), **SMALL_OPTIONS[name]).eval()  # eval: BN per row, views comparable
    views = view_set(b=8, local_count=2 if record.needs_local_views else 0)
    out = forward(method, views, torch.arange(8) % 4 if record.needs_labels else None)
    assert 1 <= len(out.embeddings) <= len(views.global_)
    embedder = method.embedder()
    with torch.no_grad():
        for view, z in zip(views.global_, out.embeddings):
            assert z.shape == (8, method.embedding_dim) and z.requires_grad
            assert torch.allclose(z, embedder(view), atol=1e-5)
    z = out.embeddings[0].detach()
    elsewhere = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    match, miss = method.distill_loss(z.clone().requires_grad_(), z), method.distill_loss(elsewhere, z)
    assert match.dim() == 0 and match.item() < miss.item()
    match.backward()  # differentiable in the prediction


def test_the_predictor_learns_the_map_into_the_frozen_space() -> None:
    torch.manual_seed(0)
    method = BYOL(tiny_backbone(), **SMALL_OPTIONS["byol"])
    cassle = CaSSLe(hidden=32)
    cassle.modules(method, lambda module: module)
    cassle.on_chunk_end(chunk_end(method))
    with torch.no_grad():
        for param in method.parameters():
            param.add_(0.1 * torch.randn_like(param))
    method.eval()
    views = view_set(b=8)
    with torch.no_grad():  # a fixed batch: only g learns
        fixed = StepOutput(torch.zeros(()), torch.zeros(8), embeddings=forward(method, views).embeddings)
    optimizer = torch.optim.SGD(cassle.predictor.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(25):
        term = cassle.extra_loss(method, fixed, views, None, CTX)["cassle_distill"]
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
        losses.append(term.item())
    assert losses[-1] < 0.25 * losses[0], losses  # measured: 1.44 -> 0.023 in 25 steps


# ------------------------------------------------------------------------------------------------ as the reference
def reference_contrastive_distill(p1, p2, z1, z2, t: float) -> torch.Tensor:
    """The reference code's contrastive distiller (cassle/distillers/contrastive.py with losses/simclr.py's
    simclr_distill_loss_func), re-derived row by row: rows [p1; p2] against columns [z1; z2], the positive of row i
    column i, every column in the denominator (its logit mask is all ones), the mean over rows; then the same with
    the roles swapped; the two averaged."""
    def one_way(a1, a2, b1, b2):
        rows, cols = F.normalize(torch.cat([a1, a2]), dim=1), F.normalize(torch.cat([b1, b2]), dim=1)
        terms = []
        for i in range(len(rows)):
            logits = torch.stack([rows[i] @ cols[j] / t for j in range(len(cols))])
            terms.append(torch.logsumexp(logits, dim=0) - logits[i])
        return torch.stack(terms).mean()

    return (one_way(p1, p2, z1, z2) + one_way(z1, z2, p1, p2)) / 2


def test_the_contrastive_distillation_is_the_references_without_prediction_prediction_negatives() -> None:
    g = torch.Generator().manual_seed(0)  # two views of 6 images; the frozen embeddings near the predictions
    p1 = torch.randn(6, 8, generator=g)
    z1 = p1 + 0.5 * torch.randn(6, 8, generator=g)
    p2 = p1 + 0.3 * torch.randn(6, 8, generator=g)
    z2 = p2 + 0.5 * torch.randn(6, 8, generator=g)
    ours = contrastive_distill_loss([p1, p2], [z1, z2], 0.2)
    reference = reference_contrastive_distill(p1, p2, z1, z2, 0.2)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    # What it replaced: the method's NT-Xent per view, whose denominators also hold the other predictions.
    before = (nt_xent_by_hand(p1, z1, 0.2) + nt_xent_by_hand(p2, z2, 0.2)) / 2
    assert reference.item() == pytest.approx(0.9237, abs=1e-4) and before.item() == pytest.approx(0.4362, abs=1e-4)
    p = [p1.clone().requires_grad_(), p2.clone().requires_grad_()]
    contrastive_distill_loss(p, [z1, z2], 0.2).backward()
    q = [p1.clone().requires_grad_(), p2.clone().requires_grad_()]
    reference_contrastive_distill(q[0], q[1], z1, z2, 0.2).backward()
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(p, q))


def frozen_embedding(past: torch.nn.Module, view: torch.Tensor) -> torch.Tensor:
    """The past model's projection of `view` in train mode (batch BN statistics) on a throwaway copy."""
    model = copy.deepcopy(past).train()
    return model.projector(model.backbone(view))


@pytest.mark.parametrize("name", ["simclr", "moco_v2"])
def test_by_default_cassle_distils_every_view_as_the_reference(name: str) -> None:
    """SimCLR and asymmetric MoCo-v2 (which embeds only its query view): the term is lambd x the reference's
    contrastive distillation of both global views, at t 0.2, the frozen model normalising with the batch's BN
    statistics (train mode, as the reference's Lightning submodule), its running statistics untouched."""
    torch.manual_seed(0)
    options = SMALL_OPTIONS.get(name, {"proj_hidden": 32, "proj_out": 16, "queue_size": 16})
    method = METHOD_REGISTRY[name].build(tiny_backbone(), **options)
    cassle = CaSSLe(lambd=2.5, hidden=8)
    cassle.modules(method, lambda module: module)
    past = copy.deepcopy(method)
    cassle.on_chunk_end(chunk_end(method))
    with torch.no_grad():
        for param in method.parameters():
            param.add_(0.05 * torch.randn_like(param))
    views = view_set(b=6)
    out = forward(method, views)
    assert len(out.embeddings) == (1 if name == "moco_v2" else 2)
    frozen_buffers = {k: v.clone() for k, v in cassle.frozen.named_buffers()}
    term = cassle.extra_loss(method, out, views, None, CTX)["cassle_distill"]
    assert cassle.frozen.training
    assert all(torch.equal(v, frozen_buffers[k]) for k, v in cassle.frozen.named_buffers())
    with torch.no_grad():
        z = [method.projector(method.backbone(v)) for v in views.global_]  # the current model, both views
        p1, p2 = cassle.predictor([z[0], z[1]])
        target = [frozen_embedding(past, v) for v in views.global_]
        expected = 2.5 * reference_contrastive_distill(p1, p2, *target, 0.2)
        running = copy.deepcopy(past).eval()
        eval_mode = 2.5 * reference_contrastive_distill(p1, p2, *(running.projector(running.backbone(v))
                                                                  for v in views.global_), 0.2)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(term.item() - eval_mode.item()) > 1e-3  # the BN mode shows in the number
    term.backward()
    assert method.backbone.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cassle.frozen.parameters())


def test_the_frozen_models_bn_can_use_the_running_statistics() -> None:
    torch.manual_seed(0)
    method = BYOL(tiny_backbone(), **SMALL_OPTIONS["byol"])
    views = view_set(b=6)
    terms = {}
    for mode in ("batch", "running"):
        cassle = CaSSLe(hidden=8, frozen_bn=mode)
        torch.manual_seed(1)
        cassle.modules(method, lambda module: module)
        cassle.on_chunk_end(chunk_end(method))
        assert cassle.frozen.training == (mode == "batch")
        past = copy.deepcopy(method).train(mode == "batch")  # before the step moves the running statistics
        out = forward(method, views)
        terms[mode] = cassle.extra_loss(method, out, views, None, CTX)["cassle_distill"].item()
        with torch.no_grad():
            p = cassle.predictor(out.embeddings)
            z = [past.projector(past.backbone(v)) for v in views.global_]
        assert terms[mode] == pytest.approx(torch.stack([byol_by_hand(a, b) for a, b in zip(p, z)]).mean().item(),
                                            rel=1e-5)
    assert terms["batch"] != pytest.approx(terms["running"], rel=1e-3)


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int) -> dict:
    trainer = LineTrainer(config(strategy="sequential+cassle", strategy_options=OPTIONS, epochs_per_chunk=1),
                          wrap_model=DistributedDataParallel, rank=rank)
    cassle = cassle_of(trainer)
    initial = snapshot(cassle.predictor)
    trainer.train_chunk(0, batches_of(data(n=24, seed=10 + rank)), 3)  # each rank its own rows
    after_0 = snapshot(cassle.predictor)
    trainer.train_chunk(1, batches_of(data(n=24, seed=20 + rank)), 3)
    strategy_states = trainer.rank_states()["strategy"]  # a collective: both ranks call it
    return {"initial": initial, "after_0": after_0,
            "predictor": {k: v.detach().clone() for k, v in cassle.predictor.named_parameters()},
            "frozen": snapshot(cassle.frozen),
            "model": {k: v.detach().clone() for k, v in trainer.method.named_parameters()},
            "strategy_states": strategy_states}


def test_under_ddp_the_predictor_and_the_frozen_copy_stay_identical_across_ranks() -> None:
    ranks = run_ddp(_ddp_worker)
    for r in ranks:
        assert same(r["after_0"], r["initial"])  # chunk 0: no distillation, the predictor idle
        assert not same({k: r["predictor"][k] for k in r["predictor"]},
                        {k: r["initial"][k] for k in r["predictor"]})  # chunk 1: it trained
    assert same(ranks[0]["predictor"], ranks[1]["predictor"])  # its gradients were averaged over the ranks
    assert same(ranks[0]["frozen"], ranks[1]["frozen"])  # rank 0's model, buffers included
    assert same(ranks[0]["model"], ranks[1]["model"])
    # What the checkpoint gathers from the ranks holds no weights: they are saved once, with the method's.
    assert ranks[0]["strategy_states"] == [{"sequential": {}, "cassle": {"frozen_chunk": 1}}] * 2
