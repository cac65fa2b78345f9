"""DINO: self-distillation with no labels (Caron et al., 2021).

A student (backbone + DINO head) is trained to match, on every other view, the output distribution that a
teacher (an EMA copy of the student) gives for each global view. The teacher's outputs are centred (a running
mean over the global batch, momentum 0.9) and sharpened (a low, warmed-up temperature): the two together avoid
collapse without negatives or a predictor. The teacher sees only the global views; the student sees all views,
global and local (multi-crop), so it learns local-to-global correspondences.

Usage::

    method = DINO(backbone, out_dim=65536, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    out = train_step(method, method, optimizer, views, batch, ctx)   # views: 2 global + n local

The engine moves the teacher (`momentum_pairs`) after every optimizer step with the momentum of the model's progress
(cosine from base_momentum to final_momentum over the model's life). The epoch-based schedules (teacher temperature
warm-up, last-layer freeze) read the model's epoch `ctx.model_epochs` (epochs completed since the model was built,
counted over chunks of any size, so it never goes back; a weight reset starts it at 0), or without it
`ctx.model_step // ctx.steps_per_epoch` (`online_epoch_steps` when there is no `steps_per_epoch`).
`on_after_backward` clips gradients (per parameter, as the official `clip_gradients`) and cancels the last layer's
gradients during the first `freeze_last_layer` epochs. The centre is a registered buffer updated from all-reduced
means, so every rank holds the same one and the checkpoint keeps it.

Reference: M. Caron, H. Touvron, I. Misra, H. Jégou, J. Mairal, P. Bojanowski, A. Joulin, "Emerging Properties
in Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.14294 (defaults from facebookresearch/dino
main_dino.py and vision_transformer.py DINOHead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.engine.distributed import all_reduce_mean
from trainers.engine.types import Batch, StepContext, StepOutput, ViewSet
from trainers.methods.base import Method, check_views, weigh_view_terms
from trainers.methods.heads import frozen_copy

_REDUCTIONS = ("mean", "none")


class DINOConfig(ComponentConfig):
    """DINO's hyper-parameters with the official defaults (Caron et al., 2021; facebookresearch/dino)."""

    out_dim: int = Field(
        65536, ge=1,
        description="size K of the head's output distribution (65536 in the paper; small heads, e.g. 256 to 4096, "
                    "suit small data sets)",
    )
    hidden_dim: int = Field(2048, ge=1, description="hidden width of the head's MLP (2048 in the paper)")
    bottleneck_dim: int = Field(
        256, ge=1, description="size of the L2-normalised bottleneck before the last layer (256 in the paper)"
    )
    head_layers: int = Field(
        3, ge=1, description="Linear layers of the head's MLP before the bottleneck normalisation (3 in the paper; "
                             "GELU between them)",
    )
    use_bn: bool = Field(
        False, description="BatchNorm after the head's hidden layers (off in the paper's ViT default; the official "
                           "ResNet-50 run turns it on)",
    )
    norm_last_layer: bool = Field(
        True, description="fix the weight-normalised last layer's norm g at 1 (True in the paper: steadier "
                          "training; False lets g train, better for ViT-S with a careful recipe)",
    )
    student_temp: float = Field(0.1, gt=0, allow_inf_nan=False, description="student temperature (0.1 in the paper)")
    warmup_teacher_temp: float = Field(
        0.04, gt=0, allow_inf_nan=False,
        description="teacher temperature at epoch 0 of the linear warm-up (0.04 in the paper)",
    )
    teacher_temp: float = Field(
        0.04, gt=0, allow_inf_nan=False,
        description="teacher temperature after the warm-up (0.04 is the official default; the ViT-S/16 300-epoch "
                    "run uses 0.07 warmed up over 30 epochs; above 0.07 training tends to be unstable)",
    )
    warmup_teacher_temp_epochs: int = Field(
        0, ge=0,
        description="epochs of the teacher temperature's linear warm-up, np.linspace(warmup_teacher_temp, "
                    "teacher_temp, n) as in the official code (0 is the official default: teacher_temp from the "
                    "start; 30 in the ViT-S/16 300-epoch run)",
    )
    center_momentum: float = Field(
        0.9, ge=0, lt=1, allow_inf_nan=False,
        description="momentum of the centre's running mean of the teacher outputs over the global batch (0.9 in "
                    "the paper)",
    )
    base_momentum: float = Field(
        0.996, ge=0, le=1, allow_inf_nan=False,
        description="teacher EMA momentum at the start of the line (0.996 in the paper); rises to final_momentum "
                    "on a cosine over the line",
    )
    final_momentum: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False, description="teacher EMA momentum at the end of the line (1.0 in the paper)"
    )
    freeze_last_layer: int = Field(
        1, ge=0,
        description="epochs at the start during which the head's last layer gets no update (its gradients are "
                    "cancelled; 1 in the paper; 0 never freezes)",
    )
    clip_grad: float = Field(
        3.0, ge=0, allow_inf_nan=False,
        description="maximal L2 norm of each parameter's gradient, clipped parameter by parameter as the "
                    "official clip_gradients (3.0 in the paper); 0 turns clipping off",
    )
    online_epoch_steps: int = Field(
        0, ge=0,
        description="optimizer steps that count as one epoch for the epoch-based schedules when the loop gives no "
                    "steps_per_epoch (online streams; no paper value); 0 means no epochs online: the warm-ups are "
                    "taken as done (teacher_temp, last layer trainable)",
    )

    @model_validator(mode="after")
    def _momentum_rises(self) -> "DINOConfig":
        if self.final_momentum < self.base_momentum:
            raise ValueError(
                f"final_momentum ({self.final_momentum}) must be >= base_momentum ({self.base_momentum}): "
                "the teacher should slow down over the line, not speed up"
            )
        return self


