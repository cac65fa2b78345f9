"""The two training loops bench.step_throughput compares, built from one `StepConfig`, and their shared inputs.

    cfg = StepConfig(backbone="resnet18", method="byol", size=32, batch=32, precision="fp32", channels_last=False)
    engine, bare = EngineLoop(cfg, "cpu"), BareLoop(cfg, "cpu")
    batches = premade_batches(cfg, "cpu")
    engine.run(cycle(batches), 5); bare.run(cycle(batches), 5)      # samples trained

- `EngineLoop` (alias `StreamsslLoop`): `trainers.engine.loop.LineTrainer.train_chunk`, the path a Ray Train worker runs.
- `BareLoop`: what a researcher would hand-roll around the same method module: views from
  `trainers.views.augment.make_views`, `training_step` called directly, backward, the method's own hooks, `optimizer.step()`,
  a hand-written EMA for methods with `momentum_pairs()`, `loss.item()` every `log_every` steps, constant LR.

Everything method- or backbone-specific comes from the registry records and the method's attributes
(`needs_labels`, `needs_local_views`, `min_global_views`, `momentum_pairs`), never from a method's name.
"""

from __future__ import annotations

import itertools
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from trainers.engine.types import Batch, StepContext, ViewSet
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY

# --small-heads: an int option whose name says it sizes a head (hidden/output widths, prototypes, bottlenecks)
# and whose default is larger gets this value; queues, epochs and the like keep their defaults.
SMALL_HEAD = 64
_HEAD_OPTION = re.compile(r"hidden|_out$|^out_|_dim$|prototypes|bottleneck")
DEFAULT_LOCAL_VIEWS = 6  # multi-crop views for methods whose record says needs_local_views (SwAV's and DINO's 6+)


@dataclass(frozen=True)
class StepConfig:
    """One model / precision / batch setting, shared by every loop."""

    backbone: str = "resnet18"
    width: int | None = None  # a backbone's `width` option where it has one (ResNets); None: its default (64)
    cifar_stem: bool | None = None  # where the backbone has the option; None: its own rule from the image size
    # further backbone options by backbone name, each applied where that backbone has the option (bench.gpu_suite's
    # tiny profile: {"vit_tiny": {"patch_size": 8}, "mobilenet_v2": {"width_mult": 0.25}})
    backbone_extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: str = "simclr"
    size: int = 224  # global view side (crop output)
    input_size: int | None = None  # side of the uint8 batches; default = size
    batch: int = 256
    views: int = 2  # global views (at least the record's min_global_views)
    local_views: int | None = None  # None: DEFAULT_LOCAL_VIEWS where the record needs local views, else 0
    precision: str = "bf16"
    channels_last: bool = True
    small_heads: bool = False
    lr: float = 0.05  # small: random-noise batches, and train_chunk raises on a non-finite loss
    momentum: float = 0.9
    weight_decay: float = 1e-4
    log_every: int = 10
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)  # explicit options, over the (small) defaults
    view_options: dict[str, Any] = field(default_factory=dict)  # AugmentConfig overrides (scale, blur_p, ...)

    @property
    def record(self):
        return METHOD_REGISTRY.require(self.method)

    @property
    def source_size(self) -> int:
        return self.input_size or self.size

    @property
    def label(self) -> str:
        w = "" if self.width in (None, 64) else f"/w{self.width}"
        heads = " small-heads" if self.small_heads else ""
        return f"{self.backbone}{w} {self.method} {self.size}px b{self.batch} {self.precision}{heads}"


# ---------------------------------------------------------------------------------------------- options


def method_options(cfg: StepConfig) -> dict[str, Any]:
    """The method's options, validated: paper defaults, heads shrunk with `small_heads`, then `method_options`."""
    record = cfg.record
    given: dict[str, Any] = {}
    if cfg.small_heads:
        for name, info in record.config.model_fields.items():
            default = info.default
            if (isinstance(default, int) and not isinstance(default, bool) and default > SMALL_HEAD
                    and _HEAD_OPTION.search(name)):
                given[name] = SMALL_HEAD
    return record.options({**given, **cfg.method_options})


def backbone_options(cfg: StepConfig) -> dict[str, Any]:
    """`width` / `cifar_stem` / `backbone_extra[backbone]` options, for the backbones whose Config has them (the
    others ignore the settings)."""
    names = BACKBONE_REGISTRY.require(cfg.backbone).option_names()
    given = {"width": cfg.width, "cifar_stem": cfg.cifar_stem, **cfg.backbone_extra.get(cfg.backbone, {})}
    return {k: v for k, v in given.items() if v is not None and k in names}


