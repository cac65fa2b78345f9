"""Linear mode connectivity of two representations: kNN accuracy along the straight line between two sets of
weights (consecutive chunks' checkpoints), to see whether they lie in one basin (Frankle et al. 2020).

Usage::

    from evaluators.interpolation import interpolation_curve
    curve = interpolation_curve(state_chunk0, state_chunk1, lambda: build_backbone("resnet18", 32), bank, query)
    curve.alphas, curve.accuracies, curve.barrier  # one basin when the barrier is ~0

Accuracy is measured as in `evaluators.sharpness` (kNN of the query against the bank, backbone in eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from evaluators.sharpness import BatchesFn, KnnEvaluator, SharpnessConfig, check_callable
from trainers.config import ComponentConfig

__all__ = ["InterpolationConfig", "InterpolationCurve", "interpolate_state", "interpolation_curve"]


class InterpolationConfig(ComponentConfig):
    """The spec's `eval.interpolation` options (the kNN settings are `eval.knn`'s)."""

    points: int = Field(11, ge=2, description="evenly spaced alphas in [0, 1], both ends included")


@dataclass(frozen=True)
class InterpolationCurve:
    """kNN ``accuracies[i]`` of the weights ``(1 - alphas[i]) * theta_a + alphas[i] * theta_b``."""

    alphas: tuple[float, ...]
    accuracies: tuple[float, ...]

    @property
    def barrier(self) -> float:
        """Largest fall below the straight line between the endpoint accuracies,
        ``max_i ((1 - a_i) acc_0 + a_i acc_1 - acc_i)`` (Frankle et al. 2020); >= 0, about 0 in one basin."""
        first, last = self.accuracies[0], self.accuracies[-1]
        return max((1 - a) * first + a * last - acc for a, acc in zip(self.alphas, self.accuracies))

    def to_dict(self) -> dict[str, Any]:
        return {"alphas": list(self.alphas), "accuracies": list(self.accuracies), "barrier": self.barrier}


def interpolate_state(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """``(1 - alpha) * a + alpha * b`` for every floating-point tensor (parameters and float buffers alike, in
    their own dtype, on CPU); integer and bool tensors (e.g. ``num_batches_tracked``) are taken from ``a``.
    ``alpha`` 0 and 1 give ``a`` and ``b`` exactly (for finite tensors).

    Raises:
        ValueError: ``alpha`` is not a finite number, or the two states differ in keys, shapes or dtypes
            (the message names the key).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    _check_states(state_a, state_b)
    out: dict[str, Tensor] = {}
    for key, a in state_a.items():
        a = a.detach().cpu()
        if a.is_floating_point():
            b = state_b[key].detach().cpu()
            out[key] = (1.0 - alpha) * a + alpha * b
        else:
            out[key] = a.clone()
    return out


def interpolation_curve(
    backbone_a_state: Mapping[str, Tensor],
    backbone_b_state: Mapping[str, Tensor],
    make_backbone: Callable[[], nn.Module],
    bank_batches_fn: BatchesFn,
    query_batches_fn: BatchesFn,
    *,
    points: int = 11,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    device: str | torch.device = "cpu",
) -> InterpolationCurve:
    """kNN accuracy along ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b``, ``alpha`` in
    ``linspace(0, 1, points)`` (see :func:`interpolate_state` for which tensors are interpolated).

    Args:
        backbone_a_state, backbone_b_state: ``state_dict()`` of two backbones of the same architecture.
        make_backbone: zero-arg callable building that architecture; called once, the result is moved to ``device``
            and every ``theta(alpha)`` is loaded into it (strictly: every key must match).
        bank_batches_fn, query_batches_fn: as for :func:`sharpness`.
        points: number of alphas, >= 2 (both endpoints included).
        knn_k, knn_temperature: the kNN vote.

    Raises:
        ValueError: ``points`` < 2, the states differ (the key is named) or do not fit ``make_backbone()``'s module,
            a kNN option out of range, or a batch function that is not callable or yields bad batches.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2 (both endpoints), got {points!r}")
    cfg = SharpnessConfig.parse("interpolation_curve", knn_k=knn_k, knn_temperature=knn_temperature)
    check_callable("bank_batches_fn", bank_batches_fn)
    check_callable("query_batches_fn", query_batches_fn)
    check_callable("make_backbone", make_backbone)
    _check_states(backbone_a_state, backbone_b_state)
    device = torch.device(device)
    backbone = make_backbone()
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"make_backbone must return an nn.Module, got {type(backbone).__name__}")
    backbone = backbone.to(device)
    evaluate = KnnEvaluator(bank_batches_fn, query_batches_fn, cfg.knn_k, cfg.knn_temperature, device)

    alphas = tuple(float(a) for a in np.linspace(0.0, 1.0, points))
    accuracies = []
    for alpha in alphas:
        try:
            backbone.load_state_dict(interpolate_state(backbone_a_state, backbone_b_state, alpha), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"the states do not fit make_backbone()'s module: {exc}") from None
        accuracies.append(evaluate(backbone)[0])
    return InterpolationCurve(alphas=alphas, accuracies=tuple(accuracies))


def _check_states(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    for name, state in (("backbone_a_state", state_a), ("backbone_b_state", state_b)):
        if not isinstance(state, Mapping):
            raise ValueError(f"{name} must be a state_dict (a mapping of names to tensors), got {type(state).__name__}")
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
    only_a = [k for k in state_a if k not in state_b]
    only_b = [k for k in state_b if k not in state_a]
    if only_a:
        raise ValueError(f"key {only_a[0]!r} is in backbone_a_state but not in backbone_b_state"
                         + (f" (and {len(only_a) - 1} more)" if len(only_a) > 1 else ""))
    if only_b:
        raise ValueError(f"key {only_b[0]!r} is in backbone_b_state but not in backbone_a_state"
                         + (f" (and {len(only_b) - 1} more)" if len(only_b) > 1 else ""))
    for key, a in state_a.items():
        b = state_b[key]
        if a.shape != b.shape:
            raise ValueError(f"key {key!r} has shape {tuple(a.shape)} in backbone_a_state but {tuple(b.shape)} "
                             "in backbone_b_state")
        if a.dtype != b.dtype:
            raise ValueError(f"key {key!r} has dtype {a.dtype} in backbone_a_state but {b.dtype} in backbone_b_state")
