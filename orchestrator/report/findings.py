"""The findings table: each claim of the studies (orchestrator.report.claims) checked against the experiment's runs,
with its measured effect, a 95% interval over seeds, and a verdict.

    rows = findings(study, CLAIMS)          # one Finding per claim row of every study the experiment's runs belong to
    rows[0].verdict, rows[0].effect.text()   # "holds", "0.08 (n=3, 95% CI 0.05..0.11)"

A claim compares lines (arms: stream kind, method, strategy, and spec params such as `online.rals`) on one measure
(a plan-run metric, the final ST-JT gap, the last chunk's evaluation, the chunks' time...). Its effect for one seed
is sum(coef * measure(arm)) over its terms, signed so that a positive effect is what the paper claims. The arms are
paired by the spec's `seed` (plan runs of any study key: variants of a line run as separate plans), so the interval
is a Student-t interval on the per-seed paired effects: mean -/+ t(0.975, n-1) s / sqrt(n). The verdict:

- `greater`: holds when the interval is above 0, contradicted when below, else inconclusive at this budget;
- `noninferior` (a >= claim, margin m): holds when the interval's low end is above -m, contradicted when its high
  end is below -m, else inconclusive;
- `equivalent` (margin m): holds when the interval lies inside (-m, m), contradicted when it lies wholly outside,
  else inconclusive.

n < 2 (or no seed with every arm's number) is inconclusive with the reason. A seed some arm lacks, and an arm with
no plan run at all, are named in the row's `missing` (stream kind, line, params, seeds). A claim may also carry a
guard, a condition it is made under (comparable base accuracy; the same number of steps): a guard that fails, or
that the record cannot check, makes the row inconclusive and says why, whatever the interval. Claims that need an
evaluation streamssl does not have yet (transfer, slimmable networks) are rows that say so.

Only the studies the experiment's runs belong to are reported: a study is in when some arm of one of its claims
matches a plan run of the experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from orchestrator.report.collect import LineInfo, PlanRecord, Study, line_id
from orchestrator.report.measures import Measure, Reading
from orchestrator.report.model import Cell, format_number, t_quantile_975

INTERVAL = "t-interval on the per-seed paired effects (seeds pair the arms)"
TESTS = ("greater", "noninferior", "equivalent")


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: the line `method-strategy` on `stream`, in plan runs whose params match `params`."""

    label: str
    stream: str
    method: str
    strategy: str = "sequential"
    params: tuple[tuple[str, str], ...] = ()

    @property
    def line(self) -> str:
        return line_id(self.method, self.strategy)

    def describe(self) -> str:
        where = f"stream {self.stream}, line {self.line}"
        return where + "".join(f", {k}={v}" for k, v in self.params)

    def matches(self, plan: PlanRecord) -> LineInfo | None:
        if plan.stream_kind != self.stream:
            return None
        params = plan.run.data.params
        if any(params.get(k) != v for k, v in self.params):
            return None
        return plan.line(self.line)


@dataclass(frozen=True)
class Guard:
    """A condition the claim is made under: `measure` of `arms[0]` minus that of `arms[1]` (relative to the second
    when `relative`), its mean over the seeds, within `tolerance` in absolute value."""

    what: str
    measure: Measure
    arms: tuple[Arm, Arm]
    tolerance: float
    relative: bool = False


@dataclass(frozen=True)
class Claim:
    """One claim of a study: its effect for a seed is sum(coef * measure(arm)), positive in the claimed direction."""

    id: str
    study: str
    text: str
    measure: Measure | None
    terms: tuple[tuple[float, Arm], ...]
    effect: str  # the effect in words: "SL gap - SSL gap"
    test: str = "greater"
    margin: float = 0.0
    paper: str = ""
    guard: Guard | None = None
    needs: str | None = None  # "needs transfer", "needs slimmable": the evaluation is not in streamssl yet

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"claim {self.id}: test must be one of {TESTS}, got {self.test!r}")
        if self.needs is None and (self.measure is None or not self.terms):
            raise ValueError(f"claim {self.id}: a measure and terms are needed unless the claim `needs` something")

    @property
    def direction(self) -> str:
        if self.test == "greater":
            return f"{self.effect} > 0"
        if self.test == "noninferior":
            return f"{self.effect} > -{format_number(self.margin)} (non-inferior)"
        return f"|{self.effect}| < {format_number(self.margin)} (equivalent)"

    @property
    def arms(self) -> list[Arm]:
        return [arm for _, arm in self.terms] + (list(self.guard.arms) if self.guard else [])


