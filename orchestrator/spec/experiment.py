"""The experiment spec: typed, frozen, validated once at the edge.

    spec = load_spec("examples/quickstart.yaml", overrides=["optim.lr=0.1"])

Every invalid value becomes a `SpecError` whose message lists each offending field by its dotted path, so the
CLI stops before Ray starts. `flatten(spec)` is the single source of what MLflow records as params.

The component sections come from the records in `trainers.registry`: `lines.method` and `lines.strategy` accept
the registered names; `methods.<name>` is validated against that method's `Config` and comes out as a plain dict
with every default filled in (for every method the lines use, configured or not), so a spec that spells out a
default and one that omits it are the same spec: same params, same identity, same plan key; `backbone` is
discriminated on `name` with that backbone's `Config` as its other fields; `strategy.<name>` is each strategy's
`Config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict

from orchestrator.errors import SpecError
from orchestrator.plan.streams import STREAM_REGISTRY
from orchestrator.spec.errors import SECRET_KEY_PATTERN, describe_validation_error
from orchestrator.spec.eval import EvalSpec
from orchestrator.spec.online import OnlineSpec, online_problems
from orchestrator.spec.overrides import apply_overrides, parse_override  # noqa: F401  (re-exported)
from orchestrator.spec.section import Section, none_is_empty
from orchestrator.spec.sweep import SweepSpec
from orchestrator.spec.views import LocalViewSpec, ViewSpec, ViewsSpec, view_problem  # noqa: F401  (re-exported)
from trainers.registry import (
    BACKBONE_REGISTRY,
    METHOD_REGISTRY,
    STRATEGY_REGISTRY,
    Registry,
    check_backbone_for_method,
)
from trainers.strategies.buffer import RowBuffer
from trainers.views.plan import default_local_size


class SyntheticSpec(Section):
    """Generate the built-in synthetic set at `data.url` when no manifest is there yet."""

    train: int = Field(4000, ge=10, description="training images")
    val: int = Field(1000, ge=10, description="held-out images (evaluation)")
    image_size: int = Field(32, ge=8, le=512, description="side of the stored images in pixels")
    groups: int = Field(6, ge=1, description="coarse groups (distant_class chunks take whole groups)")
    classes_per_group: int = Field(2, ge=1, description="fine classes inside each group")
    domains: int = Field(2, ge=1, description="visual domains (domain streams cut by these)")
    seed: int = Field(0, description="generator seed: same seed, byte-identical shards")


class DataSpec(Section):
    url: str = Field(description="folder (fsspec URL or local path) holding manifest.json and the Parquet shards")
    image_size: int = Field(32, ge=8, le=1024, description="side images are decoded and resized to before views")
    train_split: str = Field("train", description="split the stream is cut from")
    eval_split: str = Field("val", description="held-out split for evaluation")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (credentials, endpoint)")
    synthetic: SyntheticSpec | None = Field(None, description="make the synthetic set at `url` if it is missing")
    class_fraction: float = Field(
        1.0, gt=0, le=1, allow_inf_nan=False,
        description="train on this share of each chunk's classes (seeded by stream.seed), as many steps as the "
                    "full chunk would take; evaluation keeps every class")
    labels: Literal["class", "group"] = Field(
        "class", description="what supervised methods train on: the classes, or the manifest's coarse groups")
    decode: Literal["ray_data", "device"] = Field(
        "ray_data",
        description="where training JPEGs are decoded: 'ray_data' (CPU tasks beside the workers) or 'device' (each "
                    "training worker decodes its batch on its own device: nvjpeg on a GPU, leaving the CPUs free)",
    )


class StreamSpec(Section):
    kind: Literal[STREAM_REGISTRY.names] = Field(description=f"how the data is cut: one of {list(STREAM_REGISTRY.names)}")
    chunks: int = Field(ge=1, le=1000, description="number of chunks T")
    seed: int = Field(0, description="seed of the plan (same seed, same plan)")


MethodName = Literal[METHOD_REGISTRY.names]


def line_strategy(entry: Any, where: str) -> str:
    """A `lines.strategy` entry (`sequential`, `sequential+replay`, or `[sequential, replay, mas]`) as the line's
    strategy name `base+aid+...`: known parts, one base (sequential or joint) first, no part twice."""
    parts = entry if isinstance(entry, list) else str(entry).split("+") if isinstance(entry, str) else None
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(f"{where}: expected a strategy name or a list of them, got {entry!r}")
    parts = [p.strip() for p in parts]
    unknown = [p for p in parts if p not in STRATEGY_REGISTRY]
    if unknown:
        raise ValueError(f"{where}: unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGY_REGISTRY.names)}")
    bases = [p for p in parts if STRATEGY_REGISTRY[p].build.is_base]
    if len(bases) != 1 or parts[0] != bases[0]:
        raise ValueError(f"{where}: {parts} needs exactly one base strategy (sequential or joint), first, then "
                         "the aids (e.g. [sequential, replay, mas])")
    if len(set(parts)) != len(parts):
        raise ValueError(f"{where}: a strategy is listed twice in {parts}")
    for aid in parts[1:]:
        allowed = STRATEGY_REGISTRY[aid].build.bases
        if allowed is not None and parts[0] not in allowed:
            raise ValueError(f"{where}: {aid} needs the base {' or '.join(allowed)}, not {parts[0]} "
                             f"(e.g. [{allowed[0]}, {aid}])")
    return "+".join(parts)


class LinesSpec(Section):
    method: list[MethodName] = Field(min_length=1, description="SSL methods; one line each")
    strategy: list[Union[str, list[str]]] = Field(
        min_length=1,
        description="one line per entry: a base (sequential: chunk t from chunk t-1's weights; joint: chunks 0..t "
                    "together) and any aids after it, as a list or joined with '+': [sequential, replay, mas]",
    )

    @field_validator("strategy")
    @classmethod
    def _strategies(cls, values: list[Any]) -> list[str]:
        return [line_strategy(value, f"lines.strategy[{i}]") for i, value in enumerate(values)]

    @field_validator("method", "strategy")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError(f"entries must be unique, got {values}")
        return values


def _options_section(registry: Registry) -> Any:
    """`{name: options}` validated against each record's Config; plain dicts out, every default filled in.

    A TypedDict keyed by the registered names (unknown names are `extra_forbidden` at `<section>.<name>`); each
    value is that record's Config (so an error names `<section>.<name>.<option>`), dumped to a plain dict after
    validation so callers get keyword arguments.
    """
    fields = {
        record.name: Annotated[
            record.config,
            BeforeValidator(none_is_empty),
            AfterValidator(lambda config: config.model_dump()),
            PlainSerializer(lambda options: options, return_type=dict[str, Any]),
        ]
        for record in registry.values()
    }
    section = TypedDict(f"{registry.kind.title()}Options", fields, total=False)  # type: ignore[misc]
    section.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return section


MethodOptions = _options_section(METHOD_REGISTRY)

DEFAULT_BACKBONE = BACKBONE_REGISTRY.names[0]


def _backbone_variant(record: Any) -> type[BaseModel]:
    """The `backbone:` section for one backbone: `name` plus its Config's fields (frozen, strict, no extras)."""
    return create_model(
        f"BackboneSpec_{record.name}", __base__=record.config, __doc__=record.summary or None,
        name=(Literal[record.name], Field(record.name, description=f"one of {list(BACKBONE_REGISTRY.names)}")),
    )


