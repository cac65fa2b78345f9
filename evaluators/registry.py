"""One record per evaluator: the names `eval.every_chunk` accepts and each one's `eval.<name>` options.

Every record's `build` has the same call: `build(bank_feats, bank_labels, query_feats, *, seed, **options)` ->
`[N_query, min(TOP_K, C)]` int64 *ranked* classes (C: the bank's label space, `max(bank_labels) + 1`), best
first, ties broken deterministically (each evaluator's module says how). Column 0 is the top-1 prediction, so
top-1 and top-5 come from one call::

    record = EVALUATOR_REGISTRY["knn"]
    ranked = record.build(bank_f, bank_y, query_f, seed=0, **record.options({"k": 200}))
    top1, top5 = topk_hits(ranked, query_y)         # bool [N_query] each

With C <= TOP_K every class is in the ranking, so top-5 is trivially 1.0 for a label the bank has (it is still
computed and logged, so runs line up).

Adding an evaluator: its module with a `Config` and a ranking function, then one `Record` below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evaluators.knn import KnnConfig, knn_topk
from evaluators.linear import LinearConfig, fit_linear_probe
from trainers.records import Record, Registry

TOP_K = 5  # the second accuracy every protocol reports ({name}_top5)


def _knn(bank_feats: Tensor, bank_labels: Tensor, query_feats: Tensor, *, seed: int, k: int,
         temperature: float) -> Tensor:
    del seed  # deterministic: ties are broken by index, not by chance
    return knn_topk(bank_feats, bank_labels, query_feats, top=TOP_K, k=k, temperature=temperature)


def _linear(bank_feats: Tensor, bank_labels: Tensor, query_feats: Tensor, *, seed: int, epochs: int, lr: float,
            weight_decay: float, batch_size: int | None) -> Tensor:
    probe = fit_linear_probe(bank_feats, bank_labels, epochs=epochs, lr=lr, weight_decay=weight_decay,
                             batch_size=batch_size, seed=seed)
    return probe.rank(query_feats, top=TOP_K)


def topk_hits(ranked: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """`[N, k]` ranked classes and `[N]` true labels -> (top-1 hit, top-k hit), bool `[N]` each on CPU."""
    ranked, labels = torch.as_tensor(ranked).cpu(), torch.as_tensor(labels).cpu().long()
    if ranked.ndim != 2 or ranked.shape[0] != labels.shape[0] or ranked.shape[1] < 1:
        raise ValueError(f"ranked must have shape [{labels.shape[0]}, k >= 1] to match the labels, "
                         f"found {tuple(ranked.shape)}")
    hits = ranked == labels[:, None]
    return hits[:, 0], hits.any(dim=1)


EVALUATOR_REGISTRY = Registry("evaluator", [
    Record("knn", _knn, KnnConfig, summary="weighted kNN vote of the query's nearest bank features (Wu et al., 2018)"),
    Record("linear", _linear, LinearConfig, summary="softmax probe trained on the bank's frozen features"),
])

__all__ = ["EVALUATOR_REGISTRY", "TOP_K", "topk_hits"]