_DEFAULTS = DINOConfig()


# ---------------------------------------------------------------------------------------------- schedules
def teacher_temperature(epoch: int, warmup_temp: float = _DEFAULTS.warmup_teacher_temp,
                        final_temp: float = _DEFAULTS.teacher_temp,
                        warmup_epochs: int = _DEFAULTS.warmup_teacher_temp_epochs) -> float:
    """The teacher temperature at `epoch`: `np.linspace(warmup_temp, final_temp, warmup_epochs)[epoch]` during the
    warm-up (so epoch warmup_epochs - 1 already has `final_temp`), `final_temp` after it (the official schedule)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)


def model_epoch(ctx: StepContext, online_epoch_steps: int = 0) -> int | None:
    """The current model's epoch at `ctx`: `ctx.model_epochs` when the loop counts epochs (the chunk loop: never
    decreasing, whatever the chunks' sizes); else `ctx.model_step // ctx.steps_per_epoch`; with no
    `steps_per_epoch` (online) `ctx.model_step // online_epoch_steps`, or None (no epochs: warm-ups count as done)
    when that is 0."""
    if ctx.model_epochs is not None:
        return ctx.model_epochs
    per_epoch = ctx.steps_per_epoch or online_epoch_steps
    if not per_epoch:
        return None
    return ctx.model_step // per_epoch


# ---------------------------------------------------------------------------------------------- the loss
def _check_outputs(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor) -> tuple[int, int]:
    if len(teacher) < 1:
        raise ValueError("dino_loss needs at least one teacher (global) view")
    if len(student) < len(teacher):
        raise ValueError(f"dino_loss: the student must see every teacher view first (then the local ones): got "
                         f"{len(student)} student views for {len(teacher)} teacher views")
    if len(student) < 2:
        raise ValueError("dino_loss needs at least 2 student views (a teacher view is never compared to itself)")
    shape = tuple(teacher[0].shape)
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"dino_loss: outputs must be non-empty [B, K], got {shape}")
    for kind, group in (("student", student), ("teacher", teacher)):
        for i, out in enumerate(group):
            if tuple(out.shape) != shape:
                raise ValueError(f"dino_loss: {kind} output {i} has shape {tuple(out.shape)}, expected {shape}")
    if tuple(center.shape) not in ((shape[1],), (1, shape[1])):
        raise ValueError(f"dino_loss: center must be [{shape[1]}] or [1, {shape[1]}], got {tuple(center.shape)}")
    return shape


def _check_temperature(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def dino_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor,
              student_temp: float = _DEFAULTS.student_temp, teacher_temp: float = _DEFAULTS.teacher_temp,
              reduction: str = "mean", local_weight: float | None = None) -> Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student (paper eq. 3 and algorithm 1).

    For teacher view i and student view j != i: H(i, j) = sum_k -P_t(i)_k log P_s(j)_k with
    P_t(i) = softmax((t_i - c) / teacher_temp) (no gradient) and P_s(j) = softmax(s_j / student_temp); the loss
    is the mean over the pairs (i, j) and the images.

    Args:
        student: `[B, K]` logits of every student view, the teacher's views first in the same order (then locals).
        teacher: `[B, K]` logits of the teacher's (global) views; used detached.
        center: `[K]` or `[1, K]`, the running centre of the teacher outputs.
        reduction: "mean" -> scalar; "none" -> `[B]`, each image's mean over its pairs (its mean is the loss).
        local_weight: None for the plain mean over the pairs; else the pairs whose student view is local (j >=
            len(teacher)) share this weight and the global pairs 1 - local_weight, each group averaged
            (`weigh_view_terms`; the plain mean is local_weight = L / (G - 1 + L) for G global, L local views).

    Computed in float32 (at least) even under autocast. No cross-rank communication: the loss is a mean of
    per-image terms, so DDP's gradient averaging gives the global-batch gradient.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_temperature("student_temp", student_temp)
    _check_temperature("teacher_temp", teacher_temp)
    _check_outputs(student, teacher, center)
    dtype = torch.promote_types(student[0].dtype, torch.float32)
    with torch.autocast(student[0].device.type, enabled=False):
        c = center.detach().to(dtype).reshape(1, -1)
        targets = [F.softmax((t.detach().to(dtype) - c) / teacher_temp, dim=-1) for t in teacher]
        log_probs = [F.log_softmax(s.to(dtype) / student_temp, dim=-1) for s in student]
        pairs = [(i, j) for i in range(len(targets)) for j in range(len(log_probs)) if j != i]
        terms = [-(targets[i] * log_probs[j]).sum(dim=-1) for i, j in pairs]
        per_sample = weigh_view_terms(terms, [j >= len(teacher) for _, j in pairs], local_weight)
    return per_sample.mean() if reduction == "mean" else per_sample


@torch.no_grad()
def updated_center(center: Tensor, teacher: Sequence[Tensor], momentum: float = _DEFAULTS.center_momentum) -> Tensor:
    """m * center + (1 - m) * the mean of the teacher outputs over the GLOBAL batch (all views, all ranks).

    The mean is all-reduced, so every rank gets the same centre; every rank must pass the same number of rows.
    Returns a new `[1, K]` float tensor in the centre's dtype; `center` is untouched.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"center momentum must be in [0, 1), got {momentum!r}")
    if not teacher:
        raise ValueError("updated_center needs at least one teacher output")
    rows = torch.cat([t.detach().float() for t in teacher])
    if rows.dim() != 2 or rows.shape[1] != center.numel():
        raise ValueError(f"updated_center: teacher outputs must be [B, {center.numel()}], got {tuple(rows.shape)}")
    batch_center = all_reduce_mean(rows.mean(dim=0, keepdim=True))
    return (center.float().reshape(1, -1) * momentum + batch_center * (1 - momentum)).to(center.dtype)


