"""The report's transfer tables (orchestrator.report.transfer) on a record with known scores
(tests/orchestrator/report/transfer_store.py): each cell is the score of the transfer evaluation of that chunk run
(the newest FINISHED of repeated ones), few-shot means carry their ci95, the correlation with the chunks' upstream
top-1 matches numpy's, a set evaluated at 3 points has no Fisher interval, seeds are averaged, options that differ
make a table of their own, the existing tables do not change, and the PNG is written and logged."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli.app import app
from orchestrator.report import build_report, make_report
from orchestrator.report.collect import collect
from orchestrator.report.transfer import scores_of, transfer_tables
from orchestrator.report.writers import write
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from tests.orchestrator.report.test_study_report import md_tables
from tests.orchestrator.report.transfer_store import (
    EXPERIMENT,
    FEWSHOT,
    JT,
    LINEAR,
    RECONSTRUCTION,
    SEEDED_EXPERIMENT,
    SEEDED_LINEAR,
    ST,
    STREAM,
    UPSTREAM,
    T,
    build_transfer_store,
)

Z_975 = 1.959963984540054  # the two-sided 95% normal quantile


@pytest.fixture(scope="module")
def store(migrated_mlflow_store, tmp_path_factory):
    return build_transfer_store(migrated_mlflow_store, tmp_path_factory.mktemp("transfer") / "mlflow.db")


@pytest.fixture(scope="module")
def report(store):
    return build_report(Tracker(store.uri), EXPERIMENT)[0]


def _rows(table) -> dict[str, dict]:
    return {row.index["line"]: row.cells for row in table.rows}


def test_collect_keeps_the_newest_finished_evaluation_apart_from_the_chunks_own(store) -> None:
    study = collect(Tracker(store.uri), EXPERIMENT)
    assert len(study.transfers) == 2 * T + len(FEWSHOT) + len(RECONSTRUCTION)  # ST chunk 1's duplicates folded
    by_key = {(t.task, t.line, t.chunk): t for t in study.transfers}
    assert {k: t.run_id for k, t in by_key.items()} == store.transfers
    linear = by_key[("linear", ST, 1)]
    assert linear.scores == {"linear_top1": LINEAR[ST][1]}  # not the superseded 0.99 nor the FAILED 0.01
    assert (linear.status, linear.evaluates, linear.plan_run, linear.plan_seed, linear.transfer_seed,
            linear.segment, linear.data_set) == ("FINISHED", store.chunk_runs[(ST, 1)], store.plan, "0", "0", None,
                                                 "synth")
    assert by_key[("fewshot", JT, 2)].scores == {"fewshot_5way5shot_mean": 0.61, "fewshot_5way5shot_ci95": 0.013}
    plan = study.entry(STREAM, ST).plan
    assert {(line, c): plan.slot(line, c).eval_run.info.run_id for line in (ST, JT) for c in range(T)} \
        == store.eval_runs
    assert [s.key for s in scores_of(study)] == ["synth.fewshot_5way5shot_mean", "synth.linear_top1",
                                                 "synth.reconstruction_mse"]  # the ci95 goes with its mean


def test_transfer_by_chunk_cells_are_the_logged_scores(store, report) -> None:
    linear = _rows(report.table("transfer.synth.linear_top1"))
    assert report.table("transfer.synth.linear_top1").value_columns == ["chunk 0", "chunk 1", "chunk 2"]
    for line in (ST, JT):
        assert [linear[line][f"chunk {c}"].value for c in range(T)] == list(LINEAR[line])
        assert [linear[line][f"chunk {c}"].runs for c in range(T)] == [(store.transfers[("linear", line, c)],)
                                                                      for c in range(T)]
    fewshot = _rows(report.table("transfer.synth.fewshot_5way5shot_mean"))
    for (line, chunk), (mean, ci95) in FEWSHOT.items():
        cell = fewshot[line][f"chunk {chunk}"]
        assert (cell.value, cell.half_width, cell.text()) == (mean, ci95, f"{mean:g} ± {ci95:g}")
    assert fewshot[ST]["chunk 1"].na.endswith("not evaluated (fewshot on synth)") and fewshot[ST]["chunk 1"].text() \
        == "n/a"
    recon = _rows(report.table("transfer.synth.reconstruction_mse"))
    assert {(line, c): recon[line][f"chunk {c}"].value for line in (ST, JT) for c in range(T)
            if recon[line][f"chunk {c}"].present} == RECONSTRUCTION
    # Chunks no transfer evaluated do not make the report incomplete.
    assert report.complete and report.missing_cells() == [] and report.problems == []


def _expected_correlation(points: list[tuple[float, float]]) -> dict[str, float]:
    x, y = np.array(points).T
    r = np.corrcoef(x, y)[0, 1]
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties in the store's numbers)
    out = {"n": len(points), "pearson_r": r, "spearman_rho": np.corrcoef(ranks(x), ranks(y))[0, 1]}
    if len(points) >= 4:
        half = Z_975 / np.sqrt(len(points) - 3)
        out.update(pearson_r_lo=np.tanh(np.arctanh(r) - half), pearson_r_hi=np.tanh(np.arctanh(r) + half))
    return out


def test_correlation_with_upstream_accuracy_matches_numpy(store, report) -> None:
    table = report.table("transfer_correlation.linear")
    rows = {row.index["score"]: row.cells for row in table.rows}
    assert "linear top-1" in table.title and "linear_top1" in table.title  # which upstream accuracy
    assert [(r.index["stream"], r.index["set"]) for r in table.rows] == [(STREAM, "synth")] * 3
    points = {
        "linear_top1": [(UPSTREAM[line][c], LINEAR[line][c]) for line in (ST, JT) for c in range(T)],
        "fewshot_5way5shot_mean": [(UPSTREAM[line][c], FEWSHOT[(line, c)][0]) for line, c in FEWSHOT],
        "reconstruction_mse": [(UPSTREAM[line][c], v) for (line, c), v in RECONSTRUCTION.items()],
    }
    for score, pts in points.items():
        expected = _expected_correlation(pts)
        got = {k: rows[score][k].value for k in expected}
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), score
    assert rows["linear_top1"]["n"].value == 6 and rows["fewshot_5way5shot_mean"]["n"].value == 4
    # The chunk runs' own evaluations and the transfer evaluations are the row's sources.
    assert set(rows["linear_top1"]["pearson_r"].runs) == {*store.eval_runs.values(),
                                                          *(store.transfers[("linear", k[0], k[1])]
                                                            for k in store.eval_runs)}
    # 3 points: r and rho, no Fisher interval.
    recon = rows["reconstruction_mse"]
    assert recon["pearson_r"].present and recon["pearson_r_lo"].value is None
    assert recon["pearson_r_lo"].text() == recon["pearson_r_hi"].text() == "n < 4" and recon["pearson_r_lo"].na


def test_markdown_csv_and_json_carry_the_transfer_tables(store, report, tmp_path: Path) -> None:
    paths = [p for fmt in ("markdown", "csv", "json") for p in write(report, tmp_path, fmt)]
    md = md_tables((tmp_path / "report.md").read_text())
    fewshot = {r["line"]: r for r in md["transfer.synth.fewshot_5way5shot_mean"]}
    assert (fewshot[ST]["chunk 0"], fewshot[ST]["chunk 1"], fewshot[JT]["chunk 2"]) == ("0.52 ± 0.011", "n/a",
                                                                                        "0.61 ± 0.013")
    assert fewshot[JT]["sources"].split() == [store.transfers[("fewshot", JT, c)] for c in (0, 2)]
    recon = next(r for r in md["transfer_correlation.linear"] if r["score"] == "reconstruction_mse")
    assert (recon["n"], recon["pearson_r_lo"], recon["pearson_r_hi"]) == ("3", "n < 4", "n < 4")
    assert "## Transfer by chunk: synth.linear_top1" in (tmp_path / "report.md").read_text()
    assert tmp_path / "transfer.synth.linear_top1.csv" in paths
    with (tmp_path / "transfer.synth.fewshot_5way5shot_mean.csv").open() as f:
        rows = {r["line"]: r for r in csv.DictReader(f)}
    assert (float(rows[JT]["chunk 2"]), float(rows[JT]["chunk 2.half_width"])) == FEWSHOT[(JT, 2)]
    assert rows[JT]["chunk 1"] == "n/a" and rows[JT]["chunk 1.half_width"] == ""
    data = {t["name"]: t for t in json.loads((tmp_path / "report.json").read_text())["tables"]}
    cell = data["transfer.synth.fewshot_5way5shot_mean"]["rows"][0]["cells"]["chunk 2"]
    assert (cell["value"], cell["half_width"]) == FEWSHOT[(ST, 2)]
    lo = next(r for r in data["transfer_correlation.linear"]["rows"] if r["index"]["score"] == "reconstruction_mse")
    assert lo["cells"]["pearson_r_lo"]["na"] == "n < 4" and lo["cells"]["pearson_r_lo"]["value"] is None


def test_existing_tables_are_unchanged_by_transfer_runs(store, report, tmp_path: Path) -> None:
    """The same record without its transfer runs gives the same tables, cell for cell; and a transfer run nested
    under the plan run itself is still not a chunk's evaluation."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(store.uri.removeprefix("sqlite:///"), db)
    client = MlflowClient(f"sqlite:///{db}")
    for run in [*store.transfers.values(), *store.ignored]:
        client.delete_run(run)
    bare = build_report(Tracker(f"sqlite:///{db}"), EXPERIMENT)[0]
    kept = [t.to_dict() for t in report.tables if not t.name.startswith("transfer")]
    assert [t.to_dict() for t in bare.tables] == kept and len(kept) >= 4
    assert (bare.complete, bare.notes) == (report.complete, report.notes)

    db = tmp_path / "moved.db"  # all runs again, the newest transfer of JT chunk 2 nested under the plan run
    shutil.copyfile(store.uri.removeprefix("sqlite:///"), db)
    MlflowClient(f"sqlite:///{db}").set_tag(store.transfers[("reconstruction", JT, 2)], tr.PARENT, store.plan)
    tracker = Tracker(f"sqlite:///{db}")
    assert collect(tracker, EXPERIMENT).entry(STREAM, JT).plan.slot(JT, 2).eval_run.info.run_id \
        == store.eval_runs[(JT, 2)]
    moved = build_report(tracker, EXPERIMENT)[0]
    assert [t.to_dict() for t in moved.tables] == [t.to_dict() for t in report.tables]


