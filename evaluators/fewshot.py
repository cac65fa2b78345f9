"""N-way K-shot episodes on frozen features: mean episode accuracy with a 95% confidence interval.

Usage::

    from evaluators.fewshot import few_shot_accuracy
    result = few_shot_accuracy(feats, labels, way=5, shot=1, query=15, episodes=600, seed=0)   # one pool
    result = few_shot_accuracy(train_x, train_y, test_x, test_y, way=5, shot=5, classifier="logistic")
    print(f"{result.mean:.3f} +- {result.ci95:.3f}")       # result.accuracies: float64 [episodes]

An episode draws ``way`` distinct classes among the eligible ones, then ``shot`` support rows and ``query``
query rows of each class, all without replacement. With one pool (``query_feats`` None, or the very same tensors
passed twice) a class is eligible when it has at least ``shot + query`` rows, and an episode's support and query
rows are disjoint; with two pools a class needs ``shot`` support rows and ``query`` query rows. Episodes come
from a NumPy generator seeded with ``seed`` (never the global RNG), so a call is reproducible;
:func:`sample_episodes` returns the row indices themselves.

Classifiers, both on L2-normalised features:

* ``"prototype"`` (Snell et al. 2017, Prototypical Networks): each class's prototype is the mean of its support
  rows; a query takes the class whose prototype has the highest cosine similarity.
* ``"logistic"``: multinomial logistic regression with an unpenalised bias, fit per episode on the
  ``way * shot`` support rows, minimising ``sum_i CE(W x_i + b, y_i) + ||W||^2 / 2``, the objective of
  scikit-learn's ``LogisticRegression(C=1.0)`` that Tian et al. 2020 ("Rethinking Few-Shot Image
  Classification") use. The minimiser's ``W`` lies in the span of the support rows, so the fit runs in that
  (at most ``way * shot``-dimensional) basis: exact, and independent of the feature width. The solver is
  full-batch gradient descent preconditioned with Boehning's fixed Hessian bound (the softmax curvature is at
  most 1/2) and Nesterov momentum, for a fixed number of steps, all episodes of a chunk at once.

Ties between classes go to the smaller class id (an episode's classes are kept in increasing label order).
``ci95`` is the half-width ``1.96 * std(accuracies, ddof=1) / sqrt(episodes)`` (0 for a single episode). Episodes
reuse the pool's rows, so they are not independent draws of the population; the interval describes the spread
over episodes of this pool, as the few-shot literature reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from trainers.config import ComponentConfig

__all__ = ["CLASSIFIERS", "FewShotConfig", "FewShotEpisodes", "FewShotResult", "few_shot_accuracy", "sample_episodes"]

CLASSIFIERS = ("prototype", "logistic")

# Gathered feature blocks per chunk of episodes stay near 2**24 elements (64 MiB in float32).
_MAX_BLOCK_ELEMENTS = 2**24
# Steps of the logistic fit: against a float64 reference solve, 5-way episodes reach float32 precision in about
# 50 and 20-way 5-shot ones in about 100.
_LOGISTIC_STEPS = 100


class FewShotConfig(ComponentConfig):
    """The spec's `eval.fewshot` options (episodes are sampled from the evaluation features)."""

    way: int = Field(5, ge=2, description="classes per episode (N)")
    shot: int = Field(5, ge=1, description="support rows per class (K)")
    query: int = Field(15, ge=1, description="query rows per class (Q)")
    episodes: int = Field(600, ge=1, description="episodes averaged into the mean and its 95% interval")
    classifier: Literal["prototype", "logistic"] = Field(
        "prototype", description="prototype: nearest class mean by cosine; logistic: softmax regression on support"
    )


@dataclass(frozen=True, eq=False)
class FewShotResult:
    """Mean episode accuracy and its 95% half-width; ``accuracies`` is the read-only float64 ``[episodes]`` array."""

    mean: float
    ci95: float
    episodes: int
    accuracies: np.ndarray
    way: int
    shot: int
    query: int
    classifier: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean, "ci95": self.ci95, "episodes": self.episodes, "way": self.way, "shot": self.shot,
            "query": self.query, "classifier": self.classifier, "accuracies": self.accuracies.tolist(),
        }


