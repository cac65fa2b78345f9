"""The spec's `sweep:` section: what `streamssl sweep` searches, how, and how it judges a trial.

    sweep:
      metric: knn_top1          # a headline metric of the evaluation, reported after every chunk (or segment)
      mode: max
      trials: 8
      search: optuna            # random | grid | optuna (TPE)
      scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
      space:
        views.global.scale: {choice: [[0.14, 1.0], [0.3, 1.0]]}
        optim.lr: {loguniform: [0.01, 1.0]}
        strategy.replay.size: {randint: [200, 2000]}

Only the section's own shape is checked here; whether each path is a spec field and each value a valid one is
checked against the whole spec by `orchestrator.sweep.space.check_space`, which turns every problem into a
SpecError naming `sweep.space.<path>` before any trial starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.spec.section import Section

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(Section):
    """One searched field: exactly one of the five kinds. Ranges are [low, high]; randint's high is included."""

    uniform: tuple[float, float] | None = Field(None, description="float uniformly in [low, high]")
    loguniform: tuple[float, float] | None = Field(None, description="float log-uniformly in [low, high], low > 0")
    randint: tuple[int, int] | None = Field(None, description="integer uniformly in [low, high] (both included)")
    choice: list[Any] | None = Field(None, min_length=1, description="one of these values (any YAML value)")
    grid: list[Any] | None = Field(None, min_length=1, description="every one of these values (grid search)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}, got {given or 'none'}")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: low must be below high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any] | None:
        """The listed values of a choice or grid (None for a range)."""
        return self.choice if self.choice is not None else self.grid


class SchedulerSpec(Section):
    kind: Literal["none", "asha"] = Field("none", description="asha: stop trials whose proxy falls behind early")
    grace_period: int = Field(1, ge=1, description="reports (chunks or segments) before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA's halving rate")


class TrialResources(Section):
    cpu: float = Field(0.5, gt=0, description="CPUs the trial's driver holds (mostly waiting; its training workers "
                                              "and its evaluation actor ask for their own)")
    gpu: float = Field(0.0, ge=0, description="must be 0: a trial's driver never uses a GPU; its training workers "
                                              "get theirs from resources.gpus_per_worker (their own placement group)")

    @field_validator("gpu")
    @classmethod
    def _no_driver_gpu(cls, gpu: float) -> float:
        # A GPU here sits in the trial driver's bundle, which never uses it: on a one-GPU node the trial's own
        # TorchTrainer could then never get one and the trial would wait forever.
        if gpu:
            raise ValueError(f"{gpu} GPU(s) would be held by the trial's driver, which never uses them (and a "
                             "one-GPU node could then never start the trial's training workers); set it to 0 and "
                             "give the training workers their GPUs with resources.gpus_per_worker")
        return gpu


class SweepSpec(Section):
    metric: str = Field("knn_top1", description="what to optimise: a headline metric of the evaluation "
                                                "(<evaluator>_top1 or _top5), the mean over the spec's lines")
    mode: Literal["max", "min"] = Field("max")
    trials: int | None = Field(None, ge=1, le=10000,
                               description="trials to run (default 4; grid: every grid point, or the first `trials`)")
    search: Literal["random", "grid", "optuna"] = Field("random", description="random, grid, or optuna (TPE)")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    seed: int = Field(0, description="seed of the search: same seed, same trials")
    concurrency: int = Field(1, ge=1, description="trials running at once")
    resources_per_trial: TrialResources = Field(default_factory=TrialResources)
    space: dict[str, Distribution] = Field(min_length=1, description="dotted spec path -> distribution")

    @field_validator("space")
    @classmethod
    def _paths_are_dotted(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for path in space:
            if not all(part.isidentifier() for part in path.split(".")):
                raise ValueError(f"{path!r} is not a dotted field path (e.g. optim.lr)")
            if path.split(".")[0] in ("sweep", "name", "tracking", "storage"):
                raise ValueError(f"{path!r}: the {path.split('.')[0]} section cannot be swept")
        return space

    @model_validator(mode="after")
    def _search_fits_space(self) -> "SweepSpec":
        kinds = {path: dist.kind for path, dist in self.space.items()}
        if self.search == "grid" and any(kind != "grid" for kind in kinds.values()):
            ranged = [p for p, k in kinds.items() if k != "grid"]
            raise ValueError(f"search grid needs every space entry to be a grid; not: {ranged}")
        if self.search != "grid" and any(kind == "grid" for kind in kinds.values()):
            gridded = [p for p, k in kinds.items() if k == "grid"]
            raise ValueError(f"search {self.search} cannot take grid entries ({gridded}); use choice, or search grid")
        return self

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid entries, the first path varying slowest."""
        points: list[dict[str, Any]] = [{}]
        for path, dist in self.space.items():
            points = [{**point, path: value} for point in points for value in dist.grid or []]
        return points

    @property
    def trial_count(self) -> int:
        if self.search == "grid":
            combos = len(self.grid_points())
            return min(combos, self.trials or combos)
        return self.trials or 4


__all__ = ["DISTRIBUTIONS", "Distribution", "SchedulerSpec", "SweepSpec", "TrialResources"]