@dataclass
class Finding:
    claim: Claim
    effect: Cell  # the mean effect over the seeds with its 95% interval (values: per seed, in `seeds` order)
    seeds: list[str]
    verdict: str  # holds | contradicted | inconclusive at this budget | needs transfer | needs slimmable
    reason: str = ""
    missing: list[str] = field(default_factory=list)
    seeds_needed: int | None = None  # an interval that spans the threshold: `seeds_to_decide` of the per-seed effects

    @property
    def runs(self) -> list[str]:
        return list(self.effect.runs)


    def to_dict(self) -> dict[str, Any]:
        c = self.claim
        return {"id": c.id, "study": c.study, "claim": c.text, "measure": c.measure.what if c.measure else None,
                "compares": [{"coef": coef, "arm": arm.label, "where": arm.describe()} for coef, arm in c.terms],
                "direction": c.direction, "test": c.test, "margin": c.margin, "paper": c.paper,
                "n": len(self.seeds), "effect": self.effect.value, "lo": self.effect.lo,
                "hi": self.effect.hi, "values": list(self.effect.values), "seeds": self.seeds,
                "interval": INTERVAL if self.effect.values else None, "verdict": self.verdict, "reason": self.reason,
                "seeds_needed": self.seeds_needed, "missing": self.missing, "runs": self.runs}


def _seed_key(seed: str) -> tuple:
    try:
        return (0, int(seed), seed)
    except ValueError:
        return (1, 0, seed)


def resolve(arm: Arm, records: list[PlanRecord]) -> dict[str, tuple[PlanRecord, LineInfo]]:
    """seed -> the newest plan run (of any study) holding the arm's line on its stream with its params."""
    out: dict[str, tuple[PlanRecord, LineInfo]] = {}
    for plan in sorted(records, key=lambda r: r.run.info.start_time or 0):
        line = arm.matches(plan)
        if line is not None:
            out[plan.seed] = (plan, line)
    return out


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """mean, lo, hi of the 95% Student-t interval of the mean (n >= 2)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict_of(test: str, margin: float, lo: float, hi: float) -> tuple[str, str]:
    """(verdict, reason) of an interval [lo, hi] of the effect under the claim's test."""
    if test == "greater":
        if lo > 0:
            return "holds", "the interval is above 0"
        if hi < 0:
            return "contradicted", "the interval is below 0"
        return "inconclusive at this budget", "the interval spans 0"
    m = format_number(margin)
    if test == "noninferior":
        if lo > -margin:
            return "holds", f"the interval is above -{m}"
        if hi < -margin:
            return "contradicted", f"the interval is below -{m}"
        return "inconclusive at this budget", f"the interval spans -{m}"
    if -margin < lo and hi < margin:
        return "holds", f"the interval lies inside (-{m}, {m})"
    if lo > margin or hi < -margin:
        return "contradicted", f"the interval lies outside (-{m}, {m})"
    return "inconclusive at this budget", f"the interval crosses -{m} or {m}"


MAX_SEEDS = 200  # beyond this the estimate says "> 200": the effect is too small against its spread to chase