def test_the_png_is_written_and_logged_to_the_plan_run(store, tmp_path: Path) -> None:
    built, paths = make_report(Tracker(store.uri), EXPERIMENT, tmp_path, "markdown")
    png = tmp_path / "figures" / STREAM / "transfer.synth.fewshot_5way5shot_mean.png"
    assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = next(f for f in built.figures if f["path"] == f"figures/{STREAM}/{png.name}")
    assert (figure["run"], figure["artifact"]) == (store.plan, f"report/{png.name}")
    logged = {a.path for a in MlflowClient(store.uri).list_artifacts(store.plan, "report")}
    assert {f"report/transfer.synth.{s}.png" for s in ("linear_top1", "fewshot_5way5shot_mean",
                                                         "reconstruction_mse")} <= logged
    assert "![synth.fewshot_5way5shot_mean by chunk" in (tmp_path / "report.md").read_text()


def test_seeds_are_averaged_and_other_options_are_a_table_of_their_own(store) -> None:
    study = collect(Tracker(store.uri), SEEDED_EXPERIMENT)
    tables = {t.name: t for t in transfer_tables(study)}
    variants = {s.variant: s for s in scores_of(study)}
    assert sorted(variants) == ["linear.epochs=100", "linear.epochs=20"]
    plain, other = variants["linear.epochs=20"], variants["linear.epochs=100"]
    assert set(tables) == {"transfer.synth.linear_top1." + plain.options[:8],
                           "transfer.synth.linear_top1." + other.options[:8], "transfer_correlation.linear"}
    (row,) = tables[plain.name].rows
    cell = row.cells["chunk 1"]
    values = [SEEDED_LINEAR[0], SEEDED_LINEAR[1]]
    half = scipy.stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
    assert (cell.n, cell.values) == (2, tuple(values))
    assert (cell.value, cell.lo, cell.hi) == pytest.approx((np.mean(values), np.mean(values) - half,
                                                           np.mean(values) + half), rel=1e-9)
    assert row.cells["chunk 0"].na and any("seeds" in n for n in tables[plain.name].notes)
    assert set(row.runs) == {store.seeded_transfers[(0, "20")], store.seeded_transfers[(1, "20")]}
    # Seed 1 never ran the other options: that cell has no mean (n/a, the seed named in no number).
    assert tables[other.name].rows[0].cells["chunk 1"].value is None
    # One point per seed: two points, too few for r.
    rows = {r.index["options"]: r.cells for r in tables["transfer_correlation.linear"].rows}
    assert rows["linear.epochs=20"]["n"].value == 2 and rows["linear.epochs=20"]["pearson_r"].text() == "n < 3"
    assert set(rows["linear.epochs=20"]["n"].runs) >= set(store.seeded_transfers[(s, "20")] for s in (0, 1))


