"""One record per evaluator: the names `eval.every_chunk` accepts and each one's `eval.<name>` options.

Every record's `build` has the same call: `build(bank_feats, bank_labels, query_feats, *, seed, **options)` ->
`[N_query]` int64 predictions, so the orchestrator evaluates any registered protocol the same way::

    record = EVALUATOR_REGISTRY["knn"]
    preds = record.build(bank_f, bank_y, query_f, seed=0, **record.options({"k": 200}))

Adding an evaluator: its module with a `Config` and a predict function, then one `Record` below.
"""

from __future__ import annotations

from torch import Tensor

from evaluators.knn import KnnConfig, knn_predict
from evaluators.linear import LinearConfig, linear_probe
from trainers.registry import Record, Registry


def _knn(bank_feats: Tensor, bank_labels: Tensor, query_feats: Tensor, *, seed: int, k: int,
         temperature: float) -> Tensor:
    del seed  # deterministic: ties are broken by index, not by chance
    return knn_predict(bank_feats, bank_labels, query_feats, k=k, temperature=temperature)


def _linear(bank_feats: Tensor, bank_labels: Tensor, query_feats: Tensor, *, seed: int, epochs: int, lr: float,
            weight_decay: float, batch_size: int | None) -> Tensor:
    return linear_probe(bank_feats, bank_labels, query_feats, epochs=epochs, lr=lr, weight_decay=weight_decay,
                        batch_size=batch_size, seed=seed)


EVALUATOR_REGISTRY = Registry("evaluator", [
    Record("knn", _knn, KnnConfig, summary="weighted kNN vote of the query's nearest bank features (Wu et al., 2018)"),
    Record("linear", _linear, LinearConfig, summary="softmax probe trained on the bank's frozen features"),
])

__all__ = ["EVALUATOR_REGISTRY"]