# ---------------------------------------------------------------------------------------------- the head
class NormedLinear(nn.Module):
    """A bias-free weight-normalised Linear, y = x (g * v / ||v||)^T with one norm g per output row.

    The rows are normalised in `forward` (what `torch.nn.utils.parametrizations.weight_norm` with dim 0 does);
    g starts at 1 and stays there when `train_norm` is False (DINO's norm_last_layer).
    """

    def __init__(self, in_dim: int, out_dim: int, train_norm: bool = False) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_norm)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) -> L2-normalised bottleneck -> weight-normalised last layer to `out_dim` logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            modules.append(nn.Linear(width, hidden_dim))
            if use_bn:
                modules.append(nn.BatchNorm1d(hidden_dim))
            modules.append(nn.GELU())
            width = hidden_dim
        modules.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp:
            if isinstance(module, nn.Linear):  # the official init: truncated normal, std 0.02, zero bias
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = NormedLinear(bottleneck_dim, out_dim, train_norm=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# ---------------------------------------------------------------------------------------------- the method
class DINO(Method):
    """Student backbone + DINO head, EMA teacher of both, centred and sharpened self-distillation.

    Views of one resolution go through the backbone in one pass (the official multi-crop wrapper), so the global
    views share their BatchNorm statistics, and so do the local ones. Options: `DINOConfig`.
    """

    Config = DINOConfig
    name = "dino"
    needs_local_views = True
    min_global_views = 2

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, options)
        cfg = self.config
        self.base_momentum = cfg.base_momentum
        self.final_momentum = cfg.final_momentum
        self.head = DINOHead(self.feature_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             cfg.use_bn, cfg.norm_last_layer)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    # ------------------------------------------------------------------ schedules
    def epoch(self, ctx: StepContext) -> int | None:
        return model_epoch(ctx, self.config.online_epoch_steps)

    def teacher_temp_at(self, ctx: StepContext) -> float:
        cfg = self.config
        epoch = self.epoch(ctx)
        if epoch is None:  # no epochs (online without online_epoch_steps): the warm-up counts as done
            return cfg.teacher_temp
        return teacher_temperature(epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)

    def last_layer_frozen(self, ctx: StepContext) -> bool:
        epoch = self.epoch(ctx)
        return epoch is not None and epoch < self.config.freeze_last_layer

    # ------------------------------------------------------------------ the step
    @staticmethod
    def _by_resolution(views: list[Tensor], encoder: nn.Module) -> Tensor:
        """Features of every view, concatenated in order, one encoder pass per run of equal-size views."""
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(encoder(torch.cat(views[start:end])))
            start = end
        return torch.cat(features)

    def training_step(self, views: ViewSet, batch: Batch, ctx: StepContext) -> StepOutput:
        check_views("DINO", views, min_global=self.min_global_views, need_local=self.needs_local_views)
        # One head pass over every view, split at the bottleneck: its output is the embedding CaSSLe distils.
        bottleneck = self.head.mlp(self._by_resolution(views.all, self.backbone))
        student = list(self.head.last_layer(F.normalize(bottleneck, dim=-1)).chunk(len(views.all)))
        with torch.no_grad():
            teacher = list(self.teacher_head(self._by_resolution(views.global_, self.teacher_backbone))
                           .chunk(len(views.global_)))
        temp = self.teacher_temp_at(ctx)
        per_sample = dino_loss(student, teacher, self.center, self.config.student_temp, temp, reduction="none",
                               local_weight=views.local_weight)
        # The loss used the centre before this batch; then the centre takes in the global batch's teacher outputs.
        self.center.copy_(updated_center(self.center, teacher, self.config.center_momentum))
        return StepOutput(per_sample.mean(), per_sample.detach(), {"teacher_temp": torch.tensor(temp)},
                          embeddings=list(bottleneck.chunk(len(views.all))[: len(views.global_)]))

    # ------------------------------------------------------------------ continual distillation (CaSSLe)
    def embedder(self) -> nn.Module:
        """Backbone + the head's MLP: the bottleneck (the 65536-way logits would make CaSSLe's predictor huge)."""
        return nn.Sequential(self.backbone, self.head.mlp)

    @property
    def embedding_dim(self) -> int:
        return self.config.bottleneck_dim

    def distill_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """DINO's cross-entropy with the frozen model as the teacher, the analogue of the paper's code
        ("knowledge" distiller, its SwAV/DINO-style loss): H(softmax(W z^ / teacher_temp), softmax(W p^ /
        student_temp)) over L2-normalised bottlenecks, W the current last layer, detached (the distillation does
        not move it). No centring: the centre keeps an EMA teacher from collapsing, and the frozen one cannot."""
        if p.dim() != 2 or p.shape != z.shape:
            raise ValueError(f"p and z must both be [B, D] with equal shapes, got {tuple(p.shape)} and "
                             f"{tuple(z.shape)}")
        cfg = self.config
        with torch.autocast(p.device.type, enabled=False):
            dtype = torch.promote_types(p.dtype, torch.float32)
            w = self.head.last_layer.weight.detach().to(dtype)
            target = F.softmax(F.normalize(z.detach().to(dtype), dim=-1) @ w.T / cfg.teacher_temp, dim=-1)
            log_pred = F.log_softmax(F.normalize(p.to(dtype), dim=-1) @ w.T / cfg.student_temp, dim=-1)
            return -(target * log_pred).sum(dim=-1).mean()

    # ------------------------------------------------------------------ hooks
    def on_after_backward(self, ctx: StepContext) -> None:
        """Clip each student gradient to `clip_grad` (per parameter), then cancel the last layer's gradients
        (grad None: the optimizer skips it, no weight decay or momentum) while it is frozen."""
        clip = self.config.clip_grad
        if clip > 0:
            with torch.no_grad():
                for param in self.parameters():
                    if param.grad is not None:
                        coef = clip / (param.grad.norm(2) + 1e-6)
                        param.grad.mul_(coef.clamp(max=1.0))
        if self.last_layer_frozen(ctx):
            for param in self.head.last_layer.parameters():
                param.grad = None


__all__ = ["DINO", "DINOConfig", "DINOHead", "NormedLinear", "dino_loss", "model_epoch", "teacher_temperature",
           "updated_center"]