class FewShotEpisodes(NamedTuple):
    """Row indices of sampled episodes, classes in increasing label order within an episode.

    ``classes``: int64 ``[E, way]`` label values; ``support``: int64 ``[E, way, shot]`` rows of the support pool;
    ``query``: int64 ``[E, way, query]`` rows of the query pool (the same pool when there is only one).
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray


def sample_episodes(
    support_labels: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | None = None,
    *,
    way: int = 5,
    shot: int = 5,
    query: int = 15,
    episodes: int = 600,
    seed: int = 0,
) -> FewShotEpisodes:
    """Draw ``episodes`` N-way K-shot episodes; ``query_labels`` None means the query rows come from the support
    pool, disjoint from the episode's support rows. Deterministic given ``seed``."""
    _check_int("way", way, 2)
    _check_int("shot", shot, 1)
    _check_int("query", query, 1)
    _check_int("episodes", episodes, 1)
    _check_int("seed", seed, 0)
    support_labels = _labels_array("support_labels", support_labels)
    same_pool = query_labels is None
    query_labels = support_labels if same_pool else _labels_array("query_labels", query_labels)

    support_rows = _rows_by_class(support_labels)
    query_rows = support_rows if same_pool else _rows_by_class(query_labels)
    if same_pool:
        eligible = [c for c, rows in support_rows.items() if rows.size >= shot + query]
        need = f">= shot + query = {shot + query} rows"
    else:
        eligible = [
            c for c, rows in support_rows.items()
            if rows.size >= shot and c in query_rows and query_rows[c].size >= query
        ]
        need = f">= shot = {shot} support rows and >= query = {query} query rows"
    if len(eligible) < way:
        total = len(set(support_rows) | set(query_rows))
        raise ValueError(
            f"way={way} needs {way} classes with {need}; only {len(eligible)} of the {total} classes have that"
        )
    eligible_arr = np.array(sorted(eligible), dtype=np.int64)

    rng = np.random.default_rng(seed)
    classes = np.empty((episodes, way), dtype=np.int64)
    support = np.empty((episodes, way, shot), dtype=np.int64)
    queries = np.empty((episodes, way, query), dtype=np.int64)
    for e in range(episodes):
        chosen = np.sort(rng.choice(eligible_arr.size, size=way, replace=False))
        classes[e] = eligible_arr[chosen]
        for j, c in enumerate(classes[e].tolist()):
            if same_pool:
                picked = rng.choice(support_rows[c], size=shot + query, replace=False)
                support[e, j], queries[e, j] = picked[:shot], picked[shot:]
            else:
                support[e, j] = rng.choice(support_rows[c], size=shot, replace=False)
                queries[e, j] = rng.choice(query_rows[c], size=query, replace=False)
    return FewShotEpisodes(classes, support, queries)


