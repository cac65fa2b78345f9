"""`streamssl report`'s tables from a study record in MLflow (tests/orchestrator/study_store.py): the numbers read
back from the written markdown, CSV and JSON are the logged ones, each naming its run; a partial record gives
exactly the missing cells; the figures are written and logged to the plan runs."""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evaluators.continual import AccuracyMatrix, st_jt_gap
from orchestrator.errors import ReportError
from orchestrator.report import build_report, make_report
from orchestrator.report.collect import LineInfo
from orchestrator.report.tables import RESOURCE_COLUMNS
from orchestrator.report.writers import write
from orchestrator.tracking.tracker import Tracker
from tests.orchestrator.study_store import (
    BYTES_PER_ROW,
    DOWNSTREAM,
    EXPERIMENT,
    NO_BASELINE,
    NO_DOWNSTREAM_GAPS,
    NO_GAP_BY_CHUNK,
    NO_STORED_BYTES,
    PLANS,
    PROTOCOLS,
    REPLAY_ROWS_PER_CHUNK,
    ROWS_PER_CHUNK,
    SEEDED_EXPERIMENT,
    SEEDED_STREAM,
    STREAMS,
    UNTAGGED_STREAM,
    T,
    line_id,
)

LINES = [line_id(method, s) for _, (method, strategies) in PLANS.items() for s in strategies]
CONTINUAL = ("avg_acc", "bwt", "fwt", "forgetting")


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each table of report.md (found under its `name` line) as a list of {column: cell text}."""
    tables, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("`") and line.endswith("`") and i + 2 < len(lines):
            start = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("|") or lines[j] == "(no rows)")
            if lines[start] == "(no rows)":
                tables[line.strip("`")] = []
                continue
            header = [c.strip() for c in lines[start].strip("|").split("|")]
            rows = []
            for row in lines[start + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            tables[line.strip("`")] = rows
    return tables


class Logged:
    """What the store holds, read with MlflowClient (not through the report's code)."""

    def __init__(self, store):
        self.store, self.client = store, MlflowClient(store.uri)

    def chunk(self, stream, line, chunk):
        return self.client.get_run(self.store.chunk_runs[(stream, line, chunk)]).data.metrics

    def resource(self, stream, line, chunk, key):
        m = self.chunk(stream, line, chunk)
        return m["data_kept_bytes"] + m["model_state_bytes"] if key == "stored_bytes" and key not in m else m[key]

    def plan(self, stream, line):
        return self.client.get_run(self.store.plan_of_line[(stream, line)]).data.metrics

    def matrix(self, stream, line, name):
        with tempfile.TemporaryDirectory() as folder:
            path = self.client.download_artifacts(self.store.plan_of_line[(stream, line)],
                                                  f"accuracy_matrix.{line}.{name}.json", folder)
            return AccuracyMatrix.from_dict(json.loads(Path(path).read_text()))

    def gap(self, stream, line, name, chunk):
        """The per-chunk gap as logged (step = chunk), or from the logged matrices where it was not logged."""
        plan = self.store.plan_of_line[(stream, line)]
        history = {m.step: m.value for m in self.client.get_metric_history(plan, f"{line}.{name}.st_jt_gap_by_chunk")}
        if chunk == "final":
            return self.plan(stream, line)[f"{line}.{name}.st_jt_gap"]
        if (stream, line) == NO_GAP_BY_CHUNK:
            assert not history
            method = line.split("-")[0]
            return st_jt_gap(self.matrix(stream, line, name), self.matrix(stream, f"{method}-joint", name)).per_chunk[chunk]
        return history[chunk]

    def downstream_gap(self, stream, line, data_set, name, chunk):
        """(value, source runs) of the gap on a downstream set (or their mean, `downstream`): the plan run's metric,
        or JT's eval run minus the line's where the plan logged none."""
        plan = self.store.plan_of_line[(stream, line)]
        key = f"{line}.{data_set}.{name}.st_jt_gap"
        if (stream, line) == NO_DOWNSTREAM_GAPS:
            c = T - 1 if chunk == "final" else chunk
            joint = f"{line.split('-')[0]}-joint"
            sets = DOWNSTREAM if data_set == "downstream" else (data_set,)
            runs = [self.store.eval_runs[(stream, joint, c)], self.store.eval_runs[(stream, line, c)]]
            jt, st = ([self.client.get_run(r).data.metrics[f"{d}.{name}_top1"] for d in sets] for r in runs)
            return sum(jt) / len(jt) - sum(st) / len(st), tuple(runs)
        if chunk == "final":
            return self.plan(stream, line)[key], plan
        return {m.step: m.value for m in self.client.get_metric_history(plan, f"{key}_by_chunk")}[chunk], plan

    def sharpness(self, stream, line, chunk, key):
        return self.client.get_run(self.store.eval_runs[(stream, line, chunk)]).data.metrics[key]


@pytest.fixture(scope="module")
def written(study_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report, paths = make_report(Tracker(study_store.uri), EXPERIMENT, out, "markdown")
    for fmt in ("csv", "json"):  # the same report in the other formats (the CLI test runs them end to end)
        paths += write(report, out, fmt)
    return report, paths, out


def _expected_rows(logged: Logged):
    """(table, index, {column: (value, run)}) for every cell of every table, from the store."""
    store = logged.store
    for stream in STREAMS:
        for line in LINES:
            plan = store.plan_of_line[(stream, line)]
            for chunk in range(T):
                run = store.chunk_runs[(stream, line, chunk)]
                yield "resources", (stream, line, str(chunk)), {
                    k: (logged.resource(stream, line, chunk, k), run) for k in RESOURCE_COLUMNS}
                yield "sharpness", (stream, line, str(chunk)), {
                    k: (logged.sharpness(stream, line, chunk, k), store.eval_runs[(stream, line, chunk)])
                    for k in ("sharpness_eps0.1", "sharpness_eps0.3")}
            for name in PROTOCOLS:
                metrics = logged.plan(stream, line)
                cells = {}
                for column in [*CONTINUAL, *(f"{m}_top5" for m in CONTINUAL)]:
                    key = f"{line}.{name}{'_top5' if column.endswith('_top5') else ''}.{column.removesuffix('_top5')}"
                    no_fwt = column.startswith("fwt") and store.plan_runs[NO_BASELINE] == plan
                    cells[column] = (None if no_fwt else metrics[key], plan)
                yield f"continual.{name}", (stream, line), cells
                if not line.endswith("-joint"):
                    yield f"st_jt_gap.{name}", (stream, line), {
                        c if c == "final" else f"chunk {c}": (logged.gap(stream, line, name, c), plan)
                        for c in [*range(T), "final"]}
                    for data_set in (*DOWNSTREAM, "downstream"):
                        yield f"st_jt_gap.{data_set}.{name}", (stream, line), {
                            c if c == "final" else f"chunk {c}": logged.downstream_gap(stream, line, data_set, name, c)
                            for c in [*range(T), "final"]}


def _key(table: str, row: dict[str, str]) -> tuple:
    return (row["stream"], row["line"], row["chunk"]) if table in ("resources", "sharpness") else (row["stream"], row["line"])


def test_numbers_read_back_from_markdown_csv_and_json_are_the_logged_ones(study_store, written) -> None:
    report, paths, out = written
    assert report.complete and report.missing_cells() == [] and report.problems == []
    logged = Logged(study_store)
    md = md_tables((out / "report.md").read_text())
    data = json.loads((out / "report.json").read_text())
    assert data["complete"] is True
    by_name = {t["name"]: t for t in data["tables"]}
    checked = 0
    for table, index, cells in _expected_rows(logged):
        md_row = [r for r in md[table] if _key(table, r) == index]
        with (out / f"{table}.csv").open() as f:
            csv_row = [r for r in csv.DictReader(f) if _key(table, r) == index]
        json_row = [r for r in by_name[table]["rows"] if _key(table, {**r["index"]}) == index]
        assert len(md_row) == len(csv_row) == len(json_row) == 1, (table, index)
        md_row, csv_row, json_row = md_row[0], csv_row[0], json_row[0]
        runs = list(dict.fromkeys(r for value, run in cells.values() for r in ((run,) if isinstance(run, str) else run)))
        assert md_row["sources"].split() == csv_row["sources"].split() == json_row["runs"] == runs, (table, index)
        for column, (value, run) in cells.items():
            if value is None:  # FWT of the plan that turned eval.baseline off: not applicable, not missing
                assert md_row[column] == csv_row[column] == "n/a" and json_row["cells"][column]["na"]
                continue
            assert float(csv_row[column]) == value, (table, index, column)  # CSV keeps the logged float exactly
            expected_runs = [run] if isinstance(run, str) else list(run)
            assert json_row["cells"][column]["value"] == value and json_row["cells"][column]["runs"] == expected_runs
            assert float(md_row[column]) == pytest.approx(value, rel=5e-4, abs=5e-5), (table, index, column)
            checked += 1
    # 30 chunk rows x (8 resources + 2 sharpness), 10 lines x 2 protocols x 8 continual (minus 2 lines x 2 x 2 n/a FWT),
    # 6 non-joint lines x 2 protocols x 4 gap columns, and that again on 2 downstream sets and their mean.
    assert checked == 30 * 10 + 10 * 2 * 8 - 8 + 6 * 2 * 4 * (1 + 3)
    # The sum of bytes where the run logged only its parts, and the gap from the matrices where it logged no curve.
    stream, line, chunk = NO_STORED_BYTES
    cell = next(r for r in by_name["resources"]["rows"] if _key("resources", r["index"]) == (stream, line, str(chunk)))
    assert cell["cells"]["stored_bytes"]["source"] == "data_kept_bytes + model_state_bytes"
    gap = next(r for r in by_name["st_jt_gap.knn"]["rows"] if _key("st_jt_gap", r["index"]) == NO_GAP_BY_CHUNK)
    assert gap["cells"]["chunk 1"]["source"].startswith("accuracy_matrix.supervised-joint.knn.json")
    assert gap["cells"]["final"]["source"] == "supervised-sequential.knn.st_jt_gap"


def test_rows_are_ordered_by_stream_then_ssl_before_sl_then_st_aids_jt(written) -> None:
    report = written[0]
    rows = [(r.index["stream"], r.index["line"], r.index["strategy"]) for r in report.table("continual.knn").rows]
    order = ["simclr-sequential", "simclr-sequential-replay", "simclr-joint", "supervised-sequential",
             "supervised-joint"]
    assert [r[:2] for r in rows] == [(s, line) for s in STREAMS for line in order]
    assert [r[2] for r in rows[:5]] == ["ST", "ST+replay", "JT", "ST", "JT"]
    assert [r.index["paradigm"] for r in report.table("st_jt_gap.linear").rows][:3] == ["SSL", "SSL", "SL"]


def test_figures_are_written_and_logged_to_each_plan_run(study_store, written) -> None:
    report, paths, out = written
    client = MlflowClient(study_store.uri)
    for (stream, plan_name), plan in study_store.plan_runs.items():
        method, strategies = PLANS[plan_name]
        logged = {a.path for a in client.list_artifacts(plan, "report")}
        expected = {f"report/accuracy_matrix.{line_id(method, s)}.{n}.png" for s in strategies for n in PROTOCOLS}
        expected |= {f"report/accuracy_by_chunk.{n}.png" for n in PROTOCOLS}
        assert logged == expected, (stream, plan_name)
        for artifact in expected:
            local = out / "figures" / stream / artifact.split("/")[1]
            assert local in paths and local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 5000
    assert "![" in (out / "report.md").read_text()


def test_a_partial_record_names_its_missing_runs_and_cells(partial_study_store) -> None:
    report, _ = build_report(Tracker(partial_study_store.uri), EXPERIMENT)
    assert not report.complete
    failed_chunk = partial_study_store.chunk_runs[("random_class", "simclr-sequential-replay", 2)]
    failed_plan = partial_study_store.plan_runs[("random_class", "ssl")]
    assert [p.runs for p in report.problems] == [(failed_plan,), tuple(
        partial_study_store.chunk_runs[("random_class", "simclr-sequential-replay", c)] for c in range(T))]
    assert "FAILED" in report.problems[0].text
    assert f"chunk 2: chunk run {failed_chunk} is FAILED" in report.problems[1].text
    assert "2 of 3 chunk runs FINISHED" in report.problems[1].text
    missing = {(c["table"], c["row"]["stream"], c["row"]["line"], c["row"].get("chunk"), c["column"], c["reason"])
               for c in report.missing_cells()}
    expected = {("resources", "random_class", "simclr-sequential-replay", "2", k, "chunk run FAILED")
                for k in RESOURCE_COLUMNS}
    expected.add(("resources", "distant_class", "supervised-joint", "1", "wall_seconds", "not logged"))
    expected |= {("sharpness", "random_class", "simclr-sequential-replay", "2", k, "no eval run")
                 for k in ("sharpness_eps0.1", "sharpness_eps0.3")}
    for name in PROTOCOLS:
        expected |= {(f"continual.{name}", "random_class", "simclr-sequential-replay", None, c, "line lacks chunk(s) 2")
                     for c in [*CONTINUAL, *(f"{m}_top5" for m in CONTINUAL)]}
        expected |= {(f"st_jt_gap.{name}", "random_class", "simclr-sequential-replay", None, c, "line lacks chunk(s) 2")
                     for c in ["chunk 0", "chunk 1", "chunk 2", "final"]}
        # Its downstream gaps are not on the plan run either; chunks 0 and 1 come from the eval runs.
        expected |= {(f"st_jt_gap.{d}.{name}", "random_class", "simclr-sequential-replay", None, c,
                      "simclr-sequential-replay chunk 2: chunk run FAILED")
                     for d in (*DOWNSTREAM, "downstream") for c in ["chunk 2", "final"]}
    assert missing == expected
    # What the record does hold is still reported, from the runs that hold it.
    resources = report.table("resources")
    row = next(r for r in resources.rows if r.index == {"method": "supervised", "paradigm": "SL",
                                                         "stream": "distant_class", "line": "supervised-joint",
                                                         "strategy": "JT", "chunk": "1"})
    run = partial_study_store.chunk_runs[("distant_class", "supervised-joint", 1)]
    assert row.cells["train_seconds"].value == MlflowClient(partial_study_store.uri).get_run(run).data.metrics["train_seconds"]
    assert row.cells["wall_seconds"].runs == (run,) and row.cells["wall_seconds"].text() == "missing: not logged"


def test_an_unknown_experiment_is_an_error_naming_the_ones_there(study_store) -> None:
    with pytest.raises(ReportError, match=r"no MLflow experiment named 'studdy'.*Experiments there: .*study"):
        build_report(Tracker(study_store.uri), "studdy")


def test_an_experiment_without_plan_runs_is_an_error(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "empty")
    tracker.end_run(tracker.create_run("not a plan", {"note": "x"}))
    with pytest.raises(ReportError, match="holds no streamssl plan run"):
        build_report(tracker, "empty")


@pytest.mark.parametrize("strategy,label", [("sequential", "ST"), ("sequential+replay", "ST+replay"),
                                            ("sequential+mas", "ST+MAS"), ("sequential+replay+mas", "ST+MAS+"),
                                            ("sequential+mas+replay", "ST+MAS+"), ("joint", "JT"),
                                            ("sequential+cassle", "ST+CaSSLe")])
def test_line_labels(strategy: str, label: str) -> None:
    assert LineInfo(line_id("moco_v2", strategy), "moco_v2", strategy).label == label


def test_the_resource_table_shows_data_kept_apart_from_model_state(written) -> None:
    """JT's data grows per chunk (every chunk so far), ST keeps none, replay its buffer; model state is the checkpoint
    less the buffer inside it, and stored = data + model state (orchestrator.train.accounting, logged by the store)."""
    rows = {(r.index["stream"], r.index["line"], int(r.index["chunk"])): r.cells for r in written[0].table("resources").rows}
    for stream in STREAMS:
        for method in ("simclr", "supervised"):
            joint = [rows[(stream, f"{method}-joint", c)] for c in range(T)]
            assert [c["data_kept_rows"].value for c in joint] == [ROWS_PER_CHUNK * (c + 1) for c in range(T)]
            assert [c["data_kept_bytes"].value for c in joint] == [ROWS_PER_CHUNK * (c + 1) * BYTES_PER_ROW
                                                                  for c in range(T)]
            for c in range(T):
                st = rows[(stream, f"{method}-sequential", c)]
                assert st["data_kept_rows"].value == st["data_kept_bytes"].value == 0
                assert st["stored_bytes"].value == st["model_state_bytes"].value == st["checkpoint_bytes"].value
                assert joint[c]["stored_bytes"].value == joint[c]["data_kept_bytes"].value + joint[c][
                    "checkpoint_bytes"].value
        for c in range(T):
            replay = rows[(stream, "simclr-sequential-replay", c)]
            assert replay["data_kept_rows"].value == REPLAY_ROWS_PER_CHUNK * (c + 1)
            assert replay["data_kept_bytes"].value == 768 * REPLAY_ROWS_PER_CHUNK * (c + 1)
            assert replay["stored_bytes"].value == replay["checkpoint_bytes"].value  # the buffer is inside it
            assert replay["model_state_bytes"].value == replay["checkpoint_bytes"].value - replay["data_kept_bytes"].value


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / n ** 0.5
    return mean, mean - half, mean + half


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 30, 101])
def test_the_t_quantile_is_scipys(df: int) -> None:
    from scipy import stats

    from orchestrator.report.model import t_quantile_975

    assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


