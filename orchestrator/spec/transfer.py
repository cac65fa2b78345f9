"""The options of one transfer evaluation (`streamssl eval RUN_ID --task T --data URL --set ...`): which task, on
which downstream set, with which settings. The same section is what a spec's future `eval.transfer` entries hold.

    spec = transfer_spec("finetune", "streamssl-runs/data/synth-downstream", ["fraction=0.01", "epochs=5"])
    spec.finetune.label_fraction, spec.task_options()          # 0.01, the chosen task's FinetuneConfig
    transfer_params(spec)                                      # what MLflow records as the evaluation's params

`--set` takes dotted paths into this section (`finetune.epochs=5`, `norm_rescale.mode=constant`,
`data.train_split=train`) and, for brevity, a bare option of the chosen task (`epochs=5`, `way=10`, `shot=1`,
`fraction=0.1` for `finetune.label_fraction`). An unknown key or a bad value is a SpecError naming it.
`TASKS` is the list a task name is checked against; each name has its options here and its runner in
`orchestrator.evaluate.transfer.TRANSFER_TASKS`. Detection and segmentation read a detection set (prepared by
`streamssl data prepare-detection`), the other tasks a classification set. `init=random` runs the task on the
checkpoint's architecture with fresh weights from `seed`: the from-scratch baseline of the same transfer.
A spec's `eval.transfer` list holds `TransferEntry`s: the same options and the chunks they run after.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from evaluators.detection import DetectionTaskConfig
from evaluators.fewshot import FewShotConfig
from evaluators.finetune import FinetuneConfig
from evaluators.linear import LinearConfig
from evaluators.norm_rescale import NormRescaleConfig
from evaluators.reconstruction import ReconstructionConfig
from orchestrator.errors import SpecError
from orchestrator.spec.errors import describe_validation_error
from orchestrator.spec.overrides import parse_override
from orchestrator.spec.section import Section

TASKS = ("finetune", "linear", "fewshot", "reconstruction", "detection", "segmentation")
# The tasks that read a detection set, and the detector each trains.
DETECTION_TASKS = {"detection": "faster_rcnn", "segmentation": "mask_rcnn"}
INITS = ("checkpoint", "random")
# Bare `--set` keys that are not the option's own name.
ALIASES = {"fraction": "label_fraction"}


class TransferDataSpec(Section):
    """The downstream set: prepared shards (manifest.json beside them) or a local ImageFolder tree; for detection
    and segmentation a prepared detection set (detection_manifest.json beside its shards)."""

    url: str = Field(description="prepared shards (any fsspec URL or local folder) or a local ImageFolder tree, "
                                 "prepared once into streamssl-runs/downstream/<name>; detection and segmentation: "
                                 "a set prepared by `streamssl data prepare-detection`")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$",
                             description="names the metrics (`<name>.finetune_10pct_top1`); default: the URL's "
                                         "last folder")
    train_split: str = Field("train", description="rows the task trains on (fine-tuning subset, probe, support)")
    eval_split: str = Field("val", description="rows the task is scored on (disjoint from the training rows)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `url`")
    max_train_per_class: int | None = Field(None, ge=1, description="cap the training rows per class")

    @property
    def set_name(self) -> str:
        if self.name:
            return self.name
        tail = self.url.rstrip("/").rsplit("/", 1)[-1] or "downstream"
        return re.sub(r"[^A-Za-z0-9_-]", "-", tail)


class TransferSpec(Section):
    task: Literal[TASKS] = Field(description=f"the transfer task: one of {list(TASKS)}")
    data: TransferDataSpec
    seed: int = Field(0, ge=0, description="seeds the label subset, episodes, batch order and heads")
    init: Literal[INITS] = Field("checkpoint", description="checkpoint: the trained backbone; random: the same "
                                                           "architecture freshly initialised from `seed` (the "
                                                           "from-scratch baseline)")
    image_size: int | None = Field(None, ge=8, le=1024,
                                   description="side the downstream images are decoded to; default: the "
                                               "checkpoint's pre-training image size (classification tasks; "
                                               "detectors resize by detection.min_size / max_size)")
    checkpoint_storage_options: dict[str, Any] = Field(default_factory=dict,
                                                       description="fsspec options to read the checkpoint with")
    norm_rescale: NormRescaleConfig | None = Field(
        None, description="rescale the backbone's per-layer weight norms before the task (off when absent)")
    norm_rescale_anchor: str | None = Field(
        None, description="run id whose checkpoint is the anchor of norm_rescale.mode=anchor (e.g. a supervised "
                          "line's chunk run)")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="label-fraction fine-tuning")
    linear: LinearConfig = Field(default_factory=LinearConfig, description="many-shot linear probe")
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig,
                                   description="N-way K-shot episodes: support from the train split, queries from "
                                               "the eval split")
    reconstruction: ReconstructionConfig = Field(default_factory=ReconstructionConfig,
                                                 description="decoder on frozen features reconstructing the input")
    detection: DetectionTaskConfig = Field(default_factory=DetectionTaskConfig,
                                           description="Faster R-CNN (FPN) around the backbone; box AP")
    segmentation: DetectionTaskConfig = Field(default_factory=DetectionTaskConfig,
                                              description="Mask R-CNN (FPN) around the backbone; box and mask AP")

    @model_validator(mode="after")
    def _anchor_goes_with_anchor_mode(self) -> TransferSpec:
        anchored = self.norm_rescale is not None and self.norm_rescale.mode == "anchor"
        if anchored and self.norm_rescale_anchor is None:
            raise ValueError("norm_rescale.mode: anchor needs the run id of the anchor model "
                             "(--set norm_rescale_anchor=RUN_ID); or use mode=constant / mode=scale")
        if self.norm_rescale_anchor is not None and not anchored:
            raise ValueError("norm_rescale.mode: norm_rescale_anchor is given, but the mode is not anchor")
        if self.task in DETECTION_TASKS and self.image_size is not None:
            raise ValueError(f"image_size: {self.task} resizes images by {self.task}.min_size and "
                             f"{self.task}.max_size; image_size is for the classification tasks")
        if self.task in DETECTION_TASKS and self.data.max_train_per_class is not None:
            raise ValueError(f"data.max_train_per_class: a {self.task} set has objects, not one class per image")
        return self

    def task_options(self):
        """The chosen task's options (a ComponentConfig)."""
        return getattr(self, self.task)


