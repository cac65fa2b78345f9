"""`streamssl report` end to end through the CLI on the study record of tests/orchestrator/study_store.py: a whole
record exits 0 and writes what it prints; a partial one writes its tables with the cells marked, names the missing
runs and cells, and exits 1; an unknown experiment exits 8 naming it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli.app import app
from tests.orchestrator.study_store import EXPERIMENT, SEEDED_EXPERIMENT, SEEDED_STREAM


def test_a_whole_record_exits_0_with_json_naming_each_cells_run(study_store, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", EXPERIMENT, "--format", "json", "--out", str(out),
                                      "--tracking-uri", study_store.uri])
    assert result.exit_code == 0, result.output
    assert "Time and storage per chunk" in result.output and "ST-JT gap, knn" in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["complete"] is True and data["missing_cells"] == [] and data["problems"] == []
    assert not (out / "report.md").exists() and not (out / "resources.csv").exists()  # the format asked for only
    client = MlflowClient(study_store.uri)
    gaps = next(t for t in data["tables"] if t["name"] == "st_jt_gap.linear")
    row = next(r for r in gaps["rows"] if r["index"]["stream"] == "random_class"
               and r["index"]["line"] == "simclr-sequential-replay")
    plan = study_store.plan_runs[("random_class", "ssl")]
    logged = {m.step: m.value for m in client.get_metric_history(plan, "simclr-sequential-replay.linear.st_jt_gap_by_chunk")}
    assert [row["cells"][f"chunk {c}"]["value"] for c in range(3)] == [logged[c] for c in range(3)]
    assert row["runs"] == [plan] and row["cells"]["final"]["source"] == "simclr-sequential-replay.linear.st_jt_gap"
    assert (out / "figures" / "distant_class" / "accuracy_by_chunk.linear.png").is_file()


def test_a_partial_record_writes_marked_cells_names_them_and_exits_1(partial_study_store, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", EXPERIMENT, "--format", "csv", "--out", str(out),
                                      "--tracking-uri", partial_study_store.uri])
    assert result.exit_code == 1, result.output
    failed = partial_study_store.chunk_runs[("random_class", "simclr-sequential-replay", 2)]
    text = result.output.replace("\n", "")
    assert f"chunk run {failed} is FAILED" in text and "the report is incomplete" in text
    assert "missing cell: resources [method supervised, paradigm SL, stream distant_class, line supervised-joint, " \
           "strategy JT, chunk 1] wall_seconds: not logged" in text
    with (out / "resources.csv").open() as f:
        rows = {(r["stream"], r["line"], r["chunk"]): r for r in csv.DictReader(f)}
    assert rows[("random_class", "simclr-sequential-replay", "2")]["train_seconds"] == "missing: chunk run FAILED"
    assert rows[("random_class", "simclr-sequential-replay", "2")]["sources"] == failed
    assert rows[("distant_class", "supervised-joint", "1")]["wall_seconds"] == "missing: not logged"
    assert float(rows[("distant_class", "supervised-joint", "1")]["train_seconds"]) > 0
    with (out / "missing.csv").open() as f:
        missing = list(csv.DictReader(f))
    # 35 cells of the main tables (8 resource columns), and 12 downstream-gap cells (2 sets and their mean x 2 protocols x chunk 2, final)
    assert [m["kind"] for m in missing].count("run") == 2 and [m["kind"] for m in missing].count("cell") == 47
    assert {"kind": "cell", "table": "resources", "row": "method=supervised; paradigm=SL; stream=distant_class; "
            "line=supervised-joint; strategy=JT; chunk=1", "column": "wall_seconds", "reason": "not logged", "source": "wall_seconds",
            "runs": partial_study_store.chunk_runs[("distant_class", "supervised-joint", 1)]} in missing


def test_an_unknown_experiment_exits_8_naming_it(study_store, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "no-such-study", "--out", str(tmp_path / "r"),
                                      "--tracking-uri", study_store.uri])
    assert result.exit_code == 8, result.output
    assert "no MLflow experiment named 'no-such-study'" in result.output.replace("\n", "")
    assert not (tmp_path / "r").exists()


def test_an_unknown_format_is_refused(study_store, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", EXPERIMENT, "--format", "xlsx", "--tracking-uri", study_store.uri])
    assert result.exit_code == 2 and "xlsx" in result.output


def test_sharpness_columns_are_the_specs_epsilons_and_seeds_aggregate(seeded_study_store, tmp_path: Path) -> None:
    """eval.sharpness.epsilons [0.05]: one sharpness column (none made up for 0.1 or 0.3), a whole record, exit 0;
    the two seeds' cells as mean, n, lo and hi."""
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", SEEDED_EXPERIMENT, "--format", "csv", "--out", str(out),
                                      "--tracking-uri", seeded_study_store.uri])
    assert result.exit_code == 0, result.output
    with (out / "sharpness.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert [c for c in reader.fieldnames if c.startswith("sharpness")] == [
        "sharpness_eps0.05", "sharpness_eps0.05.n", "sharpness_eps0.05.lo", "sharpness_eps0.05.hi"]
    seeded = [r for r in rows if r["stream"] == SEEDED_STREAM]
    assert len(seeded) == 4 and all(r["sharpness_eps0.05.n"] == "2" for r in seeded)
    assert all(float(r["sharpness_eps0.05.lo"]) <= float(r["sharpness_eps0.05"]) <= float(r["sharpness_eps0.05.hi"])
               for r in seeded)


def test_findings_only_writes_the_findings_table_and_names_missing_runs(findings_store, tmp_path: Path) -> None:
    from tests.orchestrator.report.findings_store import EXPERIMENT as FINDINGS_EXPERIMENT

    out = tmp_path / "findings"
    result = CliRunner().invoke(app, ["report", FINDINGS_EXPERIMENT, "--findings", "--out", str(out),
                                      "--tracking-uri", findings_store.uri])
    assert result.exit_code == 1, result.output  # some claims' runs are missing
    assert sorted(p.name for p in out.iterdir()) == ["findings.md"]  # nothing but the findings table
    text = result.output.replace("\n", "")
    assert ("missing runs for streaming.gap.instance: stream instance, line supervised-sequential: no plan run; "
            "stream instance, line moco_v2-sequential: no plan run") in text
    rows = {line.split("|")[1].strip(): line.split("|") for line in (out / "findings.md").read_text().splitlines()
            if line.startswith("| streaming.") or line.startswith("| online.")}
    assert rows["streaming.gap.random_class"][7].strip() == "holds"
    assert rows["streaming.bwt.random_class"][7].strip() == "contradicted"
    assert rows["streaming.sharpness.eps0.1"][7].strip() == "inconclusive at this budget"
