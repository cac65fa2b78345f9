"""The search space of a sweep: checked against the spec before any trial, sampled, and turned into trial specs.

    check_space(raw, sweep, "sweep.yaml")                 # SpecError naming sweep.space.<path> on a bad entry
    trials = sample_points(sweep)                          # random / grid: every trial's values, fixed by the seed
    spec = trial_spec(raw, {"optim.lr": 0.1}, "sweep.yaml")

A space is valid exactly when every point the sweep can run is a valid spec as a whole: grid and random points
are all known up front (every combination; the seeded draws), so each is validated; Optuna's are not, so the corners
of the joint box (each range's ends times every listed value) and an inner point are. Each goes through the same
pydantic records as `streamssl run`, so a path that is not a field, a float for an integer field, a value outside
its bounds, or two values that cannot go together (`views.global.size` x `views.local.size`) fail here with the
record's own words, not in trial 7 an hour later; and values that are only valid together (a short
`online.pct_start` with more `online.steps_per_batch`) are accepted.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from orchestrator.errors import SpecError
from orchestrator.spec.experiment import Spec, apply_overrides, validate_spec
from orchestrator.spec.sweep import Distribution, SweepSpec

# An inner point of a float range that no bound of a field sits on by accident (0.5 would hide `multiple_of`-like
# rules and integer fields given a float range with integral ends).
_INNER = 0.371
# More points than this in one check (a huge grid, or a box of many choices) are refused rather than validated for
# minutes: the sweep itself would run them.
MAX_CHECKED_POINTS = 20000


def _ends(dist: Distribution) -> list[Any]:
    """The values a corner of the joint box takes on this axis: a range's ends, or every listed value."""
    if dist.kind in ("uniform", "loguniform", "randint"):
        return list(getattr(dist, dist.kind))
    return list(dist.values or [])


def _inner(dist: Distribution) -> Any:
    kind = dist.kind
    if kind == "uniform":
        low, high = dist.uniform
        return low + _INNER * (high - low)
    if kind == "loguniform":
        low, high = dist.loguniform
        return math.exp(math.log(low) + _INNER * (math.log(high) - math.log(low)))
    if kind == "randint":
        return dist.randint[0]
    return (dist.values or [None])[0]


def checked_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    """The whole points a sweep's space is checked at: grid and random, exactly the trials' points (known up front);
    Optuna, every corner of the joint box (each range's ends times every listed value) and one inner point."""
    if sweep.search != "optuna":
        return sample_points(sweep)
    corners: list[dict[str, Any]] = [{}]
    for path, dist in sweep.space.items():
        corners = [{**corner, path: value} for corner in corners for value in _ends(dist)]
        if len(corners) > MAX_CHECKED_POINTS:
            raise SpecError(f"sweep.space: the joint box has more than {MAX_CHECKED_POINTS} corners; search fewer "
                            "fields at once or list fewer choices")
    return corners + [{path: _inner(dist) for path, dist in sweep.space.items()}]


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw spec without its sweep section, with each dotted path set to its value."""
    base = {key: value for key, value in raw.items() if key != "sweep"}
    try:
        return apply_overrides(base, [f"{path}={json.dumps(value)}" for path, value in values.items()])
    except SpecError as exc:  # (a path through a value that is not a section)
        raise SpecError(str(exc).replace("--set", "sweep.space")) from None


def trial_spec(raw: dict[str, Any], values: dict[str, Any], source: str) -> Spec:
    return validate_spec(with_values(raw, values), source=f"{source} (trial {values})")


def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.replace("[", ".").replace("]", "").split("."))


def _failing_paths(raw: dict[str, Any], values: dict[str, Any], source: str) -> set[str]:
    """The paths of the error lines the spec with only `values` set fails with (empty when it is valid)."""
    try:
        validate_spec(with_values(raw, values), source=source)
    except SpecError as exc:
        return {line.strip().split(":", 1)[0] for line in str(exc).split("\n")[1:] if line.strip()} or {"?"}
    return set()


def _named(raw: dict[str, Any], detail: str, point: dict[str, Any], source: str) -> list[str]:
    """The searched fields one error line (`path: message`) is about: those on its path (or under it) when their
    values alone already fail that way; else every field of the point (a rule across fields)."""
    where = _parts(detail.split(":", 1)[0].strip())
    hit = [path for path in point
           if _parts(path)[: len(where)] == where[: len(_parts(path))] and where[: len(_parts(path))]]
    if hit and len(hit) < len(point):
        alone = _failing_paths(raw, {path: point[path] for path in hit}, source)
        if detail.split(":", 1)[0].strip() not in alone:
            return list(point)  # valid with the base spec's other values: it is this combination that fails
    return hit or list(point)


def check_space(raw: dict[str, Any], sweep: SweepSpec, source: str) -> None:
    """Every point the sweep can run validates as a whole spec (`checked_points`: all grid combinations, the
    seeded random points, the corners of Optuna's box), and the metric is one the trials report; else one
    SpecError listing each problem with the searched fields and values it involves, as `sweep.space.<path> = v`."""
    points = checked_points(sweep)
    if sweep.search == "grid" and len(points) > MAX_CHECKED_POINTS:
        raise SpecError(f"{source}: sweep.space: the grid has {len(points)} points; at most {MAX_CHECKED_POINTS}")
    problems: dict[tuple, str] = {}
    failing = 0
    for number, point in enumerate(points):
        try:
            validate_spec(with_values(raw, point), source=source)
        except SpecError as exc:
            failing += 1
            details = [line.strip() for line in str(exc).split("\n")[1:] if line.strip()] or [str(exc)]
            for detail in details:
                named = _named(raw, detail, point, source)
                key = (tuple(named), detail.split(":", 1)[0])  # one line per field(s) and rule says enough
                if key in problems:
                    continue
                values = ", ".join(f"sweep.space.{path} = {json.dumps(point[path])}" for path in named)
                together = " together" if len(named) > 1 else ""
                problems[key] = (f"{values}{together} ({_point_name(sweep, number)}) is not a valid spec: {detail}")
    if problems:
        shown = list(problems.values())
        raise SpecError(f"{source}: invalid sweep: {failing} of the {len(points)} points checked "
                        f"({_checked(sweep)}) are not valid specs\n" + "\n".join(f"  {line}" for line in shown))
    spec = validate_spec(with_values(raw, {}), source=source)
    reported = reported_metrics(spec)
    if sweep.metric not in reported:
        raise SpecError(f"{source}: sweep.metric: {sweep.metric!r} is not reported by this spec's evaluation; "
                        f"one of {reported}")


def _checked(sweep: SweepSpec) -> str:
    return {"grid": "every grid combination", "random": f"the {sweep.trial_count} points seed {sweep.seed} draws",
            "optuna": "the corners of the joint box and an inner point"}[sweep.search]


def _point_name(sweep: SweepSpec, number: int) -> str:
    return f"box point {number}" if sweep.search == "optuna" else f"trial {number}"


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


__all__ = ["MAX_CHECKED_POINTS", "check_space", "checked_points", "decode", "encode", "optuna_space", "reported_metrics", "sample_points", "trial_spec",
           "with_values"]
