"""The search space of a sweep: checked against the spec before any trial, sampled, and turned into trial specs.

    check_space(raw, sweep, "sweep.yaml")                 # SpecError naming sweep.space.<path> on a bad entry
    trials = sample_points(sweep)                          # random / grid: every trial's values, fixed by the seed
    spec = trial_spec(raw, {"optim.lr": 0.1}, "sweep.yaml")

A value is valid for its field exactly when the spec with that value validates: the probes below (each range's
ends and an inner point, every listed value) go through the same pydantic records as `streamssl run`, so a path
that is not a field, a float for an integer field, or a value outside the field's bounds fails here with the
record's own words, not in trial 7 an hour later.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from orchestrator.errors import SpecError
from orchestrator.spec import Spec, apply_overrides, validate_spec
from orchestrator.spec_sweep import Distribution, SweepSpec

# An inner point of a float range that no bound of a field sits on by accident (0.5 would hide `multiple_of`-like
# rules and integer fields given a float range with integral ends).
_INNER = 0.371


def _probes(dist: Distribution) -> list[Any]:
    kind = dist.kind
    if kind == "uniform":
        low, high = dist.uniform
        return [low, high, low + _INNER * (high - low)]
    if kind == "loguniform":
        low, high = dist.loguniform
        return [low, high, math.exp(math.log(low) + _INNER * (math.log(high) - math.log(low)))]
    if kind == "randint":
        return list(dist.randint)
    return list(dist.values or [])


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw spec without its sweep section, with each dotted path set to its value."""
    base = {key: value for key, value in raw.items() if key != "sweep"}
    try:
        return apply_overrides(base, [f"{path}={json.dumps(value)}" for path, value in values.items()])
    except SpecError as exc:  # (a path through a value that is not a section)
        raise SpecError(str(exc).replace("--set", "sweep.space")) from None


def trial_spec(raw: dict[str, Any], values: dict[str, Any], source: str) -> Spec:
    return validate_spec(with_values(raw, values), source=f"{source} (trial {values})")


def check_space(raw: dict[str, Any], sweep: SweepSpec, source: str) -> None:
    """Every probe of every entry validates in an otherwise unchanged spec, and the metric is one the trials
    report; else one SpecError listing each problem by `sweep.space.<path>`."""
    problems: list[str] = []
    for path, dist in sweep.space.items():
        for value in _probes(dist):
            try:
                validate_spec(with_values(raw, {path: value}), source=source)
            except SpecError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                problems.append(f"sweep.space.{path}: {dist.kind} value {json.dumps(value)} is not valid for the "
                                f"spec field {path}: {detail}")
                break  # one bad value per entry says enough
    if problems:
        raise SpecError(f"{source}: invalid sweep\n" + "\n".join(f"  {line}" for line in problems))
    spec = validate_spec(with_values(raw, {}), source=source)
    reported = reported_metrics(spec)
    if sweep.metric not in reported:
        raise SpecError(f"{source}: sweep.metric: {sweep.metric!r} is not reported by this spec's evaluation; "
                        f"one of {reported}")


def reported_metrics(spec: Spec) -> list[str]:
    """What a trial reports after each chunk (or segment): the evaluation's headline accuracies."""
    return [f"{name}_top{k}" for name in spec.eval.every_chunk for k in (1, 5)]


def sample_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    """The values of every trial of a random or grid search, in trial order; the same seed gives the same list
    (so a resumed sweep knows which trials it has run)."""
    if sweep.search == "grid":
        return sweep.grid_points()[: sweep.trial_count]
    rng = np.random.default_rng(sweep.seed)
    points = []
    for _ in range(sweep.trial_count):
        point = {}
        for path, dist in sweep.space.items():
            point[path] = _sample(dist, rng)
        points.append(point)
    return points


def _sample(dist: Distribution, rng: np.random.Generator) -> Any:
    kind = dist.kind
    if kind == "uniform":
        return float(rng.uniform(*dist.uniform))
    if kind == "loguniform":
        low, high = dist.loguniform
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if kind == "randint":
        low, high = dist.randint
        return int(rng.integers(low, high + 1))
    values = dist.values or []
    return values[int(rng.integers(len(values)))]


def optuna_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's distributions for OptunaSearch. A choice becomes a choice of its index, because Optuna's categorical
    values must be scalars and a choice may list scale pairs; `decode` maps it back."""
    from ray import tune

    space: dict[str, Any] = {}
    for path, dist in sweep.space.items():
        kind = dist.kind
        if kind == "uniform":
            space[path] = tune.uniform(*dist.uniform)
        elif kind == "loguniform":
            space[path] = tune.loguniform(*dist.loguniform)
        elif kind == "randint":
            space[path] = tune.randint(dist.randint[0], dist.randint[1] + 1)  # (Tune's high is excluded)
        else:
            space[path] = tune.choice(list(range(len(dist.values or []))))
    return space


def decode(sweep: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """A Tune config of `optuna_space` as the spec values it stands for."""
    out = {}
    for path, dist in sweep.space.items():
        value = config[path]
        if dist.kind in ("choice", "grid"):
            value = (dist.values or [])[int(value)]
        elif dist.kind == "randint":
            value = int(value)
        else:
            value = float(value)
        out[path] = value
    return out


def encode(sweep: SweepSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `decode` (a finished trial's values, handed back to Optuna on resume)."""
    out = {}
    for path, dist in sweep.space.items():
        value = values[path]
        if dist.kind in ("choice", "grid"):
            listed = dist.values or []
            value = next(i for i, v in enumerate(listed) if json.dumps(v) == json.dumps(value))
        out[path] = value
    return out


__all__ = ["check_space", "decode", "encode", "optuna_space", "reported_metrics", "sample_points", "trial_spec",
           "with_values"]
