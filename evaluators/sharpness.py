"""Sharpness of a pre-trained representation: how much its kNN accuracy falls under a bounded weight perturbation,
(the kNN accuracy along the straight line between two sets of weights is in `evaluators.interpolation`).

Usage::

    from evaluators.sharpness import SharpnessConfig, sharpness
    bank = lambda: loader(train_split)            # zero-arg: a fresh iterable of (uint8 [B,3,H,W], int64 [B])
    query = lambda: loader(test_split)
    result = sharpness(backbone, bank, query, epsilons=(0.1, 0.3), search_steps=5, restarts=4, seed=0,
                       device="cuda")
    result.points[0].relative_drop                # (acc(theta) - acc(theta + z)) / acc(theta) at eps = 0.1
    json.dump(result.to_dict(), f)

Accuracy is the top-1 of :func:`evaluators.knn.knn_predict` for the query features against the bank features, both
from :func:`evaluators.features.extract_features` with the (perturbed) backbone in eval mode, so BatchNorm uses its
running statistics. The batch functions are called again for every evaluation; they must yield the same data each
time.

The bound: **one global L2 ball** relative to the weights, ``||z||_2 <= eps * ||theta||_2``, where ``theta`` is
every floating-point *parameter* of the backbone concatenated (buffers such as BatchNorm running statistics are
never perturbed). It is not per tensor: the search may spend the whole budget on a few tensors.

The search (kNN accuracy has no gradient, so a differentiable surrogate picks directions), per ``eps``:

1. ascent: ``z_0 = 0``; for ``t = 1..search_steps``: class prototypes ``P`` are the re-normalised mean of the
   L2-normalised bank features of each class at ``theta + z_{t-1}``; ``g`` is the gradient w.r.t. the weights of
   the surrogate ``cross_entropy(L, y)`` averaged over the bank (``P`` held fixed), where ``S = normalize(f(x)) @
   P.T`` are a batch's cosines to the prototypes and ``L = (S - rowmean(S)) / rms(S - rowmean(S))`` (RMS over the
   whole batch). The standardisation matters: with a fixed temperature the loss rises towards ``log C`` simply by
   shrinking all features' angular spread together, which leaves the kNN ranking, hence its accuracy, unchanged.
   Then ``z_t = project(z_{t-1} + step_size * r * g / ||g||)`` with ``r = eps * ||theta||`` and ``project``
   rescaling onto the ball when outside it. Every ``z_t`` is a candidate. The ascent stops early when ``g`` is
   zero or not finite (a one-row batch with two classes always has logits +-1, hence no gradient: use batches of
   several rows).
2. random: ``restarts`` Gaussian directions, drawn from a CPU generator seeded with ``seed`` (restart ``i`` is the
   i-th draw, the same direction for every eps), scaled onto the ball's surface ``||z|| = r``. These keep the result
   a valid lower bound on the worst case even where the surrogate's gradient is useless.

The true kNN accuracy is evaluated at every candidate and the lowest one is reported. ``z = 0`` lies in the ball,
so when every candidate scores at least the unperturbed accuracy the reported drop is 0 with norm ratio 0 (source
``"unperturbed"``). The reported norm ratio is measured on the weights actually loaded, ``||(theta + z) - theta||``
in float64, so it includes float32 rounding (~1e-7). The result is a lower bound on the true worst-case drop:
a better search can only find more damage.

The backbone is restored bit for bit afterwards (parameters, buffers, ``requires_grad`` flags and train/eval modes),
also when a batch is rejected; its ``.grad`` fields are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from evaluators.features import extract_features
from evaluators.knn import knn_predict
from trainers.config import ComponentConfig
from trainers.views.augment import normalize

__all__ = [
    "SharpnessCandidate",
    "SharpnessConfig",
    "SharpnessPoint",
    "SharpnessResult",
    "sharpness",
]

BatchesFn = Callable[[], Iterable[tuple[Tensor, Tensor]]]

_Epsilon = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class SharpnessConfig(ComponentConfig):
    """The options of :func:`sharpness` (the keyword names match, so ``sharpness(..., **cfg.model_dump())``)."""

    epsilons: tuple[_Epsilon, ...] = Field(
        (0.1, 0.3), min_length=1,
        description="ball radii relative to the weights: ||z||_2 <= eps * ||theta||_2 over all float parameters",
    )
    search_steps: int = Field(5, ge=0, description="projected gradient-ascent steps on the surrogate, per eps")
    restarts: int = Field(4, ge=1, description="random directions on the ball's surface, per eps")
    step_size: float = Field(
        0.5, gt=0, le=1, allow_inf_nan=False, description="ascent step as a fraction of the ball radius eps * ||theta||"
    )
    knn_k: int = Field(20, ge=1, description="neighbours per query of the kNN accuracy")
    knn_temperature: float = Field(
        0.07, gt=0, allow_inf_nan=False, description="T of the kNN vote exp(cos / T)"
    )

    @field_validator("epsilons", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        # A spec read from YAML gives a list; strict mode would refuse it for a tuple.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("epsilons")
    @classmethod
    def _distinct(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"epsilons must be distinct, got {list(value)}")
        return value


@dataclass(frozen=True)
class SharpnessCandidate:
    """One evaluated perturbation: ``source`` ``"ascent"`` (``index`` = step, from 1) or ``"random"``
    (``index`` = restart, from 0); its kNN ``accuracy`` and measured ``norm_ratio`` ``||z|| / ||theta||``."""

    source: str
    index: int
    accuracy: float
    norm_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "index": self.index, "accuracy": self.accuracy, "norm_ratio": self.norm_ratio}


@dataclass(frozen=True)
class SharpnessPoint:
    """The result at one radius ``epsilon``.

    ``worst_accuracy`` is ``min(base_accuracy, candidate accuracies)``; ``relative_drop`` is
    ``(base_accuracy - worst_accuracy) / base_accuracy`` (NaN when ``base_accuracy`` is 0); ``norm_ratio`` and
    ``worst_source`` / ``worst_index`` describe the candidate that scored it (0, ``"unperturbed"`` and -1 when no
    candidate did worse than the unperturbed weights). ``num_candidates`` counts the candidates evaluated.
    """

    epsilon: float
    base_accuracy: float
    worst_accuracy: float
    relative_drop: float
    norm_ratio: float
    worst_source: str
    worst_index: int
    candidates: tuple[SharpnessCandidate, ...]

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; a NaN relative drop is written as None."""
        drop = None if math.isnan(self.relative_drop) else self.relative_drop
        return {
            "epsilon": self.epsilon, "base_accuracy": self.base_accuracy, "worst_accuracy": self.worst_accuracy,
            "relative_drop": drop, "norm_ratio": self.norm_ratio, "worst_source": self.worst_source,
            "worst_index": self.worst_index, "num_candidates": self.num_candidates,
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass(frozen=True)
class SharpnessResult:
    """One :class:`SharpnessPoint` per requested epsilon, in the order given; ``param_norm`` is ``||theta||_2``."""

    base_accuracy: float
    param_norm: float
    points: tuple[SharpnessPoint, ...]

    def point(self, epsilon: float) -> SharpnessPoint:
        for point in self.points:
            if point.epsilon == epsilon:
                return point
        raise ValueError(f"epsilon {epsilon!r} was not measured; measured: {[p.epsilon for p in self.points]}")

    def to_dict(self) -> dict[str, Any]:
        return {"base_accuracy": self.base_accuracy, "param_norm": self.param_norm,
                "points": [p.to_dict() for p in self.points]}


def sharpness(
    backbone: nn.Module,
    bank_batches_fn: BatchesFn,
    query_batches_fn: BatchesFn,
    *,
    epsilons: Sequence[float] = (0.1, 0.3),
    search_steps: int = 5,
    restarts: int = 4,
    step_size: float = 0.5,
    seed: int = 0,
    accuracy: str = "knn",
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    device: str | torch.device = "cpu",
) -> SharpnessResult:
    """Relative kNN-accuracy drop under the worst perturbation found with ``||z||_2 <= eps ||theta||_2``, per eps.

    Args:
        backbone: module mapping float ``[B,3,H,W]`` to ``[B,D]``, already on ``device``; modified during the call
            and restored bit for bit before it returns.
        bank_batches_fn: zero-arg callable returning a fresh iterable of ``(uint8 images, int64 labels)``: the kNN
            bank, also the data the surrogate's gradient is taken on.
        query_batches_fn: the same for the rows whose kNN accuracy is measured.
        epsilons: distinct radii in (0, 1], relative to ``||theta||_2`` (see the module docstring).
        search_steps: projected gradient-ascent steps per eps, >= 0.
        restarts: random directions on the ball's surface per eps, >= 1.
        step_size: ascent step as a fraction of the radius, in (0, 1].
        seed: seeds the random directions (the ascent itself draws nothing).
        accuracy: the downstream protocol; only ``"knn"``.
        knn_k, knn_temperature: the kNN vote (:func:`evaluators.knn.knn_predict`).
        device: where the forward and backward passes run.

    Returns:
        :class:`SharpnessResult`; each point holds every candidate evaluated.

    Raises:
        ValueError: an option out of range (named), a batch function that is not callable or yields bad batches,
            a backbone without floating-point parameters or with all of them zero, or on another device.
    """
    cfg = SharpnessConfig.parse(
        "sharpness", epsilons=tuple(epsilons) if isinstance(epsilons, (list, tuple)) else epsilons,
        search_steps=search_steps, restarts=restarts, step_size=step_size, knn_k=knn_k,
        knn_temperature=knn_temperature,
    )
    if accuracy != "knn":
        raise ValueError(f"accuracy must be 'knn' (the only protocol implemented), got {accuracy!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    check_callable("bank_batches_fn", bank_batches_fn)
    check_callable("query_batches_fn", query_batches_fn)
    device = torch.device(device)
    params = [p for p in backbone.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError("backbone has no floating-point parameters to perturb")

    evaluate = KnnEvaluator(bank_batches_fn, query_batches_fn, cfg.knn_k, cfg.knn_temperature, device)
    saved_state = {name: t.detach().clone() for name, t in backbone.state_dict(keep_vars=True).items()}
    live_state = backbone.state_dict(keep_vars=True)
    saved_grad_flags = [(p, p.requires_grad) for p in backbone.parameters()]
    saved_modes = [(m, m.training) for m in backbone.modules()]
    theta = [p.detach().clone() for p in params]
    theta_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in theta))
    if theta_norm == 0.0:
        raise ValueError("backbone's floating-point parameters are all zero: a relative radius is undefined")

    try:
        base_acc, base_bank = evaluate(backbone)
        per_eps: list[list[SharpnessCandidate]] = [[] for _ in cfg.epsilons]

        base_grad: list[Tensor] | None = None
        for slot, eps in enumerate(cfg.epsilons):
            radius = eps * theta_norm
            z = [torch.zeros_like(t, dtype=_work_dtype(t)) for t in theta]
            bank = base_bank
            for step in range(1, cfg.search_steps + 1):
                if step == 1:  # the same point (theta) for every eps: take its gradient once
                    if base_grad is None:
                        _apply(params, theta, None)
                        base_grad = _surrogate_grad(backbone, params, bank_batches_fn, bank, device)
                    grad = base_grad
                else:
                    grad = _surrogate_grad(backbone, params, bank_batches_fn, bank, device)
                grad_norm = _global_norm(grad)
                if not math.isfinite(grad_norm) or grad_norm == 0.0:
                    break
                scale = cfg.step_size * radius / grad_norm
                z = [zi + scale * gi.to(zi.dtype) for zi, gi in zip(z, grad)]
                z = _project(z, radius)
                _apply(params, theta, z)
                acc, bank = evaluate(backbone)
                per_eps[slot].append(SharpnessCandidate("ascent", step, acc, _norm_ratio(params, theta, theta_norm)))

        generator = torch.Generator().manual_seed(seed)
        for restart in range(cfg.restarts):
            direction = [torch.randn(t.shape, generator=generator, dtype=torch.float32) for t in theta]
            unit = 1.0 / _global_norm(direction)
            direction = [(d * unit).to(device=t.device, dtype=_work_dtype(t)) for d, t in zip(direction, theta)]
            for slot, eps in enumerate(cfg.epsilons):
                radius = eps * theta_norm
                _apply(params, theta, [d * radius for d in direction])
                acc, _ = evaluate(backbone)
                per_eps[slot].append(
                    SharpnessCandidate("random", restart, acc, _norm_ratio(params, theta, theta_norm))
                )
    finally:
        with torch.no_grad():
            for name, tensor in live_state.items():
                tensor.copy_(saved_state[name])
        for param, flag in saved_grad_flags:
            param.requires_grad_(flag)
        for module, training in saved_modes:
            module.training = training

    points = tuple(_summarise(eps, base_acc, cands) for eps, cands in zip(cfg.epsilons, per_eps))
    return SharpnessResult(base_accuracy=base_acc, param_norm=theta_norm, points=points)


class KnnEvaluator:
    """kNN top-1 of the query against the bank with the backbone as it is now; also returns the bank features."""

    def __init__(self, bank_fn: BatchesFn, query_fn: BatchesFn, k: int, temperature: float, device: torch.device):
        self.bank_fn, self.query_fn = bank_fn, query_fn
        self.k, self.temperature, self.device = k, temperature, device

    def __call__(self, backbone: nn.Module) -> tuple[float, tuple[Tensor, Tensor]]:
        bank_x, bank_y = extract_features(backbone, self.bank_fn(), device=self.device)
        query_x, query_y = extract_features(backbone, self.query_fn(), device=self.device)
        preds = knn_predict(bank_x, bank_y, query_x, k=self.k, temperature=self.temperature)
        return (preds == query_y).double().mean().item(), (bank_x, bank_y)


def _surrogate_grad(
    backbone: nn.Module,
    params: list[nn.Parameter],
    bank_fn: BatchesFn,
    bank: tuple[Tensor, Tensor],
    device: torch.device,
) -> list[Tensor]:
    """Gradient w.r.t. ``params`` of the mean prototype cross-entropy over the bank, prototypes from ``bank``
    (features at the current weights) held fixed, logits standardised per batch (see the module docstring).
    Eval mode, batch by batch (memory of one batch)."""
    feats, labels = bank
    num_classes = int(labels.max()) + 1
    unit = F.normalize(feats, dim=1)
    protos = torch.zeros(num_classes, unit.shape[1]).index_add_(0, labels, unit)
    protos = F.normalize(protos, dim=1).to(device)  # empty classes stay at zero (logit 0)

    grads = [torch.zeros_like(p, dtype=_work_dtype(p)) for p in params]
    rows = 0
    backbone.eval()
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        for images, targets in bank_fn():
            out = backbone(normalize(images.to(device)))
            sims = F.normalize(out.float(), dim=1) @ protos.T  # [B, C] cosines
            centred = sims - sims.mean(dim=1, keepdim=True)
            # Unit RMS over the batch: shrinking every feature's angular spread alike (which leaves the kNN
            # ranking, hence the accuracy, as it is) cannot raise the loss; with a fixed temperature it does.
            logits = centred / centred.pow(2).mean().sqrt().clamp_min(1e-12)
            loss = F.cross_entropy(logits, targets.to(device, torch.int64), reduction="sum")
            parts = torch.autograd.grad(loss, params, allow_unused=True)
            for total, part in zip(grads, parts):
                if part is not None:
                    total.add_(part.to(total.dtype))
            rows += images.shape[0]
    return [g / rows for g in grads]


def _work_dtype(t: Tensor) -> torch.dtype:
    """Perturbations are computed in at least float32, whatever the parameter's dtype."""
    return torch.promote_types(t.dtype, torch.float32)


def _global_norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _project(z: list[Tensor], radius: float) -> list[Tensor]:
    norm = _global_norm(z)
    return [zi * (radius / norm) for zi in z] if norm > radius else z


def _apply(params: list[nn.Parameter], theta: list[Tensor], z: list[Tensor] | None) -> None:
    with torch.no_grad():
        for p, t, zi in zip(params, theta, z if z is not None else [None] * len(params)):
            p.copy_(t if zi is None else (t.to(zi.dtype) + zi).to(p.dtype))


def _norm_ratio(params: list[nn.Parameter], theta: list[Tensor], theta_norm: float) -> float:
    """``||params - theta|| / ||theta||`` in float64 on the weights as loaded."""
    with torch.no_grad():
        return _global_norm([p.detach().double() - t.double() for p, t in zip(params, theta)]) / theta_norm


def _summarise(eps: float, base_acc: float, candidates: list[SharpnessCandidate]) -> SharpnessPoint:
    worst = min(candidates, key=lambda c: c.accuracy)  # first among equals, in evaluation order
    if worst.accuracy < base_acc:
        worst_acc, ratio, source, index = worst.accuracy, worst.norm_ratio, worst.source, worst.index
    else:
        worst_acc, ratio, source, index = base_acc, 0.0, "unperturbed", -1
    drop = (base_acc - worst_acc) / base_acc if base_acc > 0 else math.nan
    return SharpnessPoint(epsilon=eps, base_accuracy=base_acc, worst_accuracy=worst_acc, relative_drop=drop,
                          norm_ratio=ratio, worst_source=source, worst_index=index, candidates=tuple(candidates))


def check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise ValueError(f"{name} must be a zero-arg callable (returning a fresh iterable of batches), "
                         f"got {type(fn).__name__}")