def view_plan_for(cfg: StepConfig):
    """Global views (>= the record's min_global_views) and, where the record needs them, local views at the
    plan's default local side, made smaller until the backbone accepts it (a ViT patch must divide it)."""
    from trainers.views.plan import DEFAULT_GLOBAL_SCALE, default_local_size, view_plan

    record = cfg.record
    count = max(cfg.views, record.min_global_views)
    local = cfg.local_views if cfg.local_views is not None else (DEFAULT_LOCAL_VIEWS if record.needs_local_views
                                                                  else 0)
    local_size = None
    if local:
        bb = BACKBONE_REGISTRY.require(cfg.backbone)
        options = bb.config.parse(bb.name, **backbone_options(cfg))
        for local_size in range(default_local_size(cfg.size), 7, -1):
            try:
                options.check(cfg.size, local_size)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"{cfg.backbone} at {cfg.size} px accepts no local view side >= 8")
    options = dict(cfg.view_options)
    scale = tuple(options.pop("scale", DEFAULT_GLOBAL_SCALE))  # the global crops' scale; local ones keep theirs
    return view_plan(global_count=count, global_size=cfg.size, global_scale=scale, local_count=local,
                     local_size=local_size, global_options=options, local_options=options)


def augment_configs(cfg: StepConfig):
    """The global views' AugmentConfigs."""
    return view_plan_for(cfg).global_


def loop_config(cfg: StepConfig):
    """The LoopConfig the orchestrator would build for this setting (sequential: no re-initialisation).

    `line_steps` stays 0 (progress 0, the base momentum): at progress 1 the EMA momentum reaches 1 and the engine
    skips the update, which would time less work than a bare loop does."""
    from trainers.engine.loop import LoopConfig

    return LoopConfig(
        method=cfg.method, strategy="sequential", image_size=cfg.size, views=view_plan_for(cfg),
        backbone=cfg.backbone, backbone_options=backbone_options(cfg), method_options=method_options(cfg),
        optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, epochs_per_chunk=1,
        batch_size=cfg.batch, schedule="cosine", seed=cfg.seed, precision=cfg.precision,
        channels_last=cfg.channels_last, log_every=cfg.log_every,
    )


def premade_batches(cfg: StepConfig, device: str, count: int = 4) -> list[Batch]:
    """`count` distinct uint8 [B,3,S,S] noise batches on the device (content does not change the cost); labels
    in 0..9 where the method's record needs them, else unknown (-1)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    side = cfg.source_size
    labelled = cfg.record.needs_labels
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (cfg.batch, 3, side, side), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (cfg.batch,), generator=g) if labelled else None
        out.append(Batch.from_images(images, labels=labels).to(device))
    return out


def cycle(batches: list[Batch]) -> Iterator[Batch]:
    return itertools.cycle(batches)


# ---------------------------------------------------------------------------------------------- the bare loop


def build_model(cfg: StepConfig, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The method module seeded as LineTrainer seeds it (same weights), and torch's SGD over its param groups."""
    from trainers.backbones import build_backbone

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, cfg.size, **backbone_options(cfg))
    method = cfg.record.build(backbone, **method_options(cfg)).to(device)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    groups = method.param_groups(cfg.weight_decay)
    for group in groups:  # a constant LR, honouring the method's per-group scale; fixed_lr groups keep theirs
        if not group.get("fixed_lr", False):
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return method, optimizer


