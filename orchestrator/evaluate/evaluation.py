"""Evaluation after every chunk: frozen-backbone kNN and linear probe, overall and per task.

`evaluate_backbone` is plain PyTorch over in-memory arrays (tests call it directly). `EvalActor` is the Ray actor
the driver uses: it decodes the evaluation bank (training split, optionally capped per class) and the held-out
queries once, then evaluates checkpoints as they are persisted while training goes on with the next chunk.
A task is the held-out rows of one chunk (its classes, or its domains), so the per-task accuracies after every
chunk form the line's accuracy matrix.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np
import torch

from evaluators.features import extract_features
from evaluators.registry import EVALUATOR_REGISTRY, TOP_K, topk_hits
from evaluators.slimmable import DEFAULT_WIDTHS, width_features, width_key
from orchestrator.data.ingest import SplitArrays, load_split_arrays
from orchestrator.evaluate.studies import study_metrics
from orchestrator.plan.streams import StreamPlan
from trainers.backbones.slimmable import set_width, width_cost
from trainers.engine.checkpoint import load_backbone, load_state
from trainers.engine.loop import LoopConfig, initial_backbone
from trainers.registry import BACKBONE_REGISTRY

PROTOCOL_VERSION = "1"
CALIBRATION_ROWS = 512  # bank rows the BN statistics of each width are recomputed from (US-Net uses ~2k images)
logger = logging.getLogger(__name__)


def protocol_hits(backbone: torch.nn.Module, bank: SplitArrays, queries: SplitArrays, eval_spec: dict[str, Any],
                  seed: int = 0, device: str | torch.device = "cpu") -> tuple[int, dict[str, tuple[np.ndarray, ...]]]:
    """Frozen features of `bank` and `queries`, then every every-chunk protocol's ranked predictions: (the bank's
    class count, `{protocol: (top-1 hit, top-5 hit)}` as bool arrays over the queries)."""
    size = eval_spec["batch_size"]
    bank_feats, bank_labels = extract_features(backbone, bank.batches(size), device=device)
    query_feats, query_labels = extract_features(backbone, queries.batches(size), device=device)
    hits = {}
    for name in eval_spec["every_chunk"]:
        record = EVALUATOR_REGISTRY.require(name)
        ranked = record.build(bank_feats, bank_labels, query_feats, seed=seed, **record.options(eval_spec.get(name)))
        hits[name] = tuple(h.numpy() for h in topk_hits(ranked, query_labels))
    return int(bank_labels.max()) + 1, hits


def protocol(eval_spec: dict[str, Any], data_spec: dict[str, Any]) -> dict[str, Any]:
    """What defines the numbers an evaluation produces (recorded with every evaluation run)."""
    return {
        "version": PROTOCOL_VERSION,
        "bank_split": data_spec["train_split"],
        "query_split": data_spec["eval_split"],
        "image_size": data_spec["image_size"],
        "features": "frozen backbone, global pooled, eval mode",
        "knn": {**eval_spec["knn"], "weighting": "exp(cos/T)"},
        "linear": {**eval_spec["linear"], "features": "standardised", "optimizer": "adam, cosine"},
        "max_train_per_class": eval_spec["max_train_per_class"],
        "tasks": "held-out rows of each chunk's classes/domains (all rows for instance streams)",
    }


def evaluate_backbone(
    backbone: torch.nn.Module,
    bank: SplitArrays,
    queries: SplitArrays,
    plan: StreamPlan,
    eval_spec: dict[str, Any],
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Returns, per protocol, `{protocol}_top1` and `{protocol}_top5` overall, `{protocol}_task_acc` (top-1 on
    each chunk's task) and `{protocol}_task_acc_top5`.

    Top-5 counts a query as right when its label is among the protocol's 5 best-ranked classes; with 5 classes
    or fewer in the bank every class is ranked, so top-5 is 1.0 by construction (kept, so runs line up).
    A task with no query rows (none of its classes or domains in the query split) has no accuracy: its entry is
    NaN, which `AccuracyMatrix` records as unknown, and a warning names the task.
    """
    started = time.perf_counter()
    classes, hits = protocol_hits(backbone, bank, queries, eval_spec, seed=seed, device=device)
    if classes <= TOP_K:
        # Not a warning: nothing is wrong, and the driver's summary says it once for the whole plan.
        logger.info("the evaluation bank has %d classes (<= %d): every class is ranked, so top-%d accuracy is 1.0 "
                    "by construction", classes, TOP_K, TOP_K)
    masks = [plan.task_mask(t, queries.labels, queries.domains) for t in range(plan.num_chunks)]
    for t, mask in enumerate(masks):
        if not mask.any():
            logger.warning("task %d (%s) has no rows in the %d query rows: its accuracy is unknown (NaN)", t,
                           _task_units(plan, t), len(queries.labels))
    out: dict[str, Any] = {}
    for name, (top1, top5) in hits.items():
        for overall, per_task, correct in ((f"{name}_top1", f"{name}_task_acc", top1),
                                           (f"{name}_top5", f"{name}_task_acc_top5", top5)):
            out[overall] = float(correct.mean())
            out[per_task] = [float(correct[m].mean()) if m.any() else float("nan") for m in masks]
    out["eval_seconds"] = time.perf_counter() - started
    return out