class TransferEntry(TransferSpec):
    """An `eval.transfer` entry: one transfer task a run does after the chosen chunks of every line (once the plan
    has trained; a resume skips what is logged)."""

    after_chunks: list[int | Literal["last"]] = Field(
        default_factory=lambda: ["last"], min_length=1,
        description="chunk indices (0-based) or `last`: the chunk runs of every line whose checkpoint is evaluated")

    @model_validator(mode="after")
    def _chunks_are_indices(self) -> TransferEntry:
        if any(isinstance(c, int) and c < 0 for c in self.after_chunks):
            raise ValueError(f"after_chunks: chunk indices are >= 0 (or last), got {self.after_chunks}")
        return self

    def chunks(self, num_chunks: int) -> list[int]:
        """The chunk indices this entry evaluates in a stream of `num_chunks` chunks, sorted."""
        return sorted({num_chunks - 1 if c == "last" else c for c in self.after_chunks})


def _route(path: list[str], task: str) -> list[str]:
    """A bare key that is not a field of the section is an option of the chosen task (`epochs` -> `finetune.epochs`)."""
    if len(path) != 1 or path[0] in TransferSpec.model_fields:
        return path
    key = ALIASES.get(path[0], path[0])
    options = TransferSpec.model_fields[task].annotation.model_fields
    if key not in options:
        raise SpecError(f"--set {path[0]}: neither a field of the transfer evaluation "
                        f"({', '.join(TransferSpec.model_fields)}) nor an option of {task} ({', '.join(options)})")
    return [task, key]


def transfer_spec(task: str, data_url: str, sets: list[str] | tuple[str, ...] = ()) -> TransferSpec:
    """The validated options of one transfer evaluation; a SpecError naming every bad `--set` key or value."""
    if task not in TASKS:
        raise SpecError(f"--task {task!r}: unknown transfer task; known: {', '.join(TASKS)}")
    raw: dict[str, Any] = {"task": task, "data": {"url": data_url}}
    for text in sets:
        path, value = parse_override(text)
        path = _route(path, task)
        if path[0] in ("task", "data") and len(path) == 1:
            raise SpecError(f"--set {text!r}: the task and the data URL are --task and --data")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    try:
        return TransferSpec.model_validate(raw)
    except ValidationError as exc:
        lines = describe_validation_error(exc, TransferSpec, {})
        raise SpecError("invalid transfer options\n" + "\n".join(f"  {line}" for line in lines)) from None


def transfer_params(spec: TransferSpec) -> dict[str, str]:
    """The evaluation's params: the task, its set, seed and sizes, NormRescale's and the chosen task's options
    (defaults included, so evaluations of one task line up in MLflow's compare view)."""
    params = {"task": spec.task, "init": spec.init, "data.url": spec.data.url, "data.name": spec.data.set_name,
              "data.train_split": spec.data.train_split, "data.eval_split": spec.data.eval_split,
              "data.max_train_per_class": str(spec.data.max_train_per_class), "seed": str(spec.seed),
              "image_size": str(spec.image_size), "norm_rescale": "off" if spec.norm_rescale is None else "on"}
    if spec.norm_rescale is not None:
        params.update({f"norm_rescale.{k}": str(v) for k, v in spec.norm_rescale.model_dump().items()})
        params["norm_rescale.anchor"] = str(spec.norm_rescale_anchor)
    params.update({f"{spec.task}.{k}": str(v) for k, v in spec.task_options().model_dump().items()})
    return params


__all__ = ["ALIASES", "DETECTION_TASKS", "INITS", "TASKS", "TransferDataSpec", "TransferEntry", "TransferSpec",
           "transfer_params", "transfer_spec"]
