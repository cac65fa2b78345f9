"""The findings table on a record with known effects (tests/orchestrator/report/findings_store.py): each verdict, each
interval computed here by hand from the logged numbers, and the rows that name their missing runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from orchestrator.report import build_report, make_findings
from orchestrator.report.claims import CLAIMS, NONINFERIOR_MARGIN, ONLINE, STREAMING, VIEWS
from orchestrator.report.findings import MAX_SEEDS, Arm, Claim, evaluate, seeds_to_decide, verdict_of
from orchestrator.report.measures import plan_metric
from orchestrator.report.writers import write
from orchestrator.tracking.tracker import Tracker
from tests.orchestrator.report.findings_store import EXPERIMENT, OFFLINE_STEPS, ONLINE_STEPS

# Student's t 0.975 quantiles (printed tables), for the hand-computed intervals.
T975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.776445105197793,
        5: 2.570581835636314, 6: 2.446911848791681, 7: 2.364624251010299, 8: 2.306004135204166}


def seeds_by_hand(values: list[float], threshold: float) -> int:
    """The first n (from the printed table) whose 95% half-width, at the values' sd, is below |mean - threshold|."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return next(k for k in range(2, 10) if T975[k - 1] * sd / math.sqrt(k) < abs(mean - threshold))


def by_hand(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.fixture(scope="module")
def written(findings_store, tmp_path_factory):
    """The findings in every format, by id (as objects, from findings.json, from findings.csv)."""
    out = tmp_path_factory.mktemp("findings-out")
    tracker = Tracker(findings_store.uri)
    rows, _ = make_findings(tracker, EXPERIMENT, out, "json")
    make_findings(tracker, EXPERIMENT, out, "csv")
    make_findings(tracker, EXPERIMENT, out, "markdown")
    as_json = {r["id"]: r for r in json.loads((out / "findings.json").read_text())}
    with (out / "findings.csv").open() as f:
        as_csv = {r["claim"]: r for r in csv.DictReader(f)}
    return {f.claim.id: f for f in rows}, as_json, as_csv, out


def check_interval(finding, as_json, as_csv, values: list[float]) -> None:
    mean, lo, hi = by_hand(values)
    assert finding.effect.values == pytest.approx(values, abs=1e-12)
    assert (finding.effect.value, finding.effect.lo, finding.effect.hi) == pytest.approx((mean, lo, hi), abs=1e-9)
    row = as_json[finding.claim.id]
    assert row["n"] == len(values) and (row["effect"], row["lo"], row["hi"]) == pytest.approx((mean, lo, hi), abs=1e-9)
    assert "t-interval on the per-seed paired effects" in row["interval"]
    assert [float(as_csv[finding.claim.id][k]) for k in ("effect", "lo", "hi")] == pytest.approx([mean, lo, hi],
                                                                                                  abs=1e-12)


def test_a_claim_that_holds_with_its_interval(findings_store, written) -> None:
    rows, as_json, as_csv, _ = written
    v = findings_store.value
    gap = rows["streaming.gap.random_class"]  # SL's gap minus SSL's, paired by seed
    check_interval(gap, as_json, as_csv, [v("random_class", "supervised-sequential", s, "gap")
                                          - v("random_class", "moco_v2-sequential", s, "gap") for s in (0, 1, 2)])
    assert gap.verdict == "holds" and gap.seeds == ["0", "1", "2"] and gap.missing == []
    assert gap.effect.lo > 0 and len(gap.runs) == 6  # the six plan runs the gaps were read from
    replay = rows["streaming.aid.replay"]
    check_interval(replay, as_json, as_csv, [v("distant_class", "moco_v2-sequential", s, "gap")
                                             - v("distant_class", "moco_v2-sequential-replay", s, "gap")
                                             for s in (0, 1, 2)])
    assert replay.verdict == "holds"


def test_st_and_jt_transfer_alike_read_from_the_last_chunks_transfer_evaluation(findings_store, written) -> None:
    rows, as_json, as_csv, _ = written
    v = findings_store.value
    transfer = rows["streaming.transfer.random_class"]
    check_interval(transfer, as_json, as_csv, [v("random_class", "moco_v2-sequential", s, "transfer")
                                               - v("random_class", "moco_v2-joint", s, "transfer") for s in (0, 1, 2)])
    assert transfer.verdict == "holds" and transfer.claim.test == "equivalent"
    assert transfer.reason == "the interval lies inside (-0.02, 0.02)"
    assert len(transfer.runs) == 6  # the six held-out linear evaluations (2 lines x 3 seeds), nothing else


def test_a_contradicted_claim(findings_store, written) -> None:
    rows, as_json, as_csv, _ = written
    v = findings_store.value
    bwt = rows["streaming.bwt.random_class"]
    check_interval(bwt, as_json, as_csv, [v("random_class", "moco_v2-sequential", s, "bwt")
                                          - v("random_class", "supervised-sequential", s, "bwt") for s in (0, 1, 2)])
    assert bwt.verdict == "contradicted" and bwt.effect.hi < 0 and bwt.reason == "the interval is below 0"


def test_an_inconclusive_claim_over_the_seeds_both_lines_have(findings_store, written) -> None:
    """SL on distant_class has seeds 0 and 1 only: the sharpness claim pairs those two (n=2), its interval spans 0,
    and the row names the missing seed."""
    rows, as_json, as_csv, _ = written
    v = findings_store.value
    sharp = rows["streaming.sharpness.eps0.1"]
    check_interval(sharp, as_json, as_csv, [v("distant_class", "supervised-sequential", s, "sharpness_eps0.1")
                                            - v("distant_class", "moco_v2-sequential", s, "sharpness_eps0.1")
                                            for s in (0, 1)])
    assert sharp.verdict == "inconclusive at this budget" and sharp.reason == "the interval spans 0"
    assert sharp.effect.lo < 0 < sharp.effect.hi and sharp.seeds == ["0", "1"]
    assert sharp.missing == ["stream distant_class, line supervised-sequential: no plan run with seed 2"]
    # The non-inferiority claim: RALS's interval crosses -margin.
    rals = rows["online.simclr.rals"]
    check_interval(rals, as_json, as_csv, [v("online", "rals-True", s, "linear_top1")
                                           - v("online", "rals-False", s, "linear_top1") for s in (0, 1, 2)])
    assert rals.effect.lo < -NONINFERIOR_MARGIN < rals.effect.hi and rals.verdict == "inconclusive at this budget"


def test_an_inconclusive_row_says_how_many_seeds_would_decide_it(findings_store, written) -> None:
    rows, as_json, as_csv, out = written
    sharp = rows["streaming.sharpness.eps0.1"]
    needed = seeds_to_decide(list(sharp.effect.values), "greater", 0.0)
    assert sharp.seeds_needed == needed and needed > 2
    if needed <= 9:
        assert needed == seeds_by_hand(list(sharp.effect.values), 0.0)
    assert as_json["streaming.sharpness.eps0.1"]["seeds_needed"] == needed
    assert as_csv["streaming.sharpness.eps0.1"]["seeds to decide"] == (str(needed) if needed <= MAX_SEEDS
                                                                        else f"> {MAX_SEEDS}")
    assert "| seeds to decide |" in (out / "findings.md").read_text()
    # Rows with a verdict, with n < 2, or whose condition fails (more seeds would not lift it) give none.
    for claim in ("streaming.gap.random_class", "streaming.bwt.random_class", "online.simclr.offline"):
        assert rows[claim].seeds_needed is None and as_csv[claim]["seeds to decide"] == ""


@pytest.mark.parametrize("values,test,margin,threshold", [
    ([0.01, 0.03], "greater", 0.0, 0.0),            # mean 0.02, sd 0.014: 5 seeds
    ([-0.02, -0.01, -0.04], "greater", 0.0, 0.0),    # below 0: more seeds would contradict it
    ([-0.03, -0.01, -0.02], "noninferior", 0.01, -0.01),
    ([0.0, 0.01, 0.02], "equivalent", 0.02, 0.02),   # inside (-m, m): the interval must shrink to fit
    ([0.05, 0.03, 0.04], "equivalent", 0.02, 0.02)])  # outside: it must clear +m
def test_seeds_to_decide_against_the_printed_t_table(values, test, margin, threshold) -> None:
    assert seeds_to_decide(values, test, margin) == seeds_by_hand(values, threshold)


def test_seeds_to_decide_edge_cases() -> None:
    assert seeds_to_decide([0.01, 0.03], "greater", 0.0) == 5
    assert seeds_to_decide([0.02], "greater", 0.0) is None  # n < 2: no spread measured
    assert seeds_to_decide([0.02, 0.02], "greater", 0.0) is None  # no spread: no interval to shrink
    assert seeds_to_decide([-0.01, 0.01], "greater", 0.0) is None  # the mean on the threshold: no n decides
    assert seeds_to_decide([-0.1, 0.1002], "greater", 0.0) == MAX_SEEDS + 1  # a tiny effect in a wide spread


def test_a_failed_condition_makes_a_row_inconclusive_whatever_its_interval(findings_store, written) -> None:
    rows, as_json, as_csv, _ = written
    v = findings_store.value
    offline = rows["online.simclr.offline"]
    check_interval(offline, as_json, as_csv, [v("online", "rals-True", s, "linear_top1")
                                              - v("instance", "offline", s, "linear_top1") for s in (0, 1, 2)])
    assert offline.effect.lo > 0 and offline.verdict == "inconclusive at this budget"
    share = (ONLINE_STEPS - OFFLINE_STEPS) / OFFLINE_STEPS
    assert offline.reason.startswith("the same number of steps fails") and f"{share:+.0%}" in offline.reason
    # The base-accuracy condition of the sharpness claim holds (0.01 apart): its reason is the interval's.
    assert rows["streaming.sharpness.eps0.1"].reason == "the interval spans 0"


def test_rows_name_their_missing_runs(written) -> None:
    rows, as_json, _, out = written
    instance = rows["streaming.gap.instance"]
    assert instance.verdict == "inconclusive at this budget" and instance.reason.startswith("n < 2")
    assert sorted(instance.missing) == ["stream instance, line moco_v2-sequential: no plan run",
                                        "stream instance, line supervised-sequential: no plan run"]
    assert instance.effect.value is None and as_json["streaming.gap.instance"]["n"] == 0
    slclrs = rows["online.simclr.slclrs"]
    assert slclrs.missing == ["stream online, line simclr-sequential, online.rals=False, online.schedule=constant, "
                              "online.steps_per_batch=10: no plan run"]
    transfer = rows["streaming.transfer.distant_class"]
    assert transfer.verdict == "inconclusive at this budget" and transfer.reason.startswith("n < 2")
    assert any("no transfer evaluation with linear_top1 of moco_v2-sequential chunk 1" in m
               and m.endswith("add an eval.transfer entry") for m in transfer.missing)
    # Only the studies the runs belong to: no views rows; every streaming and online claim is a row.
    assert {f.claim.study for f in rows.values()} == {STREAMING, ONLINE}
    assert list(rows) == [c.id for c in CLAIMS if c.study in (STREAMING, ONLINE)]
    text = (out / "findings.md").read_text()
    assert "| streaming.gap.instance |" in text and "no plan run with seed 2" in text
    assert not any(c.study == VIEWS for c in (f.claim for f in rows.values()))


def test_the_default_report_carries_the_findings(findings_store, tmp_path: Path) -> None:
    report, _ = build_report(Tracker(findings_store.uri), EXPERIMENT)
    write(report, tmp_path, "markdown")
    write(report, tmp_path, "json")
    assert "## Findings" in (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    holds = next(f for f in data["findings"] if f["id"] == "streaming.gap.random_class")
    assert holds["verdict"] == "holds" and holds["n"] == 3


@pytest.mark.parametrize("test,margin,lo,hi,verdict", [
    ("greater", 0.0, 0.01, 0.2, "holds"), ("greater", 0.0, -0.2, -0.01, "contradicted"),
    ("greater", 0.0, -0.01, 0.2, "inconclusive at this budget"),
    ("noninferior", 0.01, -0.005, 0.03, "holds"), ("noninferior", 0.01, -0.05, -0.02, "contradicted"),
    ("noninferior", 0.01, -0.05, 0.03, "inconclusive at this budget"),
    ("equivalent", 0.02, -0.01, 0.015, "holds"), ("equivalent", 0.02, 0.03, 0.05, "contradicted"),
    ("equivalent", 0.02, -0.01, 0.03, "inconclusive at this budget")])
def test_verdicts(test, margin, lo, hi, verdict) -> None:
    assert verdict_of(test, margin, lo, hi)[0] == verdict


def test_a_new_claim_is_one_record(findings_store, written) -> None:
    """A claim made here (not in CLAIMS) is evaluated the same way: one seed pair short of n=2 is inconclusive."""
    v = findings_store.value
    claim = Claim("test.one_seed", "t", "SSL's gap on distant_class is below SL's.", plan_metric(
        "{line}.linear.st_jt_gap", "gap"), ((1.0, Arm("SL", "distant_class", "supervised")),
                                           (-1.0, Arm("SSL", "distant_class", "moco_v2"))), "SL - SSL")
    from orchestrator.report.collect import collect

    records = collect(Tracker(findings_store.uri), EXPERIMENT).records
    finding = evaluate(claim, [r for r in records if r.seed == "0"])
    assert finding.verdict == "inconclusive at this budget" and finding.reason.startswith("n < 2: only seed 0")
    assert finding.effect.value == pytest.approx(v("distant_class", "supervised-sequential", 0, "gap")
                                                 - v("distant_class", "moco_v2-sequential", 0, "gap"))
    with pytest.raises(ValueError, match="test must be one of"):
        Claim("x", "t", "x", None, (), "x", test="bigger", needs="needs transfer")
