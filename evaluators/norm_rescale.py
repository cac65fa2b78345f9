"""NormRescale: set the norm of each layer's weight tensor before transfer, keeping its direction.

Huang et al. 2022 ("Revisiting the Critical Factors of Augmentation-Invariant Representation Learning") find that
a backbone pre-trained with LARS (MoCo v2+, BYOL) ends with per-layer weight norms far from a supervised one's, and
that fine-tuning recipes tuned for supervised weights then transfer it badly; rescaling every layer's weights to
the supervised model's norms (or to one constant norm) before transfer closes much of that gap.

Usage::

    from evaluators.norm_rescale import norm_rescale
    result = norm_rescale(backbone, mode="anchor", anchor=supervised_backbone)      # in place
    result = norm_rescale(backbone, mode="constant", target_norm=10.0)               # every layer's norm -> 10
    result = norm_rescale(backbone, mode="scale", factor=0.5)                        # every weight x 0.5
    mlflow_metrics = result.metrics()       # {"norm_before/layer1.0.conv1.weight": ..., "norm_after/...": ...}

Modes, for each selected tensor ``W`` (Frobenius norm ``||W||``):

* ``anchor``: ``W <- W * ||A|| / ||W||`` with ``A`` the anchor's tensor of the same name and shape (the anchor is a
  state dict or a module; every selected name must be in it with the same shape, or a ValueError lists the ones
  that are not);
* ``constant``: ``W <- W * target_norm / ||W||``;
* ``scale``: ``W <- factor * W``.

Selected tensors: by default the ``weight`` of every convolution (``nn.Conv1d/2d/3d`` and their transposes) and
``nn.Linear``; normalisation layers' scales and all biases are left alone unless ``include_norms`` /
``include_biases`` ask for them. ``exclude`` takes ``fnmatch`` patterns on the parameter names (``"fc.*"``).
Norms are computed and the scale applied in float64, then stored in the tensor's dtype.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from trainers.config import ComponentConfig
from trainers.optim import NORM_LAYERS

__all__ = ["MODES", "WEIGHT_LAYERS", "LayerNormChange", "NormRescaleConfig", "NormRescaleResult", "norm_rescale",
           "selected_weights"]

MODES = ("anchor", "constant", "scale")
# Layers whose `weight` NormRescale touches by default: the ones that carry the features.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)
# Names quoted in a mismatch error before "... and N more".
_QUOTED = 20


class NormRescaleConfig(ComponentConfig):
    """The options of NormRescale before a transfer task (the anchor model itself is given at call time)."""

    mode: Literal["anchor", "constant", "scale"] = Field(
        "anchor", description="anchor: each layer's norm -> the anchor's; constant: -> target_norm; scale: x factor"
    )
    target_norm: float | None = Field(None, gt=0, allow_inf_nan=False, description="the norm of mode=constant")
    factor: float | None = Field(None, gt=0, allow_inf_nan=False, description="the multiplier of mode=scale")
    include_norms: bool = Field(False, description="also rescale normalisation layers' weights (BN/LN scales)")
    include_biases: bool = Field(False, description="also rescale biases")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of parameter names to leave alone")

    @model_validator(mode="after")
    def _mode_needs_its_number(self) -> NormRescaleConfig:
        if self.mode == "constant" and self.target_norm is None:
            raise ValueError("mode=constant needs target_norm (the norm every selected tensor gets)")
        if self.mode == "scale" and self.factor is None:
            raise ValueError("mode=scale needs factor (the multiplier of every selected tensor)")
        return self


@dataclass(frozen=True)
class LayerNormChange:
    """One tensor's Frobenius norm before and after (float64 values)."""

    name: str
    before: float
    after: float


@dataclass(frozen=True)
class NormRescaleResult:
    """What :func:`norm_rescale` changed, in the module's parameter order."""

    mode: str
    layers: tuple[LayerNormChange, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "layers": {c.name: {"before": c.before, "after": c.after} for c in self.layers}}

    def metrics(self) -> dict[str, float]:
        """Flat ``norm_before/<name>`` and ``norm_after/<name>`` values, one pair per tensor."""
        out: dict[str, float] = {}
        for change in self.layers:
            out[f"norm_before/{change.name}"] = change.before
            out[f"norm_after/{change.name}"] = change.after
        return out


