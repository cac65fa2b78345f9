"""US3L: width sampling, the distillation losses by hand, the ablation as options, group regularisation, collapse,
the registry pairing, a short run of the whole sandwich, and DDP equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.trainers.ddp_harness import rows, run_ddp
from tests.trainers.method_helpers import context, forward, step, view_set
from trainers.backbones import build_backbone
from trainers.engine.collapse import (
    RepresentationCollapseError,
    check_collapse,
    collapse_threshold,
    normalised_feature_std,
)
from trainers.engine.loop import LoopConfig
from trainers.engine.step import NonFiniteLossError
from trainers.engine.types import Batch, ViewSet
from trainers.methods.us3l import PRESETS, US3L, US3LConfig, cross_view_loss, sample_widths, sampling_range
from trainers.optim import build_optimizer
from trainers.registry import METHOD_REGISTRY, check_backbone_for_method
from trainers.views.plan import view_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 16}


def _method(**options) -> US3L:
    torch.manual_seed(0)
    return US3L(build_backbone("slimmable_resnet18", image_size=16, width=4), **{**SMALL, **options})


# ---------------------------------------------------------------- width sampling
def test_dynamic_sampling_hands_out_the_configured_ranges_at_the_switch_points() -> None:
    cfg = US3LConfig()
    expected = {0.0: 1.0, 0.24: 1.0, 0.25: 0.75, 0.49: 0.75, 0.5: 0.5, 0.74: 0.5, 0.75: 0.25, 1.0: 0.25}
    for progress, low in expected.items():
        assert sampling_range(cfg, progress) == (low, 1.0), progress
    assert sample_widths(cfg, 7, 0.1) == [1.0]  # first stage: the base network alone
    for step_ in range(20):
        widths = sample_widths(cfg, step_, 0.6)
        assert len(widths) == 3 and widths[0] == 1.0 and widths[-1] == 0.5 and 0.5 <= widths[1] <= 1.0
        assert widths == sample_widths(cfg, step_, 0.6)  # seeded by the step: every rank draws the same
    assert sample_widths(cfg, 3, 0.6) != sample_widths(cfg, 4, 0.6)
    assert sampling_range(cfg, None) == (0.25, 1.0)  # unbounded stream: the last stage

    custom = US3LConfig(sampling_switch_points=[0.1, 0.6], sampling_min_widths=[0.9, 0.5, 0.3], min_width=0.3,
                        num_random_widths=3)
    assert [sampling_range(custom, p)[0] for p in (0.0, 0.1, 0.59, 0.6, 0.99)] == [0.9, 0.5, 0.5, 0.3, 0.3]
    widths = sample_widths(custom, 11, 0.7)
    assert len(widths) == 5 and widths == sorted(widths, reverse=True) and widths[-1] == 0.3
    static = US3LConfig(dynamic_sampling=False)
    assert sampling_range(static, 0.0) == (0.25, 1.0)


def test_sampling_options_are_validated_with_names() -> None:
    with pytest.raises(ValueError, match="sampling_min_widths needs one width more"):
        US3LConfig.parse("us3l", sampling_switch_points=[0.5])
    with pytest.raises(ValueError, match="sampling_switch_points must rise"):
        US3LConfig.parse("us3l", sampling_switch_points=[0.5, 0.4, 0.9])
    with pytest.raises(ValueError, match="distill_loss"):
        US3LConfig.parse("us3l", distill_loss="kl")


# ---------------------------------------------------------------- the losses, by hand
def test_infonce_distillation_against_an_identical_teacher_is_the_formula() -> None:
    """Two images, two views, 2-d outputs; the teacher's outputs are the students' own.

    Case 1: both views map image 0 to e1 and image 1 to e2. Student view 1 row 0 (e1) is contrasted (NT-Xent with
    the teacher's view 2 as the second view) against {teacher view 2: e1 (positive), e2; student view 1: e2}:
    l = -log(e^{1/t} / (e^{1/t} + e^0 + e^0)) = log(1 + 2 e^{-1/t}); every anchor and both view pairs alike.
    Case 2: view 2 swaps the images (image 0 -> e2, image 1 -> e1): the positive has similarity 0, the other
    teacher row 1, the other student row 0: l = log(2 + e^{1/t}).
    """
    t = 0.5
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    aligned = [torch.stack([e1, e2]), torch.stack([e1, e2])]
    loss = cross_view_loss(aligned, [v.clone() for v in aligned], "infonce", t)
    assert loss.tolist() == pytest.approx([math.log(1 + 2 * math.exp(-2))] * 2, rel=1e-6)
    swapped = [torch.stack([e1, e2]), torch.stack([e2, e1])]
    loss = cross_view_loss(swapped, [v.clone() for v in swapped], "infonce", t)
    assert loss.tolist() == pytest.approx([math.log(2 + math.exp(2))] * 2, rel=1e-6)


def test_mse_distillation_is_two_minus_twice_the_cosine() -> None:
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 3.0]])]
    targets = [torch.tensor([[0.0, 2.0]]), torch.tensor([[5.0, 0.0]])]
    # student view 1 vs target view 2: cos(e1, e1) = 1 -> 0; student view 2 vs target view 1: cos = 1/sqrt 2.
    expected = (0.0 + (2 - 2 / math.sqrt(2))) / 2
    assert cross_view_loss(s, targets, "mse", 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_no_gradient_reaches_the_targets() -> None:
    s = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    targets = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    cross_view_loss(s, targets, "infonce", 0.2).mean().backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in targets)


# ---------------------------------------------------------------- the method
def test_registry_refuses_us3l_on_a_plain_backbone_naming_the_field() -> None:
    assert METHOD_REGISTRY["us3l"].slimmable
    with pytest.raises(ValueError, match=r"backbone.name: method 'us3l' .* slimmable backbone .*got 'resnet18'"):
        check_backbone_for_method("us3l", "resnet18")
    check_backbone_for_method("us3l", "slimmable_vit_tiny")
    with pytest.raises(ValueError, match="backbone.name: us3l .* slimmable backbone"):
        US3L(build_backbone("resnet18", image_size=16, width=4), **SMALL)
    plan = view_plan(global_count=2, global_size=16)
    with pytest.raises(ValueError, match="backbone.name"):
        LoopConfig(method="us3l", backbone="resnet18", strategy="sequential", image_size=16, views=plan)


TABLE5 = [  # the paper's Table 5 axes: base loss, distillation loss, momentum target for base / sub-networks, aux head
    {"base_loss": "mse", "base_target": "self", "distill_loss": "mse", "distill_target": "base", "aux_head": False},
    {"base_loss": "mse", "base_target": "momentum", "distill_loss": "mse", "distill_target": "momentum",
     "aux_head": False},
    {"base_loss": "infonce", "base_target": "self", "distill_loss": "mse", "distill_target": "base",
     "aux_head": False},
    {"base_loss": "infonce", "base_target": "self", "distill_loss": "infonce", "distill_target": "base",
     "aux_head": False},
    {"base_loss": "infonce", "base_target": "momentum", "distill_loss": "infonce", "distill_target": "momentum",
     "aux_head": False},
    {"base_loss": "infonce", "base_target": "momentum", "distill_loss": "infonce", "distill_target": "momentum",
     "aux_head": True},
    {"base_loss": "infonce", "base_target": "self", "distill_loss": "none"},
]


@pytest.mark.parametrize("options", TABLE5 + list(PRESETS.values()), ids=lambda o: "-".join(map(str, o.values())))
def test_every_ablation_case_is_a_setting_and_trains_every_parameter(options) -> None:
    method = _method(**options, collapse_std_ratio=None)
    cfg = method.config
    assert (method.target_backbone is not None) == cfg.uses_teacher
    assert (method.predictor is not None) == (cfg.base_loss == "mse")
    assert (method.distill_head is not None) == (cfg.aux_head and cfg.distill_loss != "none")
    for progress_step in (0, 90):  # the base network alone (dynamic sampling) and a full sandwich
        method.zero_grad()
        out = forward(method, view_set(b=8), ctx=context(progress_step, 100))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        # Every trainable parameter gets a gradient (DDP with find_unused_parameters off needs it).
        missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
    assert len(method.last_widths) == (3 if cfg.dynamic_sampling else 4)
    assert method.backbone.current_width == 1.0  # left at the base network between steps


def test_a_few_steps_run_the_whole_sandwich_and_the_loss_falls() -> None:
    method = _method()
    optimizer = build_optimizer("sgd", method.param_groups(1e-4), lr=0.05, momentum=0.9)
    views = view_set(b=16)
    seen, losses = [], []
    for i in range(80, 85):  # the last stage: widths in [0.25, 1.0]
        out = step(method, optimizer, views, ctx=context(i, 100))
        seen.append(method.last_widths)
        losses.append(out.terms["loss/base"].item())
        assert torch.isfinite(out.loss)
        assert out.terms["sampling/widths"].item() == 3 and out.terms["sampling/min_width"].item() == 0.25
    assert all(w[0] == 1.0 and w[-1] == 0.25 and 0.25 <= w[1] <= 1.0 for w in seen)
    assert len({w[1] for w in seen}) == len(seen)  # a fresh random width every step
    assert losses[-1] < losses[0], losses


def test_group_regularisation_decays_later_channels_less() -> None:
    method = _method(group_reg_bins=4, group_reg_alpha=0.2)
    groups = method.param_groups(0.01)
    grouped = [g for g in groups if g.get("group_reg")]
    assert len(grouped) == 1 and grouped[0]["weight_decay"] == 0.0
    conv = method.backbone.layer1[0].conv1.weight  # 4 output channels: one per group
    assert any(p is conv for p in grouped[0]["params"]) and all(p is not conv for p in groups[0]["params"])
    assert not any(p is method.projector[0].weight for p in grouped[0]["params"])  # heads decay as usual
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    method.on_after_backward(context(50, 100))  # halfway: past the ramp (0.5), alpha at its full 0.2
    factors = [1.0, 0.8, 0.6, 0.4]
    for row, factor in enumerate(factors):
        assert torch.allclose(conv.grad[row], 0.01 * factor * conv[row].detach())
    method.on_after_backward(context(0, 100))  # start of training: alpha ramps from 0, every group decays alike
    assert torch.allclose(conv.grad[3], 0.01 * 0.4 * conv[3].detach() + 0.01 * conv[3].detach())
    assert all(g.get("weight_decay") == 0.0 for g in _method(group_reg=False).param_groups(0.01)[1:])


# ---------------------------------------------------------------- collapse
def test_collapse_detection_fires_on_a_collapsed_representation_only() -> None:
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(256, 64, generator=g)
    assert normalised_feature_std(healthy) == pytest.approx(1 / math.sqrt(64), rel=0.1)
    collapsed = torch.ones(256, 64) + 1e-4 * torch.randn(256, 64, generator=g)
    assert normalised_feature_std(collapsed) < 1e-3
    assert check_collapse(healthy, 0.1, method="m", step=3) > collapse_threshold(64, 0.1)
    with pytest.raises(RepresentationCollapseError, match="m: representation collapsed at width 0.25, step 3") as e:
        check_collapse(collapsed, 0.1, method="m", step=3, width=0.25)
    assert isinstance(e.value, NonFiniteLossError) and e.value.width == 0.25 and e.value.step == 3


def test_the_method_stops_naming_the_width_and_step_when_its_projections_collapse() -> None:
    method = _method(dynamic_sampling=False)
    with torch.no_grad():  # every image projects to the same point
        method.projector[-1].weight.zero_()
        method.projector[-1].bias.fill_(1.0)
    with pytest.raises(RepresentationCollapseError, match=r"us3l: representation collapsed at width 1, step 42"):
        forward(method, view_set(b=8), ctx=context(42, 100))
    healthy = _method(dynamic_sampling=False)
    assert torch.isfinite(forward(healthy, view_set(b=8), ctx=context(42, 100)).loss)


# ---------------------------------------------------------------- DDP
def _ddp_views() -> ViewSet:
    g = torch.Generator().manual_seed(3)
    return ViewSet(global_=[torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)])


def _frozen_bn(method: nn.Module) -> nn.Module:
    # BN on fixed statistics on both sides: per-rank batch statistics would differ from the whole batch's by
    # design (not what this test is about); the cross-rank terms left are the gathered InfoNCE negatives.
    for m in method.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return method


def _sandwich_grads(model, method, views, batch) -> tuple[dict, list[float]]:
    model(views, batch, context(0, 100)).loss.backward()  # the first stage: only the base network
    method.zero_grad()
    out = model(views, batch, context(90, 100))  # a full sandwich
    out.loss.backward()
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}, method.last_widths


def _ddp_worker(rank: int, world: int) -> dict:
    method = _frozen_bn(_method(proj_hidden=16, proj_out=8, pred_hidden=8, collapse_std_ratio=None))
    model = nn.parallel.DistributedDataParallel(method)  # find_unused_parameters off: an unused one would fail
    views = _ddp_views().map(lambda v: rows(v, rank, world))
    batch = Batch.from_images(torch.zeros(views.global_[0].shape[0], 3, 4, 4, dtype=torch.uint8))
    grads, widths = _sandwich_grads(model, method, views, batch)
    return {"grads": grads, "widths": widths}


@pytest.mark.slow
def test_a_sandwich_step_under_ddp_equals_one_process_with_the_whole_batch() -> None:
    ranks = run_ddp(_ddp_worker, 2)
    method = _frozen_bn(_method(proj_hidden=16, proj_out=8, pred_hidden=8, collapse_std_ratio=None))
    views = _ddp_views()
    grads, widths = _sandwich_grads(method, method, views, Batch.from_images(torch.zeros(8, 3, 4, 4,
                                                                                          dtype=torch.uint8)))
    assert ranks[0]["widths"] == ranks[1]["widths"] == widths and len(widths) == 3
    assert ranks[0]["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        for r in ranks:  # DDP averages the ranks' gradients: each holds the whole batch's
            assert torch.allclose(r["grads"][name], grad, atol=1e-5, rtol=1e-4), name
