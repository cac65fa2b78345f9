"""Transfer evaluation of one checkpoint on a downstream set: the task registry and the Ray task that runs one.

    outcome = run_transfer(spec, checkpoint_uri, data_url, manifest)         # in-process (tests), plain PyTorch
    ref = ray.remote(run_transfer).options(num_gpus=1).remote(...)          # what `streamssl eval` does

`TRANSFER_TASKS[name]` is a `TransferTask`: how the task turns a backbone and the set's train and eval splits into a
`TransferOutcome`: `scores` (the headline numbers that score the checkpoint's LoggedModel), `metrics` (budgets and
details for the evaluation run), `records` (JSON artifacts) and `images` (PNG artifacts). A task `reads` either a
classification set (decoded `SplitArrays`) or a detection set (`DetectionShards`, decoded image by image).

The backbone comes from the checkpoint through `trainers.engine.checkpoint.load_backbone` (or, for `init=random`,
is its architecture freshly initialised from the seed); NormRescale (when the spec asks for it) is applied before
the task. The task runs on the GPU when the Ray task was given one, else CPU.
Nothing here writes to MLflow: `orchestrator.run.transfer` logs what this returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch

from evaluators.detection import build_detector, evaluate_detector, train_detector
from evaluators.features import extract_features
from evaluators.fewshot import few_shot_accuracy
from evaluators.finetune import label_fraction_finetune
from evaluators.label_subsets import check_disjoint
from evaluators.linear import fit_linear_probe
from evaluators.norm_rescale import norm_rescale
from evaluators.reconstruction import reconstruction_error
from orchestrator import storage
from orchestrator.data.detection_shards import DetectionManifest, DetectionShards
from orchestrator.data.ingest import SplitArrays, load_split_arrays
from orchestrator.data.manifest import Manifest
from orchestrator.spec.transfer import DETECTION_TASKS, TASKS, TransferSpec
from trainers.engine.checkpoint import load_backbone, load_state, random_backbone

TOP_K = 5


@dataclass(frozen=True)
class TransferOutcome:
    scores: dict[str, float]  # e.g. {"finetune_10pct_top1": 0.41}: score the LoggedModel (the set's name is prefixed)
    metrics: dict[str, float] = field(default_factory=dict)  # budgets and details, on the evaluation run only
    records: dict[str, Any] = field(default_factory=dict)  # file name -> JSON-able artifact
    images: dict[str, np.ndarray] = field(default_factory=dict)  # file name -> uint8 [H, W, 3] PNG artifact


@dataclass(frozen=True)
class TransferTask:
    name: str
    summary: str
    run: Callable[[torch.nn.Module, Any, Any, TransferSpec, str], TransferOutcome]  # (backbone, train, test, ...)
    reads: Literal["classification", "detection"] = "classification"  # SplitArrays, or DetectionShards


def percent(fraction: float) -> str:
    """0.1 -> '10pct', 0.01 -> '1pct', 0.005 -> '0.5pct': a label fraction as a metric name part."""
    return f"{fraction * 100:g}pct"


def _labels(split: SplitArrays) -> torch.Tensor:
    return torch.from_numpy(split.labels)


def _finetune(backbone, train: SplitArrays, test: SplitArrays, spec: TransferSpec, device: str) -> TransferOutcome:
    config = spec.finetune
    result, subset = label_fraction_finetune(backbone, train.images, _labels(train), test.images, _labels(test),
                                             config, seed=spec.seed, device=device)
    check_disjoint(subset, test.keys, subset_keys=train.keys)  # a key in both splits would score seen rows
    name = f"finetune_{percent(config.label_fraction)}"
    record = {**subset.to_record(), "split": spec.data.train_split,
              "keys": [train.keys[i] for i in subset.indices.tolist()]}
    return TransferOutcome(
        scores={f"{name}_top1": result.top1, f"{name}_top5": result.top5},
        metrics={"train_rows": result.train_rows, "val_rows": result.val_rows, "steps": result.steps,
                 "epochs": result.epochs, "num_classes": result.num_classes, "final_loss": result.final_loss},
        records={"label_subset.json": record})


def _features(backbone, split: SplitArrays, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return extract_features(backbone.to(device), split.batches(256), device=device)


def _linear(backbone, train: SplitArrays, test: SplitArrays, spec: TransferSpec, device: str) -> TransferOutcome:
    train_x, train_y = _features(backbone, train, device)
    test_x, test_y = _features(backbone, test, device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    probe = fit_linear_probe(train_x, train_y, seed=spec.seed, num_classes=num_classes, device=device,
                             **spec.linear.model_dump())
    hits = probe.rank(test_x, top=TOP_K) == test_y[:, None]
    return TransferOutcome(
        scores={"linear_top1": float(hits[:, 0].double().mean()), "linear_top5": float(hits.any(1).double().mean())},
        metrics={"train_rows": len(train_y), "val_rows": len(test_y), "num_classes": num_classes})


def _fewshot(backbone, train: SplitArrays, test: SplitArrays, spec: TransferSpec, device: str) -> TransferOutcome:
    options = spec.fewshot
    train_x, train_y = _features(backbone, train, device)
    test_x, test_y = _features(backbone, test, device)
    result = few_shot_accuracy(train_x, train_y, test_x, test_y, seed=spec.seed, **options.model_dump())
    name = f"fewshot_{options.way}way{options.shot}shot"
    return TransferOutcome(scores={f"{name}_mean": result.mean, f"{name}_ci95": result.ci95},
                           metrics={"episodes": result.episodes},
                           records={"fewshot_episodes.json": result.to_dict()})


def _reconstruction(backbone, train: SplitArrays, test: SplitArrays, spec: TransferSpec,
                    device: str) -> TransferOutcome:
    result = reconstruction_error(backbone.to(device), train.images, test.images, seed=spec.seed, device=device,
                                  **spec.reconstruction.model_dump())
    numbers = result.to_dict()
    return TransferOutcome(
        scores={"reconstruction_mse": result.mse, "reconstruction_relative_mse": result.relative_mse},
        metrics={k: float(v) for k, v in numbers.items() if k not in ("mse", "relative_mse")},
        images={"reconstructions.png": result.grid} if result.grid.size else {})


def _detector(backbone, train: DetectionShards, test: DetectionShards, spec: TransferSpec,
              device: str) -> TransferOutcome:
    """Faster R-CNN (detection) or Mask R-CNN (segmentation) around the backbone, trained on the train split and
    scored by COCO AP on the eval split; scores `<task>_ap`, `_ap50`, `_ap75` (+ `<task>_mask_ap`... for masks)."""
    options = spec.task_options()
    model = build_detector(backbone, len(train.classes), options.detector(DETECTION_TASKS[spec.task]), seed=spec.seed)
    started = time.perf_counter()

    def report(step: int, total: int, losses) -> None:  # minutes on a CPU: Ray forwards this to the driver's console
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            print(f"{spec.task}: step {step}/{total}, loss {losses['loss']:.3f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)

    trained = train_detector(model, train, steps=options.steps, seed=spec.seed, device=device, progress=report,
                             **options.training())
    scores = evaluate_detector(model, test, batch_size=options.eval_batch_size, device=device)
    budget = trained.to_dict()
    return TransferOutcome(
        scores={f"{spec.task}_{k}": v for k, v in scores.items()},
        metrics={"steps": trained.steps, "batch_size": trained.batch_size, "train_images": trained.train_images,
                 "val_images": len(test), "epochs": trained.epochs, "num_classes": len(train.classes),
                 "first_loss": trained.first_loss, "final_loss": trained.final_loss,
                 **{f"final_{k}": v for k, v in trained.final_terms.items()}},
        records={f"{spec.task}_training.json": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in budget.items()}})


TRANSFER_TASKS: dict[str, TransferTask] = {
    "finetune": TransferTask("finetune", "the whole network on a class-balanced label fraction; top-1/top-5",
                             _finetune),
    "linear": TransferTask("linear", "many-shot linear probe on frozen features; top-1/top-5", _linear),
    "fewshot": TransferTask("fewshot", "N-way K-shot episodes on frozen features; mean and 95% interval", _fewshot),
    "reconstruction": TransferTask("reconstruction", "decoder on frozen features; pixel MSE and a sample grid",
                                   _reconstruction),
    "detection": TransferTask("detection", "Faster R-CNN (FPN) fine-tuned on a detection set; box AP, AP50, AP75",
                              _detector, reads="detection"),
    "segmentation": TransferTask("segmentation", "Mask R-CNN (FPN) fine-tuned on a COCO-format set; box and mask AP",
                                 _detector, reads="detection"),
}
assert tuple(TRANSFER_TASKS) == TASKS, "every task the spec accepts has a runner, and no other"


def read_checkpoint(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint folder's verified state, wherever it is stored."""
    import ray.train

    fs, path = storage.pyarrow_filesystem(uri, storage_options)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
        return load_state(folder)