def test_plan_runs_of_one_study_with_other_seeds_give_n_mean_and_a_t_interval(seeded_study_store,
                                                                             tmp_path: Path) -> None:
    store, client = seeded_study_store, MlflowClient(seeded_study_store.uri)
    old, seed0, seed1, untagged0, untagged1 = (m["run"] for m in store.made)
    report, _ = build_report(Tracker(store.uri), SEEDED_EXPERIMENT)
    assert report.complete, report.missing_cells()
    # A re-run of seed 1 supersedes its older run; without the study tag, the newest plan run supersedes (as before).
    assert sorted(p["run"] for p in report.plans) == sorted([seed0, seed1, untagged1])
    assert any(old in note and "superseded" in note for note in report.notes)
    assert any(untagged0 in note and "superseded" in note for note in report.notes)
    paths = write(report, tmp_path, "csv") + write(report, tmp_path, "json")
    data = {t["name"]: t for t in json.loads((tmp_path / "report.json").read_text())["tables"]}
    metric = lambda run, key: client.get_run(run).data.metrics[key]  # noqa: E731
    checked = 0
    for line in ("simclr-sequential", "simclr-joint"):
        for name in PROTOCOLS:
            for column, key in [("avg_acc", f"{line}.{name}.avg_acc"), ("fwt_top5", f"{line}.{name}_top5.fwt")]:
                values = [metric(seed0, key), metric(seed1, key)]
                assert metric(old, key) not in values  # (the superseded run's numbers differ)
                mean, lo, hi = _t_interval(values)
                row = next(r for r in report.table(f"continual.{name}").rows
                           if (r.index["stream"], r.index["line"]) == (SEEDED_STREAM, line))
                cell = row.cells[column]
                assert (cell.n, cell.values, cell.runs) == (2, tuple(values), (seed0, seed1))
                assert (cell.value, cell.lo, cell.hi) == pytest.approx((mean, lo, hi), rel=1e-9, abs=1e-12)
                assert lo < mean < hi or values[0] == values[1]
                as_json = next(r for r in data[f"continual.{name}"]["rows"]
                               if (r["index"]["stream"], r["index"]["line"]) == (SEEDED_STREAM, line))["cells"][column]
                assert (as_json["n"], as_json["mean"], as_json["lo"], as_json["hi"]) == (2, cell.value, cell.lo, cell.hi)
                with (tmp_path / f"continual.{name}.csv").open() as f:
                    as_csv = next(r for r in csv.DictReader(f) if (r["stream"], r["line"]) == (SEEDED_STREAM, line))
                assert as_csv[f"{column}.n"] == "2"
                assert [float(as_csv[k]) for k in (column, f"{column}.lo", f"{column}.hi")] == [cell.value, cell.lo,
                                                                                                cell.hi]
                checked += 1
        # The chunk runs' numbers and the sharpness of each seed's eval runs; the gap pairs each seed with its JT.
        for chunk in range(2):
            runs = [next(m for m in store.made if m["run"] == p)["chunk_runs"][(line, chunk)] for p in (seed0, seed1)]
            evals = [next(m for m in store.made if m["run"] == p)["eval_runs"][(line, chunk)] for p in (seed0, seed1)]
            for table, column, sources in [("resources", "checkpoint_bytes", runs), ("resources", "wall_seconds", runs),
                                           ("resources", "data_kept_bytes", runs),
                                           ("sharpness", "sharpness_eps0.05", evals)]:
                values = [metric(r, column) for r in sources]
                row = next(r for r in report.table(table).rows if (r.index["stream"], r.index["line"],
                                                                    r.index["chunk"]) == (SEEDED_STREAM, line, str(chunk)))
                cell = row.cells[column]
                assert cell.n == 2 and cell.values == tuple(values) and cell.runs == tuple(sources)
                assert (cell.value, cell.lo, cell.hi) == pytest.approx(_t_interval(values), rel=1e-9, abs=1e-12)
                checked += 1
    gap = next(r for r in report.table("st_jt_gap.knn").rows
               if (r.index["stream"], r.index["line"]) == (SEEDED_STREAM, "simclr-sequential")).cells["final"]
    values = [metric(p, "simclr-sequential.knn.st_jt_gap") for p in (seed0, seed1)]
    assert gap.n == 2 and gap.value == pytest.approx(sum(values) / 2, abs=1e-12)
    # Only the epsilon the spec asks for (eval.sharpness.epsilons [0.05]): no 0.1 or 0.3 column made up.
    assert report.table("sharpness").value_columns == ["sharpness_eps0.05"]
    # The untagged stream: one plan run (the newest), single numbers.
    row = next(r for r in report.table("continual.knn").rows
               if (r.index["stream"], r.index["line"]) == (UNTAGGED_STREAM, "simclr-sequential"))
    assert row.cells["avg_acc"].n == 1 and row.cells["avg_acc"].lo is None
    assert row.cells["avg_acc"].value == metric(untagged1, "simclr-sequential.knn.avg_acc")
    assert checked == 2 * 2 * 2 + 2 * 2 * 4 and len(paths) > 5


def test_the_study_key_is_the_plan_identity_without_the_seed() -> None:
    from orchestrator.spec.experiment import Spec, identity_digest

    def spec(**top) -> Spec:
        return Spec.model_validate({"name": "s", "data": {"url": "/data/synthetic"}, "stream": {"kind": "random_class",
                                    "chunks": 2}, "lines": {"method": ["simclr"], "strategy": ["sequential"]}, **top})

    assert identity_digest(spec(seed=0), with_seed=False) == identity_digest(spec(seed=3), with_seed=False)
    assert identity_digest(spec(seed=0)) != identity_digest(spec(seed=3))  # the plan key still tells seeds apart
    assert identity_digest(spec(seed=0), with_seed=False) != identity_digest(
        spec(seed=0, optim={"lr": 0.5}), with_seed=False)
