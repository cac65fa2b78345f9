"""US3L: universally slimmable self-supervised learning (Cao, Sun, Zhou, CVPR 2023, "Three Guidelines You Should
Know for Universally Slimmable Self-Supervised Learning"), and the US-Net baselines, as settings of one method.

One slimmable network (`trainers.backbones.slimmable`) is trained at several widths every step (the sandwich
rule: the largest width, the smallest of the current range, and `num_random_widths` widths drawn between them);
the widths' losses are summed into one backward (the same gradient as accumulating one backward per width) and
the engine takes one optimizer step. The base network (largest width) learns with the base loss; every other
width either learns with the base loss too (`distill_loss: none`, the naive recipe) or is distilled towards a
target network's outputs of the other view (`distill_target`: the momentum teacher, or the base network itself,
detached: US-Net's in-place distillation).

Options (`US3LConfig`, paper defaults; the paper's guidelines are the defaults):

- `base_loss`: `infonce` (NT-Xent of the online projections against the target's, batch negatives; guideline 1) or
  `mse` (normalised MSE, 2 - 2 cos, of a predictor's output against the target: SimSiam / BYOL);
- `base_target`: `momentum` (targets from the EMA teacher: MoCo-v3-like with `infonce`, BYOL with `mse`) or `self`
  (SimCLR with `infonce`: both views learn; SimSiam with `mse`: stop-gradient);
- `distill_loss`: `none`, `mse` or `infonce` (guideline 2); `distill_target`: `momentum` (guideline 3) or `base`;
- `aux_head`: the sub-networks' outputs pass an auxiliary MLP before the distillation loss;
- `num_random_widths`, `min_width`, `max_width`; `dynamic_sampling` with `sampling_switch_points` (fractions of the
  model's training) and `sampling_min_widths` (the smallest width of each stage);
- `group_reg`: later channels of the backbone's weights get a smaller L2 penalty (`param_groups`, applied after the
  backward);
- `collapse_std_ratio`: stop the line (RepresentationCollapseError) when a width's projections collapse.

The paper's baselines and its ablation (Table 5) are option sets (`PRESETS` lists the named ones):
US-Net + SimCLR is `base_loss: infonce, base_target: self, distill_loss: infonce, distill_target: base,
aux_head: false, dynamic_sampling: false, group_reg: false, num_random_widths: 2`; US-Net + SimSiam (it collapses)
is the same with `base_loss: mse, distill_loss: mse`.

DDP: every rank draws the same widths (a generator seeded by the line's step, never a rank's RNG); a step that
leaves a head unused (the first stage trains the base network alone, so the auxiliary head gets no loss) adds it
with weight zero, so DDP never meets a parameter without gradient.

Reference: J. Cao, Y. Sun, S. Zhou, "Three Guidelines You Should Know for Universally Slimmable Self-Supervised
Learning", CVPR 2023, arXiv:2303.06870 (code: github.com/megvii-research/US3L-CVPR2023); J. Yu, T. Huang,
"Universally Slimmable Networks and Improved Training Techniques", ICCV 2019.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from trainers.backbones.slimmable import SlimmableConv2d, SlimmableLinear, is_slimmable, set_width, slim_twin
from trainers.config import ComponentConfig
from trainers.engine.collapse import check_collapse
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views
from trainers.methods.heads import frozen_copy, mlp
from trainers.methods.simclr import nt_xent_loss
from trainers.optim import param_groups as default_param_groups


class US3LConfig(ComponentConfig):
    """US3L's options with the paper's defaults (its CIFAR code: SimCLR-momentum base, InfoNCE distillation)."""

    proj_hidden: int = Field(2048, ge=1, description="hidden width of the projector MLP (2048 in the paper)")
    proj_out: int = Field(128, ge=1, description="size of the projections the losses see")
    pred_hidden: int = Field(
        512, ge=1, description="hidden width of the predictor (mse base) and the auxiliary distillation head")
    base_loss: Literal["infonce", "mse"] = Field(
        "infonce", description="the base network's loss: infonce (relative distances, guideline 1) or mse "
                               "(normalised MSE of a predictor's output, SimSiam/BYOL)")
    base_target: Literal["momentum", "self"] = Field(
        "momentum", description="the base loss's targets: the momentum teacher's projections of the other view, or "
                                "the network's own (SimCLR with infonce, SimSiam's stop-gradient with mse)")
    distill_loss: Literal["none", "mse", "infonce"] = Field(
        "infonce", description="the sub-networks' loss: none (each width learns with the base loss: the naive "
                               "recipe), mse or infonce against distill_target's outputs (guideline 2)")
    distill_target: Literal["momentum", "base"] = Field(
        "momentum", description="what the sub-networks distil: the momentum teacher (guideline 3) or the base "
                                "network's detached outputs (US-Net's in-place distillation)")
    aux_head: bool = Field(True, description="an auxiliary MLP between the sub-networks and the distillation loss")
    temperature: float = Field(0.5, gt=0, allow_inf_nan=False,
                               description="InfoNCE temperature of the base loss (0.5 in the paper's CIFAR code)")
    distill_temperature: float = Field(0.5, gt=0, allow_inf_nan=False,
                                       description="InfoNCE temperature of the distillation loss")
    base_momentum: float = Field(0.99, ge=0, le=1, allow_inf_nan=False,
                                 description="teacher EMA momentum at the start (0.99 in the paper's code)")
    final_momentum: float = Field(1.0, ge=0, le=1, allow_inf_nan=False,
                                  description="teacher EMA momentum at the end (cosine from base_momentum)")
    num_random_widths: int = Field(
        1, ge=0, le=16, description="widths drawn between the smallest and the largest each step, besides those "
                                    "two (1 in the paper: three widths a step)")
    min_width: float = Field(0.25, ge=0.25, le=1.0, description="the smallest width trained")
    max_width: float = Field(1.0, ge=0.25, le=1.0, description="the largest width (the base network)")
    dynamic_sampling: bool = Field(
        True, description="widen the sampled range over training (sampling_min_widths at the switch points)")
    sampling_switch_points: list[float] = Field(
        [0.25, 0.5, 0.75], description="fractions of the model's training where the next stage of "
                                       "sampling_min_widths starts (the paper: quarters)")
    sampling_min_widths: list[float] = Field(
        [1.0, 0.75, 0.5, 0.25], description="the smallest width of each stage (one more than the switch points); "
                                            "the range of a stage is [its value, max_width]")
    group_reg: bool = Field(True, description="group regularisation: smaller weight decay for later channels")
    group_reg_bins: int = Field(8, ge=1, description="channel groups of the group regularisation (8 in the paper)")
    group_reg_alpha: float = Field(
        0.05, ge=0, allow_inf_nan=False,
        description="decay of group i is weight_decay x (1 - alpha x i) (0.05 in the paper)")
    group_reg_ramp: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False,
        description="alpha grows linearly from 0 over this fraction of training (0.5 in the paper's code)")
    collapse_std_ratio: float | None = Field(
        0.1, gt=0, allow_inf_nan=False,
        description="stop the line when a width's normalised projections have a per-dimension std below "
                    "ratio / sqrt(proj_out) (healthy: about 1 / sqrt(proj_out)); None: no check")

    @model_validator(mode="after")
    def _consistent(self) -> "US3LConfig":
        if self.min_width > self.max_width:
            raise ValueError(f"min_width ({self.min_width}) must be <= max_width ({self.max_width})")
        if self.final_momentum < self.base_momentum:
            raise ValueError(f"final_momentum ({self.final_momentum}) must be >= base_momentum "
                             f"({self.base_momentum})")
        points, lows = self.sampling_switch_points, self.sampling_min_widths
        if len(lows) != len(points) + 1:
            raise ValueError(f"sampling_min_widths needs one width more than sampling_switch_points, got "
                             f"{len(lows)} and {len(points)}")
        if any(not 0 < p < 1 for p in points) or any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError(f"sampling_switch_points must rise strictly inside (0, 1), got {points}")
        if any(not self.min_width <= w <= self.max_width for w in lows) or any(
                b > a for a, b in zip(lows, lows[1:])):
            raise ValueError(f"sampling_min_widths must fall (not rise) within [min_width, max_width] = "
                             f"[{self.min_width}, {self.max_width}], got {lows}")
        if 1 - self.group_reg_alpha * (self.group_reg_bins - 1) < 0:
            raise ValueError(f"group_reg_alpha x (group_reg_bins - 1) must be <= 1 (no negative decay), got "
                             f"{self.group_reg_alpha} x {self.group_reg_bins - 1}")
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.base_target == "momentum" or (self.distill_loss != "none" and self.distill_target == "momentum")


# The paper's recipes as option sets (spec authors copy them into `methods.us3l`; a Tune sweep varies them).
PRESETS: dict[str, dict[str, Any]] = {
    "us3l": {},
    "usnet_simclr": {"base_loss": "infonce", "base_target": "self", "distill_loss": "infonce",
                     "distill_target": "base", "aux_head": False, "dynamic_sampling": False, "group_reg": False,
                     "num_random_widths": 2},
    "usnet_simsiam": {"base_loss": "mse", "base_target": "self", "distill_loss": "mse", "distill_target": "base",
                      "aux_head": False, "dynamic_sampling": False, "group_reg": False, "num_random_widths": 2},
}


def normalised_mse(p: Tensor, z: Tensor) -> Tensor:
    """Per row `||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)` `[B]` (BYOL eq. 2); `z` detached; float32 at least."""
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(p.device.type, enabled=False):
        return 2 - 2 * F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1)


def cross_view_loss(students: list[Tensor], targets: list[Tensor], kind: str, temperature: float) -> Tensor:
    """Per-sample `[B]` mean over ordered view pairs a != b of the loss between `students[a]` and the detached
    `targets[b]`: `infonce` is NT-Xent with (student, target) as the two views (SimCLR's, batch negatives gathered
    over ranks), `mse` the normalised MSE. The US3L code's distillation criterion."""
    if kind not in ("infonce", "mse") or len(students) != len(targets) or len(students) < 2:
        raise ValueError(f"cross_view_loss: kind must be infonce or mse with >= 2 paired views, got {kind!r}, "
                         f"{len(students)} students and {len(targets)} targets")
    terms = []
    for a, s in enumerate(students):
        for b, t in enumerate(targets):
            if a != b:
                terms.append(nt_xent_loss(s, t.detach(), temperature, "none") if kind == "infonce"
                             else normalised_mse(s, t))
    return torch.stack(terms).mean(dim=0)