def _splits(spec: TransferSpec, state: dict[str, Any], data_url: str, manifest: Manifest | DetectionManifest,
            data_options: dict[str, Any]) -> tuple[Any, Any, int]:
    """(train, test, image size) of the downstream set, read as the task reads it."""
    if TRANSFER_TASKS[spec.task].reads == "detection":
        masks = spec.task == "segmentation"
        train = DetectionShards(data_url, spec.data.train_split, masks=masks, storage_options=data_options,
                                manifest=manifest)
        test = DetectionShards(data_url, spec.data.eval_split, masks=masks, storage_options=data_options,
                               manifest=manifest)
        return train, test, spec.task_options().min_size
    config = state["config"]
    size = spec.image_size or int(config["image_size"] if isinstance(config, dict) else config.image_size)
    train = load_split_arrays(manifest, data_url, spec.data.train_split, size, data_options,
                              max_per_class=spec.data.max_train_per_class)
    test = load_split_arrays(manifest, data_url, spec.data.eval_split, size, data_options)
    return train, test, size


def run_transfer(spec: TransferSpec, checkpoint_uri: str, data_url: str, manifest: Manifest | DetectionManifest,
                 data_options: dict[str, Any], anchor_uri: str | None = None) -> dict[str, Any]:
    """The Ray task: load the backbone, read the set's splits, NormRescale, run the task. Returns the outcome's
    parts and what was measured on the way (`image_size`, `device`, `seconds`, NormRescale's per-layer norms)."""
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = read_checkpoint(checkpoint_uri, spec.checkpoint_storage_options)
    backbone = load_backbone(state) if spec.init == "checkpoint" else random_backbone(state, spec.seed)
    train, test, size = _splits(spec, state, data_url, manifest, data_options)
    metrics: dict[str, float] = {}
    records: dict[str, Any] = {}
    if spec.norm_rescale is not None:
        anchor = None
        if anchor_uri is not None:
            anchor = load_backbone(read_checkpoint(anchor_uri, spec.checkpoint_storage_options))
        rescaled = norm_rescale(backbone, anchor=anchor, **spec.norm_rescale.model_dump())
        metrics.update(rescaled.metrics())
        records["norm_rescale.json"] = rescaled.to_dict()
    outcome = TRANSFER_TASKS[spec.task].run(backbone, train, test, spec, device)
    metrics.update(outcome.metrics)
    if isinstance(train, SplitArrays):
        metrics["corrupt_rows_skipped"] = len(train.skipped) + len(test.skipped)
    metrics["transfer_seconds"] = time.perf_counter() - started
    return {"scores": dict(outcome.scores), "metrics": metrics, "records": {**records, **outcome.records},
            "images": dict(outcome.images), "image_size": size, "device": device}


__all__ = ["TRANSFER_TASKS", "TransferOutcome", "TransferTask", "percent", "read_checkpoint", "run_transfer"]