def selected_weights(
    module: nn.Module, *, include_norms: bool = False, include_biases: bool = False, exclude: Sequence[str] = ()
) -> dict[str, Tensor]:
    """The parameters NormRescale would touch in ``module``, by name, in parameter order."""
    if isinstance(exclude, str):
        raise ValueError(f"exclude must be a list of patterns, got the string {exclude!r}")
    chosen: dict[str, Tensor] = {}
    for module_name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
                continue
            is_norm = isinstance(sub, NORM_LAYERS)
            if param_name == "bias":
                wanted = include_biases and (not is_norm or include_norms)
            elif param_name == "weight":
                wanted = isinstance(sub, WEIGHT_LAYERS) or (is_norm and include_norms)
            else:
                wanted = False
            if wanted:
                chosen[name] = param
    return chosen


def norm_rescale(
    module: nn.Module,
    mode: str = "anchor",
    *,
    anchor: nn.Module | Mapping[str, Tensor] | None = None,
    target_norm: float | None = None,
    factor: float | None = None,
    include_norms: bool = False,
    include_biases: bool = False,
    exclude: Sequence[str] = (),
) -> NormRescaleResult:
    """Rescale ``module``'s selected weight tensors in place (see the module docstring) and report their norms.

    Raises:
        ValueError: an unknown mode or a missing/invalid number for it; ``mode="anchor"`` without an anchor, or with
            selected names the anchor lacks or holds with another shape (all listed); a selected tensor (or its
            anchor) of zero norm, whose direction cannot be kept at another norm; nothing selected.
    """
    config = NormRescaleConfig.parse(
        "norm_rescale", mode=mode, target_norm=None if target_norm is None else float(target_norm),
        factor=None if factor is None else float(factor), include_norms=include_norms,
        include_biases=include_biases, exclude=list(exclude) if not isinstance(exclude, str) else exclude,
    )
    weights = selected_weights(module, include_norms=config.include_norms, include_biases=config.include_biases,
                               exclude=config.exclude)
    if not weights:
        raise ValueError("norm_rescale: no tensor selected (no conv/linear weights, or all excluded)")
    targets = _target_norms(config, weights, anchor)

    changes = []
    with torch.no_grad():
        for name, param in weights.items():
            before = torch.linalg.vector_norm(param.detach().double()).item()
            if config.mode == "scale":
                scale = float(config.factor)
            else:
                if before == 0.0:
                    raise ValueError(f"norm_rescale: {name} has norm 0; without a direction it cannot be rescaled")
                scale = targets[name] / before
            param.copy_((param.detach().double() * scale).to(param.dtype))
            after = torch.linalg.vector_norm(param.detach().double()).item()
            changes.append(LayerNormChange(name, before, after))
    return NormRescaleResult(mode=config.mode, layers=tuple(changes))


def _target_norms(
    config: NormRescaleConfig, weights: dict[str, Tensor], anchor: nn.Module | Mapping[str, Tensor] | None
) -> dict[str, float]:
    if config.mode == "constant":
        return {name: float(config.target_norm) for name in weights}
    if config.mode == "scale":
        return {}
    if anchor is None:
        raise ValueError("norm_rescale: mode=anchor needs an anchor (a module or a state dict of the reference model)")
    if isinstance(anchor, nn.Module):
        anchor = anchor.state_dict()
    if not isinstance(anchor, Mapping):
        raise ValueError(f"norm_rescale: anchor must be an nn.Module or a state dict, got {type(anchor).__name__}")
    missing = [name for name in weights if name not in anchor]
    shapes = {name: tuple(torch.as_tensor(anchor[name]).shape) for name in weights if name in anchor}
    mismatched = [
        f"{name} {tuple(weights[name].shape)} vs anchor {shape}"
        for name, shape in shapes.items() if shape != tuple(weights[name].shape)
    ]
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the anchor: {_quote(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape: {_quote(mismatched)}")
        raise ValueError(
            "norm_rescale: the anchor does not match the model's layers by name and shape; " + "; ".join(parts)
            + " (use exclude=[...] for layers the anchor lacks, e.g. a head)"
        )
    norms = {}
    for name in weights:
        norm = torch.linalg.vector_norm(torch.as_tensor(anchor[name]).detach().double()).item()
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"norm_rescale: the anchor's {name} has norm {norm}; a target norm must be finite and > 0")
        norms[name] = norm
    return norms


def _quote(names: list[str]) -> str:
    more = f" ... and {len(names) - _QUOTED} more" if len(names) > _QUOTED else ""
    return ", ".join(names[:_QUOTED]) + more