def test_the_cli_prints_the_correlation_table(store, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", EXPERIMENT, "--out", str(tmp_path), "--tracking-uri", store.uri],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "Upstream vs downstream" in result.output and "reconstruction_mse" in result.output
    assert "0.52 ± 0.011" in result.output


def test_a_random_init_baseline_has_its_own_table_and_no_correlation(store, tmp_path: Path) -> None:
    """`init=random` scores are a table of their own (the baseline beside the trained weights' table) and never a
    correlation row: the chunk's upstream accuracy is not that of the weights they were measured on."""
    from tests.orchestrator.report.transfer_store import _Clock, _transfer

    db = tmp_path / "mlflow.db"
    shutil.copyfile(store.uri.removeprefix("sqlite:///"), db)
    tracker = Tracker(f"sqlite:///{db}", EXPERIMENT)
    clock = _Clock()
    clock.ms = 1_800_000_000_000  # after every run of the store
    baseline = [_transfer(tracker, clock, store.chunk_runs[(line, T - 1)], line, T - 1, "fewshot",
                          {"fewshot_5way5shot_mean": 0.9 - i / 10}, None, options={"init": "random"})
                for i, line in enumerate((ST, JT))]
    study = collect(tracker, EXPERIMENT)
    variants = {s.variant: s for s in scores_of(study) if s.score == "fewshot_5way5shot_mean"}
    assert sorted(variants) == ["init=-", "init=random"] and variants["init=random"].init == "random"
    tables = {t.name: t for t in transfer_tables(study)}
    random_rows = tables[variants["init=random"].name].rows
    assert [r.cells[f"chunk {T - 1}"].value for r in random_rows] == pytest.approx([0.9, 0.8])
    assert {run for r in random_rows for run in r.runs} == set(baseline)
    (correlation,) = [t for t in tables.values() if t.name.startswith("transfer_correlation")]
    fewshot = [r for r in correlation.rows if r.index["score"] == "fewshot_5way5shot_mean"]
    assert [r.index["options"] for r in fewshot] == ["init=-"]  # the trained weights' row only
    assert not set(baseline) & {run for r in correlation.rows for run in r.cells["n"].runs}
