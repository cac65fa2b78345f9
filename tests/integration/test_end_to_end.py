"""End to end through the CLI: S3 shards (moto on 127.0.0.1) -> Ray Data -> 2-worker DDP (gloo) per chunk ->
evaluation -> MLflow lineage in SQLite, read back with MlflowClient. Then status, lineage and a --resume that
has nothing left to do. Runs a shrunken examples/quickstart.yaml."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli.app import app
from evaluators.continual import AccuracyMatrix, st_jt_gap
from orchestrator.data.shards import read_index
from orchestrator.data.synth import generate_synthetic
from orchestrator.plan.planner import build_plan
from orchestrator.spec.experiment import load_spec
from orchestrator.tracking import tags as tr
from tests.orchestrator.s3_server import DUMMY_SECRET, S3Server
from trainers.engine.checkpoint import load_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, s3, ray_local):
    work = tmp_path_factory.mktemp("e2e")
    data_url = s3.url("synthetic")
    generate_synthetic(data_url, train=480, val=160, image_size=32, seed=1, shard_rows=160,
                       storage_options=s3.storage_options, progress=False)
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["data"] = {"url": data_url, "image_size": 16, "storage_options": s3.storage_options}
    spec["stream"] = {"kind": "random_class", "chunks": 2, "seed": 0}
    spec["backbone"] = {"name": "resnet18", "width": 8}
    spec["methods"] = {"simclr": {"proj_hidden": 64}, "byol": {"proj_hidden": 64, "pred_hidden": 64}}
    spec["optim"].update(epochs_per_chunk=1, batch_size=32)
    spec["eval"].update(linear={"epochs": 5})
    spec["storage"] = {"workdir": str(work / "runs")}
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    uri = f"sqlite:///{work / 'runs' / 'mlflow.db'}"
    plan = build_plan(load_spec(path))  # what the spec makes each job do, for exact expectations
    return {"path": path, "work": work, "output": result.output, "uri": uri, "client": MlflowClient(uri),
            "plan": plan, "val": read_index(data_url, "val", s3.storage_options)}


def _runs(client: MlflowClient, run_type: str):
    exp = client.get_experiment_by_name("quickstart")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = '{run_type}'")


def _accuracy_matrices(client: MlflowClient, name: str, suffix: str = "") -> dict[str, list[list[float]]]:
    """Per line, acc[i][j] = the logged `{name}_task{j}{suffix}` of the evaluation after chunk i (suffix "" for
    top-1, "_top5" for top-5)."""
    pattern = re.compile(rf"{name}_task(\d+){suffix}")
    matrices: dict[str, dict[int, list[float]]] = {}
    for ev in _runs(client, "eval"):
        m = ev.data.metrics
        tasks = sorted(int(match.group(1)) for k in m if (match := pattern.fullmatch(k)))
        row = [m[f"{name}_task{t}{suffix}"] for t in tasks]
        matrices.setdefault(ev.data.tags[tr.LINE], {})[int(ev.data.tags[tr.CHUNK])] = row
    return {line: [rows[i] for i in sorted(rows)] for line, rows in matrices.items()}


def test_every_chunk_has_a_finished_run_checkpoint_and_evaluation(finished_run) -> None:
    client, stream, spec = finished_run["client"], finished_run["plan"].stream, finished_run["plan"].spec
    batch = spec.optim.batch_size
    jobs = {(j.line.id, str(j.chunk)): j for j in finished_run["plan"].jobs}
    chance = 1 / finished_run["plan"].manifest.num_classes
    val = finished_run["val"]
    labels, domains = val.column("label").to_numpy(), val.column("domain").to_numpy()
    # A random_class stream's tasks split the held-out rows by class: top-1 is their row-weighted mean.
    task_rows = [int(stream.task_mask(t, labels, domains).sum()) for t in range(stream.num_chunks)]
    assert sum(task_rows) == len(labels)
    plans = _runs(client, "plan")
    assert len(plans) == 1 and plans[0].info.status == "FINISHED"
    plan = plans[0]
    chunks = _runs(client, "chunk")
    evals = _runs(client, "eval")
    lines = {"simclr-sequential", "simclr-joint", "byol-sequential", "byol-joint"}
    assert sorted((r.data.tags[tr.LINE], r.data.tags[tr.CHUNK]) for r in chunks) == sorted(
        (line, str(c)) for line in lines for c in range(2))
    assert all(r.info.status == "FINISHED" for r in chunks + evals)
    assert len(evals) == len(chunks)
    by_chunk = {e.data.tags[tr.EVALUATES]: e for e in evals}
    for run in chunks:
        job = jobs[(run.data.tags[tr.LINE], run.data.tags[tr.CHUNK])]
        rows = sum(stream.chunks[c].rows for c in job.training_chunks)
        steps = spec.optim.epochs_per_chunk * (rows // batch)
        assert run.data.tags[tr.PARENT] == plan.info.run_id
        assert run.data.tags[tr.PLAN_KEY] == plan.data.tags[tr.PLAN_KEY]
        assert run.data.params["optim.lr"] == "0.5" and run.data.params["line.method"] in ("simclr", "byol")
        m = run.data.metrics
        assert m["world_size"] == spec.resources.workers == 2  # both DDP workers trained
        # The job's rows, one pass, every batch full: exactly the planned steps and samples, nothing restarted.
        assert m["training_rows"] == rows
        assert m["steps"] == steps and m["samples"] == steps * batch
        assert m["restarts"] == 0 and m["resumed_from_step"] == 0 and m["corrupt_rows_skipped_total"] == 0
        # Where the chunk's time went, as logged for the overheads benchmark.
        assert 0 < m["first_batch_seconds"] <= m["data_wait_seconds"] < m["train_seconds"]
        assert m["checkpoint_save_seconds"] > 0 and m["checkpoint_report_seconds"] > 0
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == steps
        state = load_state(run.data.tags[tr.CHECKPOINT])
        assert state["position"]["chunks_done"] == int(run.data.tags[tr.CHUNK]) + 1
        assert state["line_id"] == run.data.tags[tr.LINE]
        ev = by_chunk[run.info.run_id]
        # One epoch of 7-15 steps barely moves the encoder: kNN top-1 measured 0.19-0.31 (random init 0.15,
        # chance 1/12 = 0.083 over 160 queries); the 5-epoch linear probe is noisier (0.11-0.24), so it is bounded
        # in the mean over the 8 evaluations below (measured 0.18).
        assert ev.data.metrics["knn_top1"] >= 1.5 * chance, ev.data.metrics["knn_top1"]
        assert 0.0 <= ev.data.metrics["linear_top1"] <= 1.0
        for name in ("knn", "linear"):
            for k in ("top1", "top5"):
                overall = ev.data.metrics[f"{name}_{k}"]
                assert run.data.metrics[f"{name}_{k}"] == overall
                suffix = "" if k == "top1" else "_top5"
                per_task = [ev.data.metrics[f"{name}_task{t}{suffix}"] for t in range(stream.num_chunks)]
                assert overall == pytest.approx(sum(a * n for a, n in zip(per_task, task_rows)) / len(labels),
                                                abs=1e-9)
            assert ev.data.metrics[f"{name}_top5"] >= ev.data.metrics[f"{name}_top1"]
        assert json.loads(ev.data.tags[tr.TAG + "eval_protocol"])["knn"]["k"] == 20
    assert sum(e.data.metrics["linear_top1"] for e in evals) / len(evals) >= 1.5 * chance
    assert 0 < plan.data.metrics["time_to_first_step_seconds"] < 600
    assert plan.data.metrics["worker_group_start_seconds"] > 0 and plan.data.metrics["worker_group_stop_seconds"] >= 0
    # All four lines share one worker group (lines_per_worker_group 0): it started once.
    assert len(client.get_metric_history(plan.info.run_id, "worker_group_start_seconds")) == 1
    joint_chunk1 = [r for r in chunks if r.data.tags[tr.LINE] == "simclr-joint" and r.data.tags[tr.CHUNK] == "1"][0]
    seq_chunk1 = [r for r in chunks if r.data.tags[tr.LINE] == "simclr-sequential" and r.data.tags[tr.CHUNK] == "1"][0]
    assert joint_chunk1.data.metrics["training_rows"] == 480 > seq_chunk1.data.metrics["training_rows"]
    assert seq_chunk1.data.metrics["training_rows"] == stream.chunks[1].rows


def test_plan_run_records_what_makes_numbers_reproducible(finished_run) -> None:
    client = finished_run["client"]
    plan = _runs(client, "plan")[0]
    tags = plan.data.tags
    for key in ("data_digest", "stream_digest", "version.torch", "version.torchvision", "version.pillow",
                "version.streamssl"):
        assert tags[tr.TAG + key] and tags[tr.TAG + key] != "not installed", key
    artifacts = {a.path for a in client.list_artifacts(plan.info.run_id)}
    assert {"spec.yaml", "stream_plan.json", "manifest.json", "eval_protocol.json", "summary.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(plan.info.run_id, "plots")}
    assert {"plots/accuracy_matrix.simclr-sequential.knn.png", "plots/accuracy_matrix.simclr-sequential.knn_top5.png",
            "plots/knn_top5_by_chunk.png"} <= plots
    assert "accuracy_matrix.byol-joint.linear_top5.json" in artifacts
    # The continual metrics are those of the logged evaluations (2 chunks: acc[i][j], task j after chunk i),
    # top-1 under `{line}.{name}.*` and top-5 under `{line}.{name}_top5.*`.
    for name in ("knn", "linear"):
        for suffix in ("", "_top5"):
            acc = _accuracy_matrices(client, name, suffix)
            for method in ("simclr", "byol"):
                for line in (f"{method}-sequential", f"{method}-joint"):
                    a, key = acc[line], f"{line}.{name}{suffix}"
                    assert plan.data.metrics[f"{key}.avg_acc"] == pytest.approx((a[1][0] + a[1][1]) / 2, abs=1e-9)
                    assert plan.data.metrics[f"{key}.bwt"] == pytest.approx(a[1][0] - a[0][0], abs=1e-9)
                    assert plan.data.metrics[f"{key}.forgetting"] == pytest.approx(a[0][0] - a[1][0], abs=1e-9)
        acc = _accuracy_matrices(client, name)
        for method in ("simclr", "byol"):
            st, jt = acc[f"{method}-sequential"], acc[f"{method}-joint"]
            gap = (jt[1][0] + jt[1][1]) / 2 - (st[1][0] + st[1][1]) / 2
            assert plan.data.metrics[f"{method}.{name}.st_jt_gap"] == pytest.approx(gap, abs=1e-9)
            assert plan.data.metrics[f"{method}-sequential.{name}.st_jt_gap"] == pytest.approx(gap, abs=1e-9)
            by_chunk = sorted(client.get_metric_history(plan.info.run_id,
                                                        f"{method}-sequential.{name}.st_jt_gap_by_chunk"),
                              key=lambda h: h.step)
            assert [h.step for h in by_chunk] == [0, 1]
            assert [h.value for h in by_chunk] == pytest.approx([jt[0][0] - st[0][0], gap], abs=1e-9)
    assert plan.inputs.dataset_inputs[0].dataset.digest == tags[tr.TAG + "data_digest"][:36]
    # Credentials given in storage_options never reach MLflow.
    local = Path(client.download_artifacts(plan.info.run_id, "spec.yaml"))
    assert DUMMY_SECRET not in local.read_text()
    assert all(DUMMY_SECRET not in v for v in plan.data.params.values())
    assert all(DUMMY_SECRET not in v for v in tags.values())


def test_results_table_printed(finished_run) -> None:
    out = finished_run["output"]
    assert "after each chunk" in out and "knn_top1" in out and "continual metrics" in out
    assert "simclr-sequential" in out and "ST-JT gap (byol-sequential)" in out and "knn_top5" in out


def test_lineage_walks_both_ways(finished_run) -> None:
    client, uri = finished_run["client"], finished_run["uri"]
    ev = _runs(client, "eval")[0]
    chunk_id = ev.data.tags[tr.EVALUATES]
    up = CliRunner().invoke(app, ["lineage", ev.info.run_id, "--tracking-uri", uri, "--json"])
    assert up.exit_code == 0, up.output
    chain = json.loads(up.output)
    assert chain["chunk"] == chunk_id and ev.info.run_id in chain["evals"]
    assert chain["checkpoint_uri"] == client.get_run(chunk_id).data.tags[tr.CHECKPOINT]
    assert chain["model_id"] == client.get_run(chunk_id).data.tags[tr.MODEL_ID]
    plan_id = chain["plan"]
    down = CliRunner().invoke(app, ["lineage", plan_id, "--tracking-uri", uri])
    assert down.exit_code == 0, down.output
    assert chunk_id in down.output.replace("\n", "") or chunk_id[:20] in down.output
    assert "data:" in down.output and "checkpoint:" in down.output
    missing = CliRunner().invoke(app, ["lineage", "0" * 32, "--tracking-uri", uri])
    assert missing.exit_code == 5 and "not found" in missing.output


def test_each_checkpoint_is_a_logged_model_with_its_evaluation(finished_run) -> None:
    """MLflow's own Models view walks chunk -> checkpoint -> metrics: each chunk run's checkpoint is a READY
    LoggedModel it made (as its output at the chunk's step), scored by its eval run on the evaluation split."""
    client = finished_run["client"]
    chunks = _runs(client, "chunk")
    models = client.search_logged_models([chunks[0].info.experiment_id])
    assert len(models) == len(chunks)
    by_id = {m.model_id: m for m in models}
    for chunk in chunks:
        model = by_id[chunk.data.tags[tr.MODEL_ID]]
        assert model.source_run_id == chunk.info.run_id and str(model.status) == "READY"
        assert model.tags[tr.CHECKPOINT] == chunk.data.tags[tr.CHECKPOINT]
        assert model.params["chunk"] == chunk.data.tags[tr.CHUNK] and "/" not in model.name
        assert [(o.model_id, o.step) for o in chunk.outputs.model_outputs] == [
            (model.model_id, int(chunk.data.tags[tr.CHUNK]))]
        (evaluation,) = client.search_runs([chunk.info.experiment_id],
                                           f"tags.`{tr.EVALUATES}` = '{chunk.info.run_id}'")
        scored = {m.key: m for m in model.metrics}
        assert scored["knn_top1"].value == evaluation.data.metrics["knn_top1"]
        assert scored["knn_top1"].run_id == evaluation.info.run_id
        assert len(client.get_metric_history(evaluation.info.run_id, "knn_top1")) == 1
        eval_inputs = {d.dataset.name for d in evaluation.inputs.dataset_inputs}
        assert scored["knn_top1"].dataset_name in eval_inputs


def test_status_and_resume_skip_finished_jobs(finished_run) -> None:
    client, path = finished_run["client"], str(finished_run["path"])
    status = CliRunner().invoke(app, ["status", path])
    assert status.exit_code == 0, status.output
    assert "8 FINISHED" in status.output
    before = len(_runs(client, "chunk"))
    assert before == len(finished_run["plan"].jobs) == 8
    again = CliRunner().invoke(app, ["run", path, "--resume"])
    assert again.exit_code == 0, again.output
    assert len(_runs(client, "chunk")) == before
    assert len(_runs(client, "plan")) == 1  # the same plan run continued
    dry = CliRunner().invoke(app, ["run", path, "--dry-run"])
    assert dry.exit_code == 0 and dry.output.count("FINISHED") == 8


def _report_cell_is_logged(client: MlflowClient, table: str, row: dict, column: str, cell: dict) -> None:
    """A report cell's number is what the run it names logged under its source key (or the arithmetic the source
    names on logged numbers); a missing cell's key is absent from that run."""
    source, runs = cell["source"], cell["runs"]
    if cell["value"] is None:
        if runs and " " not in source:
            run = client.get_run(runs[0])
            assert run.info.status != "FINISHED" or source not in run.data.metrics, (table, row["index"], column)
        return
    if "accuracy_matrix." in source:  # the ST-JT gap from the logged matrices (no per-chunk metric logged)
        jt_name, st_name = source.split(" - ")
        with tempfile.TemporaryDirectory() as folder:
            read = lambda run, name: AccuracyMatrix.from_dict(  # noqa: E731
                json.loads(Path(client.download_artifacts(run, name, folder)).read_text()))
            gap = st_jt_gap(read(runs[0], st_name), read(runs[-1], jt_name))
        expected = gap.final if column == "final" else gap.per_chunk[int(column.split()[1])]
    elif source == "data_kept_bytes + model_state_bytes":
        metrics = client.get_run(runs[0]).data.metrics
        expected = metrics["data_kept_bytes"] + metrics["model_state_bytes"]
    elif source.endswith(".st_jt_gap_by_chunk"):
        history = {m.step: m.value for m in client.get_metric_history(runs[0], source)}
        expected = history[int(column.split()[1])]
    else:
        expected = client.get_run(runs[0]).data.metrics[source]
    assert cell["value"] == pytest.approx(expected, abs=1e-12), (table, row["index"], column)


def test_report_on_the_finished_run_reads_its_numbers_back(finished_run, tmp_path: Path) -> None:
    client, out = finished_run["client"], tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "quickstart", "--format", "json", "--out", str(out),
                                      "--tracking-uri", finished_run["uri"]])
    data = json.loads((out / "report.json").read_text())
    assert result.exit_code == (0 if data["complete"] else 1), result.output
    tables = {t["name"]: t for t in data["tables"]}
    for table in tables.values():
        for row in table["rows"]:
            for column, cell in row["cells"].items():
                _report_cell_is_logged(client, table["name"], row, column, cell)
    # What this run logs whatever else is added: training time per chunk, the continual metrics, the ST-JT gap.
    lines = {"simclr-sequential", "simclr-joint", "byol-sequential", "byol-joint"}
    resources = tables["resources"]["rows"]
    assert {(r["index"]["line"], r["index"]["chunk"]) for r in resources} == {(l, str(c)) for l in lines for c in range(2)}
    assert all(r["cells"]["train_seconds"]["value"] > 0 for r in resources)
    for name in ("knn", "linear"):
        continual = {r["index"]["line"]: r["cells"] for r in tables[f"continual.{name}"]["rows"]}
        assert set(continual) == lines and all(c["bwt"]["value"] is not None for c in continual.values())
        gaps = {r["index"]["line"]: r["cells"] for r in tables[f"st_jt_gap.{name}"]["rows"]}
        assert set(gaps) == {"simclr-sequential", "byol-sequential"}
        assert all(g["final"]["value"] is not None and g["chunk 1"]["value"] is not None for g in gaps.values())
    plan = _runs(client, "plan")[0].info.run_id
    logged = {a.path for a in client.list_artifacts(plan, "report")}
    assert {f"report/accuracy_matrix.{l}.knn.png" for l in lines} | {"report/accuracy_by_chunk.knn.png"} <= logged