def seeds_to_decide(values: list[float], test: str, margin: float) -> int | None:
    """The fewest seeds whose 95% t-interval would clear the claim's threshold (a verdict either way), were the
    measured per-seed mean and standard deviation the true ones: a rough power estimate (about even odds at that n)
    for an inconclusive row. None when n < 2, or when the mean sits on the threshold or the spread is nil (no n
    decides); MAX_SEEDS + 1 when it takes more than MAX_SEEDS."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if test == "greater":
        room = abs(mean)
    elif test == "noninferior":
        room = abs(mean + margin)
    else:  # equivalent: inside (-m, m) to hold, wholly outside to be contradicted
        room = abs(margin - abs(mean))
    if room == 0 or sd == 0:
        return None

    def decides(k: int) -> bool:
        return t_quantile_975(k - 1) * sd / math.sqrt(k) < room

    if not decides(MAX_SEEDS):
        return MAX_SEEDS + 1
    lo, hi = 2, MAX_SEEDS  # the half-width shrinks as n grows: bisect for the first n that decides
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid + 1, hi)
    return lo


def _guard_check(guard: Guard, resolved: dict[Arm, dict], seeds: list[str]) -> str | None:
    """None when the guard holds over `seeds`, else why the claim cannot be read as made."""
    diffs, problems = [], []
    for seed in seeds:
        readings = []
        for arm in guard.arms:
            found = resolved[arm].get(seed)
            readings.append(guard.measure.read(*found) if found else Reading(None, (), f"{arm.describe()}: no plan "
                                                                                      f"run with seed {seed}"))
        if any(r.value is None for r in readings):
            problems += [f"seed {seed}: {r.missing}" for r in readings if r.value is None]
            continue
        a, b = readings[0].value, readings[1].value
        diffs.append((a - b) / b if guard.relative and b else a - b)
    if problems:
        return f"{guard.what} not checked: " + "; ".join(problems)
    mean = sum(diffs) / len(diffs)
    if abs(mean) > guard.tolerance:
        if guard.relative:
            return (f"{guard.what} fails: {guard.arms[0].label}'s {guard.measure.what} differ from "
                    f"{guard.arms[1].label}'s by {mean:+.0%} over {len(diffs)} seed(s), beyond "
                    f"{guard.tolerance:.0%}")
        return (f"{guard.what} fails: {guard.arms[0].label} - {guard.arms[1].label} {guard.measure.what} = "
                f"{format_number(mean)} over {len(diffs)} seed(s), beyond {format_number(guard.tolerance)}")
    return None


def evaluate(claim: Claim, records: list[PlanRecord]) -> Finding:
    """The claim's row from the plan runs: its effect over the seeds every arm has, the interval and the verdict."""
    if claim.needs:
        return Finding(claim, Cell(na=claim.needs), [], claim.needs,
                       f"{claim.needs}: streamssl does not evaluate this yet")
    resolved = {arm: resolve(arm, records) for arm in dict.fromkeys(claim.arms)}
    missing = [f"{arm.describe()}: no plan run" for arm, by_seed in resolved.items() if not by_seed]
    present = [set(by_seed) for by_seed in resolved.values() if by_seed]
    every = set().union(*present) if present else set()
    for arm, by_seed in resolved.items():
        lacking = sorted(every - set(by_seed), key=_seed_key)
        if by_seed and lacking:
            missing.append(f"{arm.describe()}: no plan run with seed {', '.join(lacking)}")
    common = sorted(set.intersection(*present), key=_seed_key) if len(present) == len(resolved) else []
    values, seeds, runs = [], [], []
    for seed in common:
        readings = [(coef, claim.measure.read(*resolved[arm][seed])) for coef, arm in claim.terms]
        lacking = [r.missing or f"{claim.measure.what} is not a finite number ({' '.join(r.runs)})"
                   for _, r in readings if r.value is None or not math.isfinite(r.value)]
        runs = list(dict.fromkeys([*runs, *(run for _, r in readings for run in r.runs)]))
        if lacking:
            missing += [f"seed {seed}: {why}" for why in lacking]
            continue
        values.append(sum(coef * r.value for coef, r in readings))
        seeds.append(seed)
    source = f"{claim.effect} of {claim.measure.what}"
    if len(values) < 2:
        why = ("n < 2: no seed has every arm's number" if not values else
               f"n < 2: only seed {seeds[0]} has every arm's number (an interval needs 2 seeds)")
        cell = Cell(values[0], tuple(runs), source) if values else Cell(runs=tuple(runs), source=source, missing=why)
        return Finding(claim, cell, seeds, "inconclusive at this budget", why, missing)
    mean, lo, hi = t_interval(values)
    cell = Cell(mean, tuple(runs), source, values=tuple(values), lo=lo, hi=hi)
    verdict, reason = verdict_of(claim.test, claim.margin, lo, hi)
    needed = seeds_to_decide(values, claim.test, claim.margin) if verdict.startswith("inconclusive") else None
    if claim.guard is not None:
        failed = _guard_check(claim.guard, resolved, seeds)
        if failed:  # more seeds do not lift a condition the runs fail
            verdict, reason, needed = "inconclusive at this budget", failed, None
    return Finding(claim, cell, seeds, verdict, reason, missing, needed)


def studies_present(claims: list[Claim], records: list[PlanRecord]) -> list[str]:
    """The studies some arm of whose claims matches a plan run of the experiment, in the claims' order."""
    present = []
    for claim in claims:
        if claim.study not in present and any(arm.matches(plan) for arm in claim.arms for plan in records):
            present.append(claim.study)
    return present


def findings(study: Study, claims: list[Claim]) -> list[Finding]:
    """Every claim (`orchestrator.report.claims.CLAIMS`) of every study the experiment's runs belong to, as a row."""
    records = study.records or study.plans
    present = studies_present(claims, records)
    return [evaluate(claim, records) for claim in claims if claim.study in present]


__all__ = ["Arm", "Claim", "Finding", "Guard", "INTERVAL", "MAX_SEEDS", "evaluate", "findings", "resolve",
           "seeds_to_decide", "t_interval", "verdict_of"]
