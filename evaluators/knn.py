"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination"; the variant DINO reports).

Usage::

    from evaluators.knn import knn_accuracy, knn_predict, knn_topk
    preds = knn_predict(train_x, train_y, test_x, k=20, temperature=0.07)     # int64 [N_test]
    ranked = knn_topk(train_x, train_y, test_x, top=5, k=20)                 # int64 [N_test, min(5, C)]
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=20)               # float in [0, 1]

Rule: features are L2-normalised, similarity is the cosine ``s = <x, t>``; each test row takes its ``k`` most
similar training rows, each neighbour votes for its label with weight ``exp(s / T)``, and the class with the
largest summed weight wins.

Behaviour at the edges (fixed so that results are reproducible):

* ``k`` larger than the training set: every training row votes (``k`` is clamped to ``N_train``).
* neighbours tied in similarity at the k-th place: the lower training index is taken.
* classes tied in summed weight: the smaller class id is predicted (and ranked first by ``knn_topk``).
* ``knn_topk`` ranks every class of the label space, those no neighbour voted for included (summed weight 0,
  so after every voted class, in class-id order): column 0 is always ``knn_predict``'s prediction.

Test rows are processed in chunks so that the ``[chunk, N_train]`` similarity block stays at about
``2**24`` elements (64 MiB in float32) whatever the sizes, unless ``chunk_size`` says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from trainers.config import ComponentConfig

__all__ = ["KnnConfig", "knn_accuracy", "knn_predict", "knn_topk"]


class KnnConfig(ComponentConfig):
    """The spec's `eval.knn` options."""

    k: int = Field(20, ge=1, description="neighbours per query (clamped to the bank size)")
    temperature: float = Field(0.07, gt=0, allow_inf_nan=False, description="T in the vote weight exp(cos / T)")

# Bound on chunk_rows * N_train so the similarity block and its temporaries fit in a few hundred MiB.
_MAX_BLOCK_ELEMENTS = 2**24


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Predict a class for every test row by a similarity-weighted vote of its k nearest training rows.

    Args:
        train_feats: ``[N_train, D]`` float features (N_train >= 1).
        train_labels: ``[N_train]`` integer labels, non-negative.
        test_feats: ``[N_test, D]`` float features (N_test may be 0).
        k: neighbours per test row, >= 1; clamped to N_train.
        temperature: T in ``exp(sim / T)``, > 0; small T approaches 1-NN, large T a plain majority vote.
        num_classes: size of the label space; default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block; default keeps the block near 2**24 elements.

    Returns:
        ``[N_test]`` int64 predictions on CPU. Computation runs on ``train_feats``' device.
    """
    _, blocks = _vote_scores(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk_size)
    preds = [scores.argmax(dim=1) for scores in blocks]  # first maximum: smaller class id on ties
    if not preds:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(preds).cpu()


def knn_topk(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    top: int = 5,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The ``top`` classes of every test row, by decreasing summed vote weight (the same vote as
    :func:`knn_predict`; smaller class id first among equal weights).

    Returns:
        ``[N_test, min(top, num_classes)]`` int64 on CPU; column 0 equals :func:`knn_predict`.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    classes, blocks = _vote_scores(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk_size)
    width = min(top, classes)
    # A stable descending sort keeps equal scores in class-id order: the tie rule of argmax, at every rank.
    ranked = [torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :width] for scores in blocks]
    if not ranked:
        return torch.empty(0, width, dtype=torch.int64)
    return torch.cat(ranked).cpu()


def _vote_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    k: int,
    temperature: float,
    num_classes: int | None,
    chunk_size: int | None,
) -> tuple[int, Iterator[Tensor]]:
    """Validates the arguments now, then ``(num_classes, blocks)``: per block of test rows, the
    ``[r, num_classes]`` summed vote weights (on ``train_feats``' device), computed as the blocks are read."""
    train_feats, train_labels, test_feats, num_classes = _validate(
        train_feats, train_labels, test_feats, k, temperature, num_classes, chunk_size
    )
    n_train = train_feats.shape[0]
    rows = chunk_size or max(1, _MAX_BLOCK_ELEMENTS // n_train)
    return num_classes, _vote_blocks(train_feats, train_labels, test_feats, min(k, n_train), temperature,
                                     num_classes, rows)


def _vote_blocks(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int, temperature: float,
                 num_classes: int, rows: int) -> Iterator[Tensor]:
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.to(train.device).float(), dim=1)
    labels = train_labels.to(train.device)
    for start in range(0, test.shape[0], rows):
        sim = test[start : start + rows] @ train.T  # [r, N_train] cosine similarities
        values, index = _top_k_lowest_index_on_ties(sim, k)  # [r, k], sorted by decreasing similarity
        # Subtracting the row maximum rescales every class score of the row by the same factor, so the ranking
        # is unchanged, and keeps exp() finite for small temperatures (exp(1/0.001) overflows float32).
        weights = torch.exp((values - values[:, :1]) / temperature)
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        scores.scatter_add_(1, labels[index], weights)
        yield scores


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> float:
    """Fraction of test rows whose :func:`knn_predict` prediction equals ``test_labels`` ([N_test], N_test >= 1)."""
    test_labels = torch.as_tensor(test_labels)
    n_test = torch.as_tensor(test_feats).shape[0]
    if test_labels.ndim != 1 or test_labels.shape[0] != n_test:
        raise ValueError(
            f"test_labels must have shape [{n_test}] to match test_feats, found {tuple(test_labels.shape)}"
        )
    if n_test == 0:
        raise ValueError("test_feats is empty: accuracy is undefined on no test rows")
    preds = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk_size)
    return (preds == test_labels.cpu().long()).double().mean().item()


def _top_k_lowest_index_on_ties(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``[r, N]`` similarities -> (values, indices) ``[r, k]`` of the k largest, lower index first among equals.

    ``torch.topk`` picks arbitrarily among equal values. Rows whose k-th value also occurs outside the chosen
    set are re-selected with a stable sort; with continuous features such rows are rare, so the common path
    stays a single topk.
    """
    values, index = sim.topk(k, dim=1, largest=True, sorted=True)
    kth = values[:, -1:]
    ambiguous = (sim == kth).sum(dim=1) > (values == kth).sum(dim=1)
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        stable = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices[:, :k]
        index[rows] = stable
        values[rows] = sim[rows].gather(1, stable)
    return values, index


def _validate(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    k: int,
    temperature: float,
    num_classes: int | None,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    train_feats = torch.as_tensor(train_feats)
    train_labels = torch.as_tensor(train_labels)
    test_feats = torch.as_tensor(test_feats)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if train_feats.ndim != 2:
        raise ValueError(f"train_feats must have shape [N_train, D], found {tuple(train_feats.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("train_feats is empty: kNN needs at least one training row")
    if test_feats.ndim != 2 or test_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(
            f"test_feats must have shape [N_test, {train_feats.shape[1]}] to match train_feats, "
            f"found {tuple(test_feats.shape)}"
        )
    for name, feats in (("train_feats", train_feats), ("test_feats", test_feats)):
        if not feats.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor, found {feats.dtype}")
        if not torch.isfinite(feats).all():
            raise ValueError(f"{name} contains NaN or inf")
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
    return train_feats, train_labels, test_feats, num_classes
