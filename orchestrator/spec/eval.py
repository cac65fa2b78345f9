"""The spec's `eval` section: the protocols run after every chunk, and the optional studies of a representation.

Split from `orchestrator.spec.experiment` (which imports `EvalSpec` into `Spec`). `eval.<protocol>` holds each registered
evaluator's Config (`eval.knn.k`, `eval.linear.lr`), defaults filled in. The optional studies are off unless their
section is given (`eval.fewshot: {}` turns few-shot on with its defaults; null or absent: off): `fewshot`, `sharpness` and
`interpolation` (the kNN accuracy between consecutive chunks' weights), evaluated by
`orchestrator.evaluate.studies` on the same bank and queries. `eval.widths`: the widths a slimmable backbone is
evaluated at (null: `evaluators.slimmable.DEFAULT_WIDTHS`). `eval.transfer`: transfer tasks after chosen chunks
(`orchestrator.spec.transfer.TransferEntry`, run by `orchestrator.run.transfer.after_chunk_transfers`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, create_model, field_validator

from evaluators.fewshot import FewShotConfig
from evaluators.interpolation import InterpolationConfig
from evaluators.registry import EVALUATOR_REGISTRY
from evaluators.sharpness import SharpnessConfig
from evaluators.slimmable import DEFAULT_WIDTHS
from orchestrator.spec.section import Section, none_is_empty
from orchestrator.spec.transfer import TransferEntry

EvaluatorName = Literal[EVALUATOR_REGISTRY.names]


class DownstreamSpec(Section):
    """An `eval.downstream` entry: a data set the frozen backbone is evaluated on after every chunk."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="names its metrics: `<name>.knn_top1`")
    url: str = Field(description="prepared shards (a folder with manifest.json; any fsspec URL) or a local "
                                 "ImageFolder tree, prepared once into the workdir")
    train_split: str = Field("train", description="the kNN bank / linear probe's training rows")
    eval_split: str = Field("val", description="the rows accuracy is measured on")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `url`")
    max_train_per_class: int | None = Field(None, ge=1, description="cap the training rows per class")


class _EvalSpecBase(Section):
    every_chunk: list[EvaluatorName] = Field(
        default_factory=lambda: list(EVALUATOR_REGISTRY.names),
        description=f"protocols run after every chunk; one of {list(EVALUATOR_REGISTRY.names)} each",
    )
    max_train_per_class: int | None = Field(None, ge=1, description="cap the kNN/linear training bank per class")
    batch_size: int = Field(256, ge=1, description="rows per forward pass when extracting features")
    baseline: bool = Field(True, description="also evaluate the random initialisation (for FWT and as a floor)")
    every_epochs: int = Field(
        0, ge=0, description="also checkpoint and evaluate every k epochs inside a chunk, to see accuracy saturate "
                             "or decline with longer pre-training (0: at chunk ends only)")
    downstream: list[DownstreamSpec] = Field(
        default_factory=list, description="more data sets evaluated after every chunk (held-out classes, other "
                                          "domains, other data), each with the every-chunk protocols")
    transfer: list[TransferEntry] = Field(
        default_factory=list, description="transfer tasks (finetune, linear, fewshot, reconstruction) on downstream "
                                          "sets, run on the checkpoints of the chosen chunks of every line once the "
                                          "plan has trained; each an evaluation run under its chunk run")
    fewshot: FewShotConfig | None = Field(
        None, description="N-way K-shot episodes on the held-out features after every chunk (off when absent)")
    sharpness: SharpnessConfig | None = Field(
        None, description="relative kNN drop under the worst bounded weight perturbation found, after every chunk "
                          "(off when absent; costs about (search_steps + restarts) evaluations per eps)")
    interpolation: InterpolationConfig | None = Field(
        None, description="kNN accuracy along the straight line from the previous chunk's weights to this chunk's "
                          "(off when absent)")

    widths: list[float] | None = Field(
        None, min_length=1,
        description=f"a slimmable backbone is also evaluated at each of these widths in [0.25, 1.0] after every "
                    f"chunk (BN recalibrated per width; every every-chunk protocol, params and MACs); null: "
                    f"{list(DEFAULT_WIDTHS)}")

    @field_validator("widths")
    @classmethod
    def _widths(cls, values: list[float] | None) -> list[float] | None:
        if values is None:
            return None
        if any(not 0.25 <= v <= 1.0 for v in values):
            raise ValueError(f"every width must be in [0.25, 1.0], got {values}")
        if len({round(v, 4) for v in values}) != len(values):  # width_key names a width to 4 decimals
            raise ValueError(f"widths must be distinct, got {values}")
        return values

    @field_validator("every_chunk")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError(f"entries must be unique, got {values}")
        return values

    @field_validator("downstream")
    @classmethod
    def _unique_names(cls, values: list[DownstreamSpec]) -> list[DownstreamSpec]:
        names = [v.name for v in values]
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, got {names}")
        if "downstream" in names:  # the name of the mean over the sets (`{line}.downstream.knn.st_jt_gap`)
            raise ValueError("'downstream' names the mean over the sets; call the set something else")
        return values


EvalSpec = create_model(
    "EvalSpec", __base__=_EvalSpecBase,
    **{
        record.name: (Annotated[record.config, BeforeValidator(none_is_empty)],
                      Field(default_factory=record.config, description=record.summary))
        for record in EVALUATOR_REGISTRY.values()
    },
)