def v2_view_transform(aug) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision.transforms.v2 for one AugmentConfig, on a float [B,3,H,W] batch in [0,1] (one draw per call)."""
    from torchvision.transforms import v2

    from bench.common import augmentation_ops
    from trainers.views.augment import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD

    return v2.Compose(augmentation_ops(aug, v2, SOLARIZE_THRESHOLD) + [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class BareLoop:
    """A hand-written loop around the same method module.

    `views="make_views"` (the default): `trainers.views.augment.make_views` per view group, seeded like LineTrainer's
    generator, so the first step sees the same views and weights as the engine's and gives the same loss;
    `"v2"`: torchvision.transforms.v2 on the device batch (one random draw per view per batch; end_to_end uses it).
    `step_views()` takes views already made (end_to_end's DataLoader makes them in its workers).
    """

    def __init__(self, cfg: StepConfig, device: str, views: str = "make_views"):
        if views not in ("v2", "make_views"):
            raise ValueError(f"views must be 'v2' or 'make_views', got {views!r}")
        self.cfg, self.device, self.views = cfg, device, views
        self.method, self.optimizer = build_model(cfg, device)
        self.plan = view_plan_for(cfg)
        self.transforms = ([[v2_view_transform(a) for a in group] for group in (self.plan.global_, self.plan.local)]
                           if views == "v2" else None)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003)  # LineTrainer's, rank 0
        self.autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else nullcontext())
        self.pairs = self.method.momentum_pairs()
        self.step_count = 0
        self.last_loss = float("nan")
        self.first_loss: float | None = None
        self.steps_per_epoch: int | None = None

    def make_views(self, images: torch.Tensor) -> ViewSet:
        if self.views == "make_views":
            from trainers.views.augment import make_views

            global_ = make_views(images, self.plan.global_, generator=self.generator)  # global first, as the engine
            local = make_views(images, self.plan.local, generator=self.generator) if self.plan.local else []
            return ViewSet(global_, local)
        with torch.no_grad():
            x = images.float().div_(255.0)
            return ViewSet([t(x) for t in self.transforms[0]], [t(x) for t in self.transforms[1]])

    @torch.no_grad()
    def ema(self, progress: float) -> None:
        """target <- m target + (1 - m) online, m on BYOL's cosine from base to final momentum."""
        base, final = self.method.base_momentum, self.method.final_momentum
        m = final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
        for online, target in self.pairs:
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po, alpha=1 - m)

    def step_views(self, views: ViewSet | list[torch.Tensor], progress: float = 0.0,
                   batch: Batch | None = None) -> None:
        if not isinstance(views, ViewSet):
            views = ViewSet(list(views))
        if self.cfg.channels_last:
            views = views.map(lambda v: v.contiguous(memory_format=torch.channels_last))
        if batch is None:
            b = views.global_[0].shape[0]
            batch = Batch.from_images(torch.zeros(b, 3, 1, 1, dtype=torch.uint8, device=views.global_[0].device))
        ctx = StepContext(step=self.step_count, total_steps=None, lr=self.cfg.lr,
                          steps_per_epoch=self.steps_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.method.training_step(views, batch, ctx).loss
        loss.backward()
        self.method.on_after_backward(ctx)  # the method's own hooks (DINO's last layer, SwAV's prototypes)
        self.optimizer.step()
        if self.pairs:
            self.ema(progress)
        self.method.on_step_end(ctx)
        self.step_count += 1
        if self.first_loss is None:
            self.first_loss = loss.item()
        if self.step_count % self.cfg.log_every == 0:
            self.last_loss = loss.item()

    def step(self, batch: Batch | torch.Tensor, progress: float = 0.0) -> None:
        if not isinstance(batch, Batch):
            batch = Batch.from_images(batch)
        batch = batch.to(self.device, non_blocking=True)
        self.step_views(self.make_views(batch.images), progress, batch)

    def run(self, batches: Iterable[Batch | torch.Tensor], steps: int) -> int:
        """`steps` steps over `batches` (stops early when it runs dry); returns the samples trained."""
        samples, self.steps_per_epoch = 0, steps
        for i, batch in enumerate(itertools.islice(batches, steps)):
            self.step(batch, (i + 1) / steps)
            samples += len(batch)
        self.method.on_epoch_end(StepContext(step=self.step_count, total_steps=None, steps_per_epoch=steps))
        return samples


# ---------------------------------------------------------------------------------------------- the engine


class EngineLoop:
    """LineTrainer.train_chunk over the given batches: one call = one chunk of `steps` steps, with an `on_step`
    callback every `log_every` steps as the Ray Train worker passes one (the NaN check runs there)."""

    def __init__(self, cfg: StepConfig, device: str):
        from trainers.engine.loop import LineTrainer

        self.cfg = cfg
        self.trainer = LineTrainer(loop_config(cfg), device=device)
        self.trainer.start_chunk(0)  # sequential: builds nothing new at later chunks
        self.chunk = 0
        self.infos: list[Any] = []
        self.reports: list[Any] = []

    @property
    def first_loss(self) -> float | None:
        return self.reports[0].losses[0] if self.reports and self.reports[0].losses else None

    def run(self, batches: Iterable[Batch | torch.Tensor], steps: int) -> int:
        iterator = iter(batches)
        report = self.trainer.train_chunk(self.chunk, lambda epoch, skip: iterator, steps, on_step=self.infos.append)
        self.chunk += 1
        self.reports.append(report)
        return report.samples


StreamsslLoop = EngineLoop  # the name end_to_end and overheads use

__all__ = ["BareLoop", "EngineLoop", "StepConfig", "StreamsslLoop", "augment_configs", "backbone_options",
           "build_model", "cycle", "loop_config", "method_options", "premade_batches", "view_plan_for"]