BACKBONE_VARIANTS: dict[str, type[BaseModel]] = {r.name: _backbone_variant(r) for r in BACKBONE_REGISTRY.values()}


def _backbone_tag(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("name", DEFAULT_BACKBONE)
    return getattr(value, "name", DEFAULT_BACKBONE)  # not a mapping: let the default variant report the type


BackboneSpec = Annotated[
    Union[tuple(Annotated[model, Tag(name)] for name, model in BACKBONE_VARIANTS.items())],
    Discriminator(
        _backbone_tag, custom_error_type="unknown_backbone",
        custom_error_message=f"unknown backbone; known: {', '.join(BACKBONE_REGISTRY.names)}",
    ),
]


class OptimSpec(Section):
    name: Literal["sgd", "adamw", "lars"] = Field(
        "sgd", description="sgd (momentum), adamw, or lars (You et al. 2017; biases and norms not adapted)"
    )
    lr: float = Field(
        0.3, gt=0, description="peak learning rate for the global batch; per 256 samples when lr_scaling is linear"
    )
    lr_scaling: Literal["none", "linear"] = Field(
        "none", description="linear: the peak LR is lr x batch_size / 256 (Goyal et al. 2017); none: lr as given"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of sgd and lars")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay; never applied to biases and norm layers")
    eeta: float = Field(0.001, gt=0, description="LARS trust coefficient (eta in You et al. 2017)")
    epochs_per_chunk: int = Field(1, ge=1, description="passes over each chunk's training data")
    batch_size: int = Field(256, ge=2, description="global batch (split across workers)")
    warmup_epochs: float = Field(
        0.0, ge=0,
        description="linear warm-up, in epochs: at the start of every chunk (cosine, constant) or of the line "
                    "(cosine_line, in epochs of the line's first chunk)",
    )
    sync_bn: bool = Field(
        False, description="the method's heads normalise over the global batch under DDP (as SimCLR's paper), on CPU "
                           "and GPU alike; the backbone keeps per-worker BN"
    )
    schedule: Literal["cosine", "cosine_line", "constant"] = Field(
        "cosine", description="cosine: warm-up + cosine inside each chunk; cosine_line: one warm-up + cosine over "
                              "all chunks of a line; constant: warm-up then the peak LR"
    )


# One field per strategy that has options, each its record's Config with every default (they are few and cheap).
StrategyOptionsSpec = create_model(
    "StrategyOptionsSpec", __base__=Section,
    **{
        record.name: (record.config, Field(default_factory=record.config, description=record.summary or None))
        for record in STRATEGY_REGISTRY.values()
        if record.config.model_fields
    },
)


class ResourcesSpec(Section):
    workers: int = Field(2, ge=1, description="DDP workers (Ray Train)")
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional CPUs leave slots for Ray Data's decode tasks")
    gpus_per_worker: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    lines_per_worker_group: int = Field(
        0, ge=0, description="lines trained inside one worker group (0: all); a group start costs ~20-30 s"
    )
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint inside a chunk (0: chunk ends only)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train may make")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs for the embedded local Ray")