def sampling_range(cfg: US3LConfig, progress: float | None) -> tuple[float, float]:
    """The [smallest, largest] width sampled at `progress` (fraction of the model's training; None: unknown, as on
    an unbounded stream, which samples the last stage's range)."""
    if not cfg.dynamic_sampling:
        return cfg.min_width, cfg.max_width
    stage = len(cfg.sampling_switch_points) if progress is None else sum(
        progress >= p for p in cfg.sampling_switch_points)
    return cfg.sampling_min_widths[stage], cfg.max_width


def sample_widths(cfg: US3LConfig, step: int, progress: float | None) -> list[float]:
    """The sandwich of one step, largest first: max_width, `num_random_widths` uniform draws in the stage's range
    (descending), the stage's smallest width; only max_width while the range is a single width. Seeded by `step`
    alone, so every rank (and a resumed run) draws the same widths."""
    low, high = sampling_range(cfg, progress)
    if low >= high:
        return [high]
    g = torch.Generator().manual_seed(int(step))
    drawn = sorted((low + (high - low) * float(u) for u in torch.rand(cfg.num_random_widths, generator=g)),
                   reverse=True)
    return [high, *drawn, low]


class US3L(Method):
    """A slimmable encoder + projector trained at several widths a step; see the module docstring."""

    Config = US3LConfig
    name = "us3l"
    config: US3LConfig

    def __init__(self, backbone: nn.Module, **options) -> None:
        if not is_slimmable(backbone):
            raise ValueError(f"backbone.name: us3l trains a slimmable network and needs a slimmable backbone "
                             f"(trainers.backbones.slimmable), got {type(backbone).__name__}")
        super().__init__(backbone, options)
        cfg = self.config
        self.base_momentum, self.final_momentum = cfg.base_momentum, cfg.final_momentum
        self.projector = mlp(self.feature_dim, cfg.proj_hidden, cfg.proj_out)
        # The projector's first layer takes whatever feature width the backbone gives at the current width.
        self.projector[0] = slim_twin(self.projector[0], slim_out=False)
        self.predictor = mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out) if cfg.base_loss == "mse" else None
        self.distill_head = (mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out)
                             if cfg.aux_head and cfg.distill_loss != "none" else None)
        if cfg.uses_teacher:
            self.target_backbone = frozen_copy(backbone)
            self.target_projector = frozen_copy(self.projector)
            set_width(self.target_backbone, 1.0)  # the teacher is always the whole network
        else:
            self.target_backbone = self.target_projector = None
        self.last_widths: list[float] = []
        self._decay: tuple[list[nn.Parameter], float] | None = None

    # ------------------------------------------------------------------ the step
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.target_backbone is None:
            return []
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    @staticmethod
    def progress(ctx: StepContext) -> float | None:
        return ctx.model_progress if ctx.model_steps else None

    def _base_terms(self, z: list[Tensor], keys: list[Tensor] | None) -> Tensor:
        """Per-sample base loss of projections `z` (one per view) against the teacher's `keys` (or themselves)."""
        cfg = self.config
        if cfg.base_loss == "infonce":
            if keys is None:  # SimCLR: every unordered pair, gradient through both views
                pairs = [nt_xent_loss(z[a], z[b], cfg.temperature, "none")
                         for a in range(len(z)) for b in range(a + 1, len(z))]
                return torch.stack(pairs).mean(dim=0)
            return cross_view_loss(z, keys, "infonce", cfg.temperature)
        predictions = [self.predictor(zi) for zi in z]
        return cross_view_loss(predictions, keys if keys is not None else z, "mse", cfg.temperature)

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views("US3L", views)
        if views.local:
            raise ValueError(f"US3L uses global views only, got {len(views.local)} local views; set "
                             "views.local.count to 0")
        cfg = self.config
        widths = sample_widths(cfg, ctx.step, self.progress(ctx))
        self.last_widths = widths
        keys = None
        if self.target_backbone is not None:
            with torch.no_grad():
                keys = [self.target_projector(self.target_backbone(v)) for v in views.global_]
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        base_z: list[Tensor] = []
        random_losses = []
        for index, width in enumerate(widths):
            set_width(self.backbone, width)
            z = [self.projector(self.backbone(v)) for v in views.global_]
            if cfg.collapse_std_ratio is not None:
                for zi in z:
                    check_collapse(zi, cfg.collapse_std_ratio, method=self.name, step=ctx.step, width=width)
            if index == 0:
                base_z = z
                per_sample = self._base_terms(z, keys if cfg.base_target == "momentum" else None)
            elif cfg.distill_loss == "none":
                per_sample = self._base_terms(z, keys if cfg.base_target == "momentum" else None)
            else:
                heads = self.distill_head or self.predictor
                students = [heads(zi) for zi in z] if heads is not None else z
                targets = keys if cfg.distill_target == "momentum" else [zi.detach() for zi in base_z]
                per_sample = cross_view_loss(students, targets, cfg.distill_loss, cfg.distill_temperature)
            total = per_sample if total is None else total + per_sample
            name = "base" if index == 0 else "smallest" if index == len(widths) - 1 else None
            if name:
                terms[f"loss/{name}"] = per_sample.mean().detach()
            else:
                random_losses.append(per_sample.mean().detach())
        set_width(self.backbone, cfg.max_width)  # embedder() and evaluation see the base network between steps
        if random_losses:
            terms["loss/random"] = torch.stack(random_losses).mean()
        terms["sampling/min_width"] = torch.tensor(widths[-1])
        terms["sampling/widths"] = torch.tensor(float(len(widths)))
        loss = total.mean()
        if len(widths) == 1 and self.distill_head is not None:
            # The first stage trains the base network alone: the distillation head joins with weight zero so DDP
            # (find_unused_parameters off) finds a gradient for every parameter.
            loss = loss + 0.0 * sum(p.sum() for p in self.distill_head.parameters())
        return StepOutput(loss, total.detach(), terms, embeddings=base_z)

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """CaSSLe's term: NT-Xent with the frozen projection as the positive (the method's base temperature)."""
        return nt_xent_loss(p, z.detach(), self.config.temperature)

    # ------------------------------------------------------------------ group regularisation
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The default groups; with `group_reg` the weights of the backbone's layers whose outputs slim
        (convolutions, linear layers; norms and biases stay undecayed as everywhere) leave the decayed group for one
        with weight decay 0 whose decay `on_after_backward` adds per channel group: `weight_decay x (1 - alpha_t x i)` for the i-th of
        `group_reg_bins` groups of output channels, alpha_t ramping from 0 to `group_reg_alpha`. Applied to the
        gradient (coupled L2, as the paper's regulariser, a loss term), after DDP's all-reduce, on every rank alike.
        """
        groups = default_param_groups(self, weight_decay)
        if not self.config.group_reg:
            return groups
        grouped = []
        for module in self.backbone.modules():
            if isinstance(module, (SlimmableConv2d, SlimmableLinear)) and module.slim_out:
                for pname, param in module.named_parameters(recurse=False):
                    if param.requires_grad and pname != "bias" and param.dim() >= 2:
                        grouped.append(param)
        ids = {id(p) for p in grouped}
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in ids]
        self._decay = (grouped, weight_decay)
        return [*groups, {"params": grouped, "weight_decay": 0.0, "group_reg": True}]

    def channel_decay(self, rows: int, progress: float) -> Tensor:
        """Decay factor `[rows]` of each output channel: 1 - alpha_t x (its group index)."""
        cfg = self.config
        ramp = 1.0 if cfg.group_reg_ramp == 0 else min(1.0, progress / cfg.group_reg_ramp)
        group = torch.arange(rows) * cfg.group_reg_bins // rows
        return 1.0 - cfg.group_reg_alpha * ramp * group.float()

    @torch.no_grad()
    def on_after_backward(self, ctx: StepContext) -> None:
        if self._decay is None:
            return
        params, weight_decay = self._decay
        if weight_decay == 0:
            return
        progress = self.progress(ctx)
        progress = 1.0 if progress is None else progress
        for p in params:
            if p.grad is None:
                continue
            factor = self.channel_decay(p.shape[0], progress).to(p.device, p.dtype)
            p.grad.add_(p * (weight_decay * factor).view(-1, *([1] * (p.dim() - 1))))


__all__ = ["PRESETS", "US3L", "US3LConfig", "cross_view_loss", "normalised_mse", "sample_widths", "sampling_range"]