def protocol_scores(backbone: torch.nn.Module, bank: SplitArrays, queries: SplitArrays, eval_spec: dict[str, Any],
                    seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
    """`{protocol}_top1` and `{protocol}_top5` of every every-chunk protocol on `queries` against `bank` (a downstream
    set: no tasks), computed as `evaluate_backbone`'s, so the same rows give the same numbers to the last bit."""
    _, hits = protocol_hits(backbone, bank, queries, eval_spec, seed=seed, device=device)
    return {f"{name}_top{k}": float(hit.mean()) for name, (top1, top5) in hits.items()
            for k, hit in ((1, top1), (5, top5))}


def headline(metrics: dict[str, Any], names: Iterable[str]) -> dict[str, float]:
    """The overall accuracies `{name}_top1` and `{name}_top5` of each protocol in `names` that `metrics` has
    (an evaluation result, or an eval run's metrics read back)."""
    keys = [f"{name}_top{k}" for name in names for k in (1, 5)]
    return {key: metrics[key] for key in keys if key in metrics}


def task_metrics(result: dict[str, Any], names: Iterable[str]) -> dict[str, float]:
    """An evaluation result's per-task accuracies as eval-run metrics: `{name}_task{t}` (top-1) and
    `{name}_task{t}_top5`; `task_accuracies` reads them back."""
    metrics = {}
    for name in names:
        for suffix in ("", "_top5"):
            for task, value in enumerate(result.get(f"{name}_task_acc{suffix}", [])):
                metrics[f"{name}_task{task}{suffix}"] = value
    return metrics


def task_accuracies(metrics: dict[str, float], names: Iterable[str], num_tasks: int) -> dict[str, list[float]]:
    """Inverse of `task_metrics` over an eval run's metrics: `{name}_task_acc` and `{name}_task_acc_top5`.

    A task that had no query rows has no metric: unknown (NaN), as in the live result. A run logged before
    top-5 existed has no `_task{t}_top5` metric at all: its `{name}_task_acc_top5` is left out, not made NaN.
    """
    out = {}
    for name in names:
        out[f"{name}_task_acc"] = [metrics.get(f"{name}_task{t}", float("nan")) for t in range(num_tasks)]
        if f"{name}_top5" in metrics:
            out[f"{name}_task_acc_top5"] = [metrics.get(f"{name}_task{t}_top5", float("nan"))
                                            for t in range(num_tasks)]
    return out


def _task_units(plan: StreamPlan, task: int) -> str:
    """What task `task` is made of, as task_mask reads it: its chunk's domains, classes, or every row."""
    chunk = plan.chunks[task]
    if plan.kind == "instance":
        return f"chunk {task}: every row"
    if plan.kind == "domain":
        return f"chunk {task}: domains {list(chunk.domains)}"
    return f"chunk {task}: classes {list(chunk.classes)}"


def width_metric(metric: str, width: float) -> str:
    """The eval-run metric of `metric` at `width`: `knn_top1_w0.5`, `params_w1.0` (`width_key` with `_` for `@`,
    which MLflow does not allow in a metric name)."""
    return width_key(metric, width).replace("@", "_")


def calibration_sample(bank: SplitArrays, seed: int, rows: int = CALIBRATION_ROWS) -> torch.Tensor:
    """`rows` bank images (all when the bank is smaller) drawn without replacement by `seed`, in row order."""
    count = len(bank.labels)
    if count < 2:
        raise ValueError(f"BN recalibration needs at least 2 bank rows, the evaluation bank has {count}")
    picked = np.sort(np.random.default_rng(seed).choice(count, size=min(rows, count), replace=False))
    return bank.images[torch.from_numpy(picked)]


def width_scores(backbone: torch.nn.Module, bank: SplitArrays, queries: SplitArrays, eval_spec: dict[str, Any],
                 seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
    """A slimmable backbone at every width of `eval_spec["widths"]` (None: `DEFAULT_WIDTHS`): each every-chunk
    protocol's top-1 (`{protocol}_top1_w{width}`) on features taken after BN recalibration at that width, and the
    width's `params_w{width}` and `macs_w{width}` (one image at the bank's side). The backbone's running
    statistics and width are restored afterwards, so later studies see it as it came."""
    widths = eval_spec.get("widths") or DEFAULT_WIDTHS
    size = eval_spec["batch_size"]
    calibration = calibration_sample(bank, seed)
    saved = {name: buf.clone() for name, buf in backbone.named_buffers()}
    width_before = getattr(backbone, "current_width", 1.0)
    out: dict[str, float] = {}
    try:
        for width in widths:
            (bank_feats, bank_labels), (query_feats, query_labels) = width_features(
                backbone, width, calibration, [lambda: bank.batches(size), lambda: queries.batches(size)],
                device=device, calibration_batch=size)
            for name in eval_spec["every_chunk"]:
                record = EVALUATOR_REGISTRY.require(name)
                ranked = record.build(bank_feats, bank_labels, query_feats, seed=seed,
                                      **record.options(eval_spec.get(name)))
                out[width_metric(f"{name}_top1", width)] = float(topk_hits(ranked, query_labels)[0].float().mean())
            cost = width_cost(backbone, width, int(bank.images.shape[-1]))
            out[width_metric("params", width)] = float(cost["params"])
            out[width_metric("macs", width)] = float(cost["macs"])
    finally:
        buffers = dict(backbone.named_buffers())
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)
        set_width(backbone, width_before)
        backbone.eval()
    return out


def backbone_from_state(config: LoopConfig, state: dict[str, Any] | None) -> torch.nn.Module:
    """The trained encoder of a checkpoint (or the seeded random initialisation when `state` is None)."""
    if state is None:
        return initial_backbone(config).eval()
    return load_backbone(state)


class EvalActor:
    """Wrapped with `ray.remote` by the driver; holds decoded evaluation data between calls."""

    def __init__(self, plan: StreamPlan, manifest, data_spec: dict[str, Any], eval_spec: dict[str, Any],
                 storage_options: dict[str, Any], seed: int, downstream: tuple = ()):
        torch.set_num_threads(1)
        self.plan, self.eval_spec, self.seed = plan, eval_spec, seed
        size = data_spec["image_size"]
        self.bank = load_split_arrays(manifest, data_spec["url"], data_spec["train_split"], size,
                                      storage_options, max_per_class=eval_spec["max_train_per_class"])
        self.queries = load_split_arrays(manifest, data_spec["url"], data_spec["eval_split"], size, storage_options)
        self.downstream = {  # eval.downstream: (bank, queries) of each set, at the pre-training image size
            d.name: (load_split_arrays(d.manifest, d.url, d.train_split, size, d.storage_options,
                                       max_per_class=d.max_train_per_class),
                     load_split_arrays(d.manifest, d.url, d.eval_split, size, d.storage_options))
            for d in downstream}

    def sizes(self) -> dict[str, int]:
        return {"bank": len(self.bank.labels), "queries": len(self.queries.labels)}

    def evaluate(self, config: LoopConfig, checkpoint_uri: str | None, checkpoint_fs=None,
                 previous_uri: str | None = None) -> dict[str, Any]:
        """Every-chunk protocols and the studies the spec turns on; `previous_uri` (the line's previous chunk's
        checkpoint) is what the interpolation starts from."""
        backbone = backbone_from_state(config, self._load(checkpoint_uri, checkpoint_fs))
        result = evaluate_backbone(backbone, self.bank, self.queries, self.plan, self.eval_spec, seed=self.seed)
        if BACKBONE_REGISTRY.require(config.backbone).slimmable:
            result.update(width_scores(backbone, self.bank, self.queries, self.eval_spec, seed=self.seed))
        previous = None
        if previous_uri is not None and self.eval_spec.get("interpolation") is not None:
            previous = backbone_from_state(config, self._load(previous_uri, checkpoint_fs)).state_dict()
        result.update(study_metrics(backbone, self.bank, self.queries, self.eval_spec, seed=self.seed,
                                    previous_state=previous, make_backbone=lambda: initial_backbone(config)))
        result.update(evaluate_downstream(backbone, self.downstream, self.eval_spec, seed=self.seed))
        result["bank_size"], result["query_size"] = len(self.bank.labels), len(self.queries.labels)
        result["corrupt_rows_skipped"] = len(self.bank.skipped) + len(self.queries.skipped)
        return result

    @staticmethod
    def _load(checkpoint_uri: str | None, checkpoint_fs) -> dict[str, Any] | None:
        if checkpoint_uri is None:
            return None
        import ray.train

        fs, path = checkpoint_fs(checkpoint_uri)
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
            return load_state(folder)


def evaluate_downstream(backbone, loaded: dict[str, tuple[Any, Any]], eval_spec: dict[str, Any], *,
                        seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """`{set}.{protocol}_top1` (and `_top5`) for every loaded `eval.downstream` set: `loaded[name] = (bank, queries)`
    SplitArrays, scored with the every-chunk protocols on the frozen backbone."""
    out: dict[str, float] = {}
    for name, (bank, queries) in loaded.items():
        for key, value in protocol_scores(backbone, bank, queries, eval_spec, seed=seed, device=device).items():
            out[f"{name}.{key}"] = value
    return out
