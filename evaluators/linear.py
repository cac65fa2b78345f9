"""Linear probe: multinomial logistic regression on frozen, standardised features.

Usage::

    from evaluators.linear import fit_linear_probe, linear_probe
    preds = linear_probe(train_x, train_y, test_x, epochs=100)          # int64 [N_test]
    probe = fit_linear_probe(train_x, train_y)                            # train once ...
    per_task = [probe.predict(x) for x in task_test_feats]                # ... evaluate on every task
    ranked = probe.rank(test_x, top=5)                                    # int64 [N_test, min(5, C)]

Features are standardised with the training set's per-dimension mean and std (test rows reuse them), so the
probe's learning rate does not depend on the backbone's feature scale. The objective is
``cross_entropy(x W^T + b, y) + weight_decay / 2 * ||W||^2`` (the bias is not decayed), minimised with Adam
(robust to the strongly correlated dimensions SSL features have, where plain SGD needs a tuned step) under a
cosine learning-rate decay to zero. Weights start at zero and minibatch order comes from a generator seeded
with ``seed``, so a call is deterministic on a given device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from trainers.config import ComponentConfig

__all__ = ["DEFAULT_LR", "LinearConfig", "LinearProbe", "fit_linear_probe", "linear_accuracy", "linear_probe"]


# The one default peak LR of the probe: the spec's `eval.linear.lr` and the functions' `lr` (they used to differ).
DEFAULT_LR = 0.1


class LinearConfig(ComponentConfig):
    """The spec's `eval.linear` options (the probe trains on standardised frozen features)."""

    epochs: int = Field(100, ge=1, description="passes over the bank")
    lr: float = Field(DEFAULT_LR, gt=0, allow_inf_nan=False, description="peak Adam LR, cosine-decayed to 0")
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False, description="L2 on the probe's weights")
    batch_size: int | None = Field(256, ge=1, description="minibatch rows; null trains full-batch")


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe. ``mean``/``std``: ``[D]`` train statistics; ``weight``: ``[C, D]``; ``bias``: ``[C]``."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def logits(self, feats: Tensor) -> Tensor:
        """``[N, D]`` raw features -> ``[N, C]`` class logits (on the probe's device)."""
        feats = torch.as_tensor(feats)
        if feats.ndim != 2 or feats.shape[1] != self.weight.shape[1]:
            raise ValueError(f"feats must have shape [N, {self.weight.shape[1]}], found {tuple(feats.shape)}")
        x = (feats.to(self.weight.device, torch.float32) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, feats: Tensor) -> Tensor:
        """``[N, D]`` raw features -> ``[N]`` int64 predicted classes on CPU (the first maximum on tied logits:
        the smaller class id)."""
        return self.logits(feats).argmax(dim=1).cpu()

    def rank(self, feats: Tensor, top: int = 5) -> Tensor:
        """``[N, D]`` raw features -> ``[N, min(top, C)]`` int64 classes on CPU by decreasing logit, the smaller
        class id first among tied logits, so column 0 is :meth:`predict`."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be an integer >= 1, got {top!r}")
        order = torch.sort(self.logits(feats), dim=1, descending=True, stable=True).indices
        return order[:, : min(top, self.num_classes)].cpu()


def fit_linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    epochs: int = 100,
    lr: float = DEFAULT_LR,
    weight_decay: float = 1e-4,
    batch_size: int | None = 256,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """Train a softmax classifier on ``[N, D]`` features with ``[N]`` integer labels.

    Args:
        epochs: passes over the training set, >= 1.
        lr: peak Adam learning rate, > 0, decayed with a cosine to 0 over all steps.
        weight_decay: L2 coefficient on the weights, >= 0.
        batch_size: minibatch rows, >= 1; None (or >= N) trains full-batch.
        seed: seeds the minibatch order.
        num_classes: size of the label space; default ``max(train_labels) + 1``.
        device: where to train; default ``train_feats``' device.
    """
    train_feats, train_labels, num_classes = _validate_train(train_feats, train_labels, num_classes)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")

    device = torch.device(device) if device is not None else train_feats.device
    n, dim = train_feats.shape
    # Statistics in float64: a constant column then has exactly zero std and is left unscaled instead of
    # having float32 rounding noise blown up to unit variance.
    std, mean = torch.std_mean(train_feats.double(), dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    mean, std = mean.float().to(device), std.float().to(device)
    x = (train_feats.to(device, torch.float32) - mean) / std
    y = train_labels.to(device)

    weight = torch.zeros(num_classes, dim, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.Adam(
        [{"params": [weight], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}], lr=lr
    )
    batch = n if batch_size is None else min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same order whatever the device

    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(x[idx] @ weight.T + bias, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    if not torch.isfinite(weight).all():
        raise ValueError(f"linear probe diverged (non-finite weights) with lr={lr}; lower lr")
    return LinearProbe(mean=mean, std=std, weight=weight.detach(), bias=bias.detach())


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    epochs: int = 100,
    lr: float = DEFAULT_LR,
    weight_decay: float = 1e-4,
    batch_size: int | None = 256,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Fit a probe on the training features (see :func:`fit_linear_probe`) and return ``[N_test]`` int64
    predictions on CPU for ``test_feats`` ``[N_test, D]``."""
    probe = fit_linear_probe(
        train_feats, train_labels, epochs, lr, weight_decay, batch_size, seed, num_classes, device
    )
    return probe.predict(test_feats)


def linear_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    epochs: int = 100,
    lr: float = DEFAULT_LR,
    weight_decay: float = 1e-4,
    batch_size: int | None = 256,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Fraction of test rows a freshly fitted probe classifies correctly (``test_labels`` ``[N_test]``, N_test >= 1)."""
    test_labels = torch.as_tensor(test_labels)
    n_test = torch.as_tensor(test_feats).shape[0]
    if test_labels.ndim != 1 or test_labels.shape[0] != n_test:
        raise ValueError(
            f"test_labels must have shape [{n_test}] to match test_feats, found {tuple(test_labels.shape)}"
        )
    if n_test == 0:
        raise ValueError("test_feats is empty: accuracy is undefined on no test rows")
    preds = linear_probe(
        train_feats, train_labels, test_feats, epochs, lr, weight_decay, batch_size, seed, num_classes, device
    )
    return (preds == test_labels.cpu().long()).double().mean().item()


def _validate_train(train_feats: Tensor, train_labels: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor, int]:
    train_feats = torch.as_tensor(train_feats)
    train_labels = torch.as_tensor(train_labels)
    if train_feats.ndim != 2:
        raise ValueError(f"train_feats must have shape [N_train, D], found {tuple(train_feats.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("train_feats is empty: the probe needs at least one training row")
    if not train_feats.dtype.is_floating_point:
        raise ValueError(f"train_feats must be a float tensor, found {train_feats.dtype}")
    if not torch.isfinite(train_feats).all():
        raise ValueError("train_feats contains NaN or inf")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_feats.shape[0]:
        raise ValueError(
            f"train_labels must have shape [{train_feats.shape[0]}] to match train_feats, "
            f"found {tuple(train_labels.shape)}"
        )
    if train_labels.dtype.is_floating_point or train_labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be an integer tensor, found {train_labels.dtype}")
    train_labels = train_labels.long()
    if train_labels.min() < 0:
        raise ValueError(f"train_labels must be >= 0, found {train_labels.min().item()}")
    needed = int(train_labels.max()) + 1
    if num_classes is None:
        num_classes = needed
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < needed:
        raise ValueError(f"num_classes must be an integer >= max(train_labels) + 1 = {needed}, got {num_classes!r}")
    return train_feats, train_labels, num_classes
