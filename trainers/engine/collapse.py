"""Representation collapse: detect it, and stop a line with an error naming where it happened.

    std = normalised_feature_std(z)                    # mean over dimensions of the std of L2-normalised rows
    check_collapse(z, ratio=0.1, method="us3l", width=0.25, step=120)   # RepresentationCollapseError below

Healthy features spread over the unit sphere have a per-dimension std of about 1 / sqrt(d) (SimSiam, Chen & He
2021, Fig. 2); a collapsed representation (every image mapped to the same point) has 0. The check flags a std
below `ratio / sqrt(d)`.

The error subclasses `NonFiniteLossError` on purpose: the runners already stop a line on that error without
retrying it (a retry from the same checkpoint collapses again) and record its message; collapse is the same kind
of deterministic failure. Under torch.distributed the statistic is computed on the gathered batch, so every rank
reaches the same verdict and raises together (no rank is left waiting in a collective).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.engine.distributed import gather
from trainers.engine.step import NonFiniteLossError


class RepresentationCollapseError(NonFiniteLossError):
    """The features collapsed; the message names the method, the width and the step; the attributes hold them."""

    def __init__(self, message: str, *, method: str, width: float | None, step: int, std: float,
                 threshold: float) -> None:
        super().__init__(message)
        self.method, self.width, self.step, self.std, self.threshold = method, width, step, std, threshold


@torch.no_grad()
def normalised_feature_std(z: Tensor) -> float:
    """Mean over the d dimensions of the standard deviation over rows of the L2-normalised rows of `z` `[N, d]`."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"normalised_feature_std needs [N, d] features with N >= 2, got {tuple(z.shape)}")
    return float(F.normalize(z.detach().float(), dim=1).std(dim=0).mean())


def collapse_threshold(dim: int, ratio: float) -> float:
    """`ratio / sqrt(dim)`: `ratio` times the std of features spread uniformly on the sphere."""
    return ratio / math.sqrt(dim)


@torch.no_grad()
def check_collapse(z: Tensor, ratio: float, *, method: str, step: int, width: float | None = None) -> float:
    """Raise RepresentationCollapseError when `z`'s (gathered over ranks) normalised std is below
    `ratio / sqrt(d)`; returns the std otherwise."""
    if not ratio > 0:
        raise ValueError(f"collapse ratio must be > 0, got {ratio!r}")
    std = normalised_feature_std(gather(z.detach().float().contiguous()))
    threshold = collapse_threshold(z.shape[1], ratio)
    if std < threshold:
        where = f"at width {width:g}, " if width is not None else ""
        raise RepresentationCollapseError(
            f"{method}: representation collapsed {where}step {step}: the per-dimension std of the L2-normalised "
            f"features is {std:.3g}, below {threshold:.3g} ({ratio:g} / sqrt({z.shape[1]}); healthy features "
            f"give about {1 / math.sqrt(z.shape[1]):.3g})",
            method=method, width=width, step=step, std=std, threshold=threshold)
    return std


__all__ = ["RepresentationCollapseError", "check_collapse", "collapse_threshold", "normalised_feature_std"]