class TrackingSpec(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under storage.workdir")
    experiment: str | None = Field(None, description="MLflow experiment; default the spec name")


class StorageSpec(Section):
    workdir: str = Field("streamssl-runs", description="local working folder (embedded default)")
    checkpoints: str | None = Field(None, description="checkpoint storage URL; default <workdir>/checkpoints")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for checkpoints")


class Spec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="experiment name")
    seed: int = Field(0, description="seed for weights and views")
    data: DataSpec
    stream: StreamSpec
    lines: LinesSpec
    backbone: BackboneSpec = Field(default_factory=BACKBONE_VARIANTS[DEFAULT_BACKBONE])
    views: ViewsSpec = Field(default_factory=ViewsSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    methods: MethodOptions = Field(
        default_factory=dict,
        description="options per method (each method's Config); filled with the defaults of every method in lines",
    )
    strategy: StrategyOptionsSpec = Field(default_factory=StrategyOptionsSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    online: OnlineSpec | None = Field(None, description="stream kind online: how stream batches arrive and are learned")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    sweep: SweepSpec | None = Field(None, description="what `streamssl sweep` searches (ignored by `streamssl run`)")

    @model_validator(mode="after")
    def _consistent(self) -> "Spec":
        # Normalise: every method a line trains gets its full options (defaults filled), so an omitted default and
        # an explicit one give the same spec. The dict is this model's own (made by validation), not the input.
        for method in self.lines.method:
            if method not in self.methods:
                self.methods[method] = METHOD_REGISTRY[method].defaults()
        if self.optim.batch_size % self.resources.workers:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be divisible by resources.workers "
                f"({self.resources.workers}) so every DDP worker gets the same batch"
            )
        for name in self.strategies_used:  # replay, lump: a buffer sharded over the workers, one shard each
            size = getattr(getattr(self.strategy, name, None), "size", None)
            if issubclass(STRATEGY_REGISTRY[name].build, RowBuffer) and size < self.resources.workers:
                raise ValueError(
                    f"strategy.{name}.size ({size}) must be >= resources.workers ({self.resources.workers}): each "
                    "DDP worker holds a shard of the buffer and draws only from its own, so a worker with an empty "
                    "shard would leave every worker without replay"
                )
        # The encoder is built for data.image_size (what evaluation feeds it) and trains on the global views.
        local = [self.local_view_size] if self.views.local.count else []  # a ViT's patch must divide them too
        try:
            self.backbone.check(self.data.image_size, self.view_size, *local)
        except ValueError as exc:
            raise ValueError(
                f"backbone.{exc} (data.image_size {self.data.image_size}, views.global.size {self.view_size}"
                + "".join(f", views.local.size {size}" for size in local) + ")"
            ) from None
        joint_lines = any(s.split("+")[0] == "joint" for s in self.lines.strategy)
        if self.optim.schedule == "cosine_line" and joint_lines and self.strategy.joint.from_scratch:
            raise ValueError(
                "optim.schedule cosine_line runs one schedule over all chunks of a line, but a joint line with "
                "strategy.joint.from_scratch restarts every chunk from random weights; use cosine (per chunk)"
            )
        for method in self.lines.method:
            record = METHOD_REGISTRY[method]
            check_backbone_for_method(method, self.backbone.name)  # a slimmable method needs a slimmable backbone
            if self.views.global_.count < record.min_global_views:
                raise ValueError(
                    f"views.global.count must be >= {record.min_global_views}: {method} compares "
                    f"{record.min_global_views} views of each image"
                )
            if record.needs_local_views and self.local_views_for(method) < 1:
                raise ValueError(
                    f"views.local.count must be >= 1: {method} trains on multi-crop local views besides the global "
                    "ones (e.g. views.local: {count: 6, size: 96} at 224 px)"
                )
        for i, entry in enumerate(self.eval.transfer):
            where = f"eval.transfer: entry {i} ({entry.task})"
            if self.stream.kind == "online":
                raise ValueError(f"{where} runs after chunks of a chunked stream; evaluate an online segment run "
                                 "with `streamssl eval SEGMENT_RUN`")
            beyond = [c for c in entry.after_chunks if c != "last" and c >= self.stream.chunks]
            if beyond:
                raise ValueError(f"{where}: after_chunks {beyond} are not chunks of the stream's {self.stream.chunks} "
                                 f"(0..{self.stream.chunks - 1} or last)")
        problems = online_problems(self.stream.kind, self.online, list(self.lines.strategy), self.resources.workers,
                                   len(self.lines.method) * len(self.lines.strategy))
        if problems:
            raise ValueError("; ".join(problems))
        if self.stream.kind == "online" and self.online is None:
            self.online = OnlineSpec()
        problem = view_problem(self.views, {m: self.local_views_for(m) for m in self.lines.method}, self.methods,
                               sizes=(self.view_size, self.local_view_size))
        if problem:
            raise ValueError(problem)
        return self

    def local_views_for(self, method: str) -> int:
        """How many local views the lines of `method` get."""
        chosen = self.views.local.methods
        return self.views.local.count if chosen is None or method in chosen else 0

    @property
    def local_view_size(self) -> int:
        return self.views.local.size or default_local_size(self.view_size)

    @property
    def view_size(self) -> int:
        return self.views.global_.size or self.data.image_size

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def workdir(self) -> Path:
        return Path(self.storage.workdir).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.workdir / 'mlflow.db'}"

    @property
    def checkpoint_url(self) -> str:
        return self.storage.checkpoints or str(self.workdir / "checkpoints")

    def strategy_options(self, line_strategy: str) -> dict[str, dict[str, Any]]:
        """`{part: options}` for each part of a line's strategy (`sequential+replay`) that has options."""
        return {part: getattr(self.strategy, part).model_dump() for part in line_strategy.split("+")
                if part in StrategyOptionsSpec.model_fields}

    @property
    def strategies_used(self) -> list[str]:
        """Every strategy some line uses, base or aid, in registry order."""
        used = {part for line in self.lines.strategy for part in line.split("+")}
        return [name for name in STRATEGY_REGISTRY.names if name in used]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the YAML field names (aliases), secrets redacted."""
        return redact(self.model_dump(mode="json", by_alias=True))


def redact(value: Any) -> Any:
    """Copy of a JSON-like value with credential-looking keys' values replaced by '***'."""
    if isinstance(value, dict):
        return {
            k: ("***" if SECRET_KEY_PATTERN.search(str(k)) and not isinstance(v, (dict, list)) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def validate_spec(raw: Any, source: str = "spec") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a mapping of fields, got {type(raw).__name__}")
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        lines = describe_validation_error(exc, Spec, {"backbone": BACKBONE_VARIANTS})
        raise SpecError(f"{source}: invalid spec\n" + "\n".join(f"  {line}" for line in lines)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    return validate_spec(read_raw(path, overrides), source=str(path))


def read_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The spec file as plain data with `--set` overrides applied, not validated yet (a sweep varies it)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise SpecError(f"{path}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of fields, got {type(raw).__name__}")
    return apply_overrides(raw, overrides or [])


# Re-exported: what MLflow records of a spec, and its identity (orchestrator.spec.params).
from orchestrator.spec.params import flatten, identity_digest  # noqa: E402,F401
