"""Small builders the method tests share: a tiny backbone, views, one engine step."""

from __future__ import annotations

import torch

from trainers.backbones import build_backbone
from trainers.engine.step import train_step
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.views.plan import make_view_set, view_plan


def tiny_backbone(image_size: int = 16, width: int = 4, method: str | None = None) -> torch.nn.Module:
    """A tiny ResNet-18; the slimmable one when `method` trains a slimmable network (US3L)."""
    return build_backbone(tiny_backbone_name(method), image_size=image_size, width=width)


def tiny_backbone_name(method: str | None = None) -> str:
    from trainers.registry import METHOD_REGISTRY

    return "slimmable_resnet18" if method is not None and METHOD_REGISTRY[method].slimmable else "resnet18"


def images(b: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def view_set(b: int = 8, size: int = 16, global_count: int = 2, local_count: int = 0, local_size: int = 8,
             seed: int = 0) -> ViewSet:
    g = torch.Generator().manual_seed(seed)
    plan = view_plan(global_count=global_count, global_size=size, local_count=local_count, local_size=local_size,
                     global_options={"blur_p": 0.0})
    return make_view_set(images(b, size, seed), plan, generator=g)


def context(step: int = 0, total: int | None = 100, **kw) -> StepContext:
    return StepContext(step=step, total_steps=total, **kw)


def forward(method: torch.nn.Module, views: ViewSet, labels: torch.Tensor | None = None,
            ctx: StepContext | None = None) -> StepOutput:
    b = views.global_[0].shape[0]
    batch = Batch.from_images(torch.zeros(b, 3, 4, 4, dtype=torch.uint8), labels=labels)
    return method(views, batch, ctx or context())


def step(method: torch.nn.Module, optimizer: torch.optim.Optimizer, views: ViewSet,
         labels: torch.Tensor | None = None, ctx: StepContext | None = None) -> StepOutput:
    b = views.global_[0].shape[0]
    batch = Batch.from_images(torch.zeros(b, 3, 4, 4, dtype=torch.uint8), labels=labels)
    return train_step(method, method, optimizer, views, batch, ctx or context())


# Options that keep each method's heads small enough for CPU tests (the defaults are the papers' sizes).
# One entry per registered method: the contract tests in test_methods.py build every method with these.
SMALL_OPTIONS: dict[str, dict] = {
    "simclr": {"proj_hidden": 32, "proj_out": 16, "temperature": 0.5},
    "byol": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 16},
    # The queue (2 steps of 8 to fill) and the prototype freeze (2 steps) are both live in the 6-step resume test.
    "swav": {"proj_hidden": 32, "proj_out": 16, "n_prototypes": 10, "queue_length": 16, "epoch_queue_starts": 0,
             "freeze_prototypes_iters": 2},
    "dino": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16},
    "moco_v2": {"proj_hidden": 32, "proj_out": 16, "queue_size": 20},
    "moco_v2_plus": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 16, "queue_size": 20},
    "barlow_twins": {"proj_hidden": 32, "proj_out": 32},
    "simsiam": {"proj_hidden": 32, "proj_out": 32, "pred_hidden": 8},
    "supervised": {"num_classes": 4},
    "us3l": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 16},
}