def few_shot_accuracy(
    support_feats: Tensor,
    support_labels: Tensor,
    query_feats: Tensor | None = None,
    query_labels: Tensor | None = None,
    *,
    way: int = 5,
    shot: int = 5,
    query: int = 15,
    episodes: int = 600,
    classifier: str = "prototype",
    seed: int = 0,
) -> FewShotResult:
    """Mean accuracy over sampled N-way K-shot episodes, with its 95% confidence half-width.

    Args:
        support_feats: ``[N_s, D]`` float features the support rows come from.
        support_labels: ``[N_s]`` integer labels.
        query_feats: ``[N_q, D]`` features the query rows come from; None (with ``query_labels`` None) uses the
            support pool, support and query rows of an episode then being disjoint.
        query_labels: ``[N_q]`` integer labels; given exactly when ``query_feats`` is.
        way: classes per episode, >= 2.
        shot: support rows per class, >= 1.
        query: query rows per class, >= 1.
        episodes: number of episodes, >= 1.
        classifier: ``"prototype"`` or ``"logistic"`` (see the module docstring).
        seed: seeds the episode sampler, >= 0.

    Computation runs on ``support_feats``' device; the result's arrays are on the host.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {list(CLASSIFIERS)}, got {classifier!r}")
    same_pool = (query_feats is None and query_labels is None) or (
        query_feats is support_feats and query_labels is support_labels
    )
    support_feats, support_labels = _validate_pool("support", support_feats, support_labels)
    if same_pool:
        query_feats, query_labels = support_feats, None
    else:
        if query_feats is None or query_labels is None:
            missing = "query_labels" if query_labels is None else "query_feats"
            raise ValueError(f"query_feats and query_labels go together: {missing} is None but the other is not")
        query_feats, query_labels = _validate_pool("query", query_feats, query_labels)
        if query_feats.shape[1] != support_feats.shape[1]:
            raise ValueError(
                f"query_feats must have shape [N_q, {support_feats.shape[1]}] to match support_feats, "
                f"found {tuple(query_feats.shape)}"
            )
    sampled = sample_episodes(
        support_labels, query_labels, way=way, shot=shot, query=query, episodes=episodes, seed=seed
    )

    device = support_feats.device
    support_unit = F.normalize(support_feats.float(), dim=1)
    query_unit = support_unit if same_pool else F.normalize(query_feats.to(device).float(), dim=1)
    classify = _prototype_accuracy if classifier == "prototype" else _logistic_accuracy
    dim = support_unit.shape[1]
    chunk = max(1, _MAX_BLOCK_ELEMENTS // (way * (shot + query) * dim))
    accuracies = []
    for start in range(0, episodes, chunk):
        sup = torch.from_numpy(sampled.support[start : start + chunk]).to(device)
        qry = torch.from_numpy(sampled.query[start : start + chunk]).to(device)
        accuracies.append(classify(support_unit[sup], query_unit[qry]).double().cpu())
    acc = torch.cat(accuracies).numpy()
    acc.flags.writeable = False
    ci95 = 1.96 * float(acc.std(ddof=1)) / math.sqrt(episodes) if episodes > 1 else 0.0
    return FewShotResult(
        mean=float(acc.mean()), ci95=ci95, episodes=episodes, accuracies=acc, way=way, shot=shot, query=query,
        classifier=classifier,
    )


def _prototype_accuracy(support: Tensor, query: Tensor) -> Tensor:
    """``support`` ``[e, N, K, D]`` and ``query`` ``[e, N, Q, D]`` unit rows -> ``[e]`` episode accuracies."""
    e, way, n_query, dim = query.shape
    prototypes = F.normalize(support.mean(dim=2), dim=2)  # [e, N, D]
    scores = torch.bmm(query.reshape(e, way * n_query, dim), prototypes.transpose(1, 2))  # [e, NQ, N] cosines
    return _accuracy(scores, way, n_query)


def _logistic_accuracy(support: Tensor, query: Tensor, steps: int = _LOGISTIC_STEPS) -> Tensor:
    """Per-episode softmax regression on the support rows (see the module docstring) -> ``[e]`` accuracies."""
    e, way, shot, dim = support.shape
    n_query = query.shape[2]
    x = support.reshape(e, way * shot, dim)
    # Orthonormal basis of each episode's support span: coordinates z = x @ basis keep every inner product, so
    # the fit in z-space has the same optimum (its W is basis @ V) at a fraction of the width.
    basis = torch.linalg.qr(x.transpose(1, 2), mode="reduced").Q  # [e, D, r], r = min(D, N*K)
    z = torch.cat([torch.bmm(x, basis), x.new_ones(e, way * shot, 1)], dim=2)  # [e, n, r + 1], bias column last
    zq = torch.cat([torch.bmm(query.reshape(e, way * n_query, dim), basis), x.new_ones(e, way * n_query, 1)], 2)
    target = F.one_hot(torch.arange(way, device=x.device).repeat_interleave(shot), way).to(x.dtype)  # [n, N]
    penalised = torch.ones(z.shape[2], device=x.device, dtype=x.dtype)
    penalised[-1] = 0.0  # the bias is not penalised

    # Boehning's bound: the softmax curvature is <= I/2, so the Hessian is <= (A/2 + P) (x) I_N with A = z^T z and
    # P the penalty's diagonal; preconditioning with its inverse makes the objective 1-smooth. Its condition
    # number is at most kappa = lambda_max(A)/2 + 1 (P's unit curvature against the bound), which sets the
    # Nesterov momentum.
    gram = torch.bmm(z.transpose(1, 2), z)  # [e, r + 1, r + 1]
    precondition = torch.linalg.inv(gram / 2 + torch.diag(penalised))
    root = (torch.linalg.eigvalsh(gram)[:, -1] / 2 + 1).sqrt().view(e, 1, 1)
    momentum = (root - 1) / (root + 1)
    weights = x.new_zeros(e, z.shape[2], way)  # [e, r + 1, N]
    previous = weights
    for _ in range(steps):
        look = weights + momentum * (weights - previous)
        residual = torch.softmax(torch.bmm(z, look), dim=2) - target  # [e, n, N]
        grad = torch.bmm(z.transpose(1, 2), residual) + penalised.view(1, -1, 1) * look
        previous, weights = weights, look - torch.bmm(precondition, grad)
    if not torch.isfinite(weights).all():
        raise ValueError("logistic few-shot fit diverged (non-finite weights)")
    return _accuracy(torch.bmm(zq, weights), way, n_query)


def _accuracy(scores: Tensor, way: int, n_query: int) -> Tensor:
    """``[e, N*Q, N]`` scores, queries grouped by episode class -> ``[e]`` fraction correct (ties: lower class)."""
    target = torch.arange(way, device=scores.device).repeat_interleave(n_query)
    return (scores.argmax(dim=2) == target).double().mean(dim=1)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _labels_array(name: str, labels: Tensor | np.ndarray) -> np.ndarray:
    labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape [N], found {tuple(labels.shape)}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, found {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _rows_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(c): rows for c, rows in zip(values, np.split(order, starts[1:]))}


def _validate_pool(pool: str, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    feats = torch.as_tensor(feats)
    labels = torch.as_tensor(labels)
    if feats.ndim != 2:
        raise ValueError(f"{pool}_feats must have shape [N, D], found {tuple(feats.shape)}")
    if feats.shape[0] == 0:
        raise ValueError(f"{pool}_feats is empty: episodes need rows to sample")
    if not feats.dtype.is_floating_point:
        raise ValueError(f"{pool}_feats must be a float tensor, found {feats.dtype}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{pool}_feats contains NaN or inf")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"{pool}_labels must have shape [{feats.shape[0]}] to match {pool}_feats, found {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{pool}_labels must be an integer tensor, found {labels.dtype}")
    return feats, labels.long()
