"""The optional studies of a chunk's representation, beside the every-chunk protocols: few-shot episodes, the
sharpness of the minimum, and the interpolation from the previous chunk's weights (`eval.fewshot`,
`eval.sharpness`, `eval.interpolation`; each off unless its section is given).

    metrics = study_metrics(backbone, bank, queries, eval_spec, seed=0, previous_state=prev, make_backbone=build)

Plain PyTorch over the evaluation actor's decoded arrays (the kNN bank and the held-out queries), so the numbers
come from the same rows as kNN and linear. Returns flat metrics for the eval run (`fewshot_mean`,
`fewshot_ci95`, `sharpness_eps0.1`, `interpolation_barrier`, ...) and, under `studies`, the full results for
its eval_result.json (episode accuracies, every sharpness candidate, the interpolation curve).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from evaluators.features import extract_features
from evaluators.fewshot import few_shot_accuracy
from evaluators.interpolation import interpolation_curve
from evaluators.sharpness import sharpness
from orchestrator.data.ingest import SplitArrays


def sharpness_key(epsilon: float) -> str:
    return f"sharpness_eps{epsilon:g}"


def study_metrics(
    backbone: torch.nn.Module,
    bank: SplitArrays,
    queries: SplitArrays,
    eval_spec: dict[str, Any],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    previous_state: dict[str, torch.Tensor] | None = None,
    make_backbone: Callable[[], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """The studies `eval_spec` turns on, for `backbone` (restored unchanged afterwards).

    Interpolation needs `previous_state` (the previous chunk's backbone `state_dict`) and `make_backbone`; for the
    first chunk, or when the previous checkpoint is unknown, it is left out (the report shows it as missing).
    """
    out: dict[str, Any] = {}
    studies: dict[str, Any] = {}
    size = eval_spec["batch_size"]
    bank_fn, query_fn = (lambda: bank.batches(size)), (lambda: queries.batches(size))
    if eval_spec.get("fewshot") is not None:
        options = eval_spec["fewshot"]
        feats, labels = extract_features(backbone, query_fn(), device=device)
        classes = len(torch.unique(labels))
        if classes < options["way"]:
            raise ValueError(f"eval.fewshot.way: {options['way']}-way episodes, but the evaluation split holds "
                             f"only {classes} classes; use at most {classes}")
        result = few_shot_accuracy(feats, labels, seed=seed, **options)
        out["fewshot_mean"], out["fewshot_ci95"] = result.mean, result.ci95
        studies["fewshot"] = result.to_dict()
    if eval_spec.get("sharpness") is not None:
        result = sharpness(backbone, bank_fn, query_fn, seed=seed, device=device, **eval_spec["sharpness"])
        for point in result.points:
            out[sharpness_key(point.epsilon)] = point.relative_drop
        out["sharpness_base_accuracy"] = result.base_accuracy
        studies["sharpness"] = result.to_dict()
    if eval_spec.get("interpolation") is not None and previous_state is not None and make_backbone is not None:
        knn = eval_spec["knn"]
        curve = interpolation_curve(previous_state, backbone.state_dict(), make_backbone, bank_fn, query_fn,
                                    points=eval_spec["interpolation"]["points"], knn_k=knn["k"],
                                    knn_temperature=knn["temperature"], device=device)
        out["interpolation_barrier"] = curve.barrier
        out["interpolation_min_accuracy"] = min(curve.accuracies)
        studies["interpolation"] = curve.to_dict()
    if studies:
        out["studies"] = studies
    return out
