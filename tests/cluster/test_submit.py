"""A spec submitted with `streamssl submit` to a two-node Ray cluster on this host, through the Jobs API, with every
URL remote: shards and checkpoints on an S3 endpoint (moto, over HTTP), tracking on an `mlflow server` backed by
PostgreSQL with its artifacts on the same S3. The lineage is read back through the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import storage
from orchestrator.data.synth import generate_synthetic
from orchestrator.plan.planner import build_plan
from orchestrator.spec.experiment import load_spec
from orchestrator.tracking import tags as tr
from tests.cluster.ray_cluster import LocalRayCluster
from tests.cluster.services import PostgresMlflow, require_postgres
from tests.orchestrator.s3_server import S3Server
from tests.specs import tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    require_postgres()
    folder = tmp_path_factory.mktemp("cluster")
    with S3Server() as s3:
        generate_synthetic(s3.url("data"), storage_options=s3.storage_options, train=600, val=240, image_size=16,
                           seed=0, shard_rows=150, progress=False)
        with PostgresMlflow(artifacts=s3.url("mlflow"), s3_endpoint=s3.endpoint_url) as server:
            with LocalRayCluster(folder / "ray", cpus_per_node=3) as cluster:
                yield s3, server, cluster, folder


def streamssl(cluster: LocalRayCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **cluster.client_env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cli.app", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_spec(folder: Path, s3: S3Server, tracking_uri: str, name: str, data: str = "data") -> Path:
    spec = tiny_spec(
        name, s3.url(data), data={"storage_options": s3.storage_options},
        # 2 CPUs per worker on nodes of 3: the two DDP workers cannot share a node. One epoch a chunk: what runs
        # across the nodes is the same with a second (issue 23: 2 epochs took 52 s and 36 s a chunk of the 224 s).
        resources={"cpus_per_worker": 2}, optim={"epochs_per_chunk": 1},
        storage={"checkpoints": s3.url("checkpoints", name), "storage_options": s3.storage_options},
        tracking={"uri": tracking_uri})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def planned(path: Path) -> tuple[dict[str, int], int, float]:
    """What the spec at `path` makes each chunk do: its steps (epochs x (training rows // global batch)), the
    global batch, and the chance accuracy of its data set."""
    spec = load_spec(path)
    plan = build_plan(spec)
    steps = {str(j.chunk): spec.optim.epochs_per_chunk * (
        sum(plan.stream.chunks[c].rows for c in j.training_chunks) // spec.optim.batch_size) for j in plan.jobs}
    return steps, spec.optim.batch_size, 1 / plan.manifest.num_classes


def wait_for_job(cluster: LocalRayCluster, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = streamssl(cluster, "status", "--job", job_id, "--address", cluster.dashboard_url)
        assert done.returncode == 0, done.stderr
        for state in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"job {job_id}: {state}" in done.stdout:
                return done.stdout
        time.sleep(5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def test_submitted_spec_trains_across_two_nodes_with_every_url_remote(services) -> None:
    s3, server, cluster, folder = services
    path = write_spec(folder, s3, server.uri, "cluster-submit")
    submitted = streamssl(cluster, "submit", str(path), "--address", cluster.dashboard_url)
    assert submitted.returncode == 0, submitted.stderr
    assert "local path" not in submitted.stderr  # nothing in this spec needs a shared disk
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("streamssl-cluster-submit-")

    status = wait_for_job(cluster, job_id, timeout=900)
    logs = streamssl(cluster, "logs", job_id, "--address", cluster.dashboard_url)
    assert f"job {job_id}: SUCCEEDED" in status, status + logs.stdout[-4000:]
    assert logs.returncode == 0 and "simclr-sequential" in logs.stdout  # the results table the driver printed

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("cluster-submit")
    runs = client.search_runs([exp.experiment_id])
    assert not [r for r in runs if r.info.status != "FINISHED"]
    plan = [r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "plan"]
    chunks = sorted((r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "chunk"),
                    key=lambda r: int(r.data.tags[tr.CHUNK]))
    evals = [r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "eval"]
    assert len(plan) == 1 and len(chunks) == 2 and len(evals) == 2 and len(runs) == 5  # nothing else logged
    # 300 rows a chunk, global batch 32, 1 epoch: 9 steps of 16 images on each of the 2 workers.
    steps, batch, chance = planned(path)
    for run in chunks:
        m = run.data.metrics
        assert m["steps"] == steps[run.data.tags[tr.CHUNK]] and m["samples"] == m["steps"] * batch
        assert m["restarts"] == 0 and m["resumed_from_step"] == 0
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == m["steps"]
        # The DDP workers ran on both nodes, and the checkpoint is on S3 and loads.
        nodes = json.loads(run.data.tags[tr.TAG + "worker_nodes"])
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
        assert run.data.metrics["num_nodes"] == 2 and run.data.metrics["world_size"] == 2
        checkpoint = run.data.tags[tr.CHECKPOINT]
        assert checkpoint.startswith(f"s3://{s3.bucket}/checkpoints/cluster-submit/")
        assert storage.read_bytes(f"{checkpoint}/state.pt", s3.storage_options)[-48:-40] == b"SSLCKPT1"
        # 12 classes (chance 1/12), 240 queries: kNN top-1 measured 0.23 and 0.27 after 2 epochs a chunk.
        assert m["knn_top1"] >= 1.5 * chance, m["knn_top1"]
    # Artifacts went through the server to S3, and the lineage reads back through the server.
    names = {f.path for f in client.list_artifacts(plan[0].info.run_id)}
    assert {"spec.yaml", "stream_plan.json"} <= names
    assert storage.exists(s3.url("mlflow"), s3.storage_options)
    lineage = streamssl(cluster, "lineage", plan[0].info.run_id, "--json", "--tracking-uri", server.uri)
    assert lineage.returncode == 0, lineage.stderr
    assert sorted(json.loads(lineage.stdout)["chunks"]) == sorted(r.info.run_id for r in chunks)
    up = streamssl(cluster, "lineage", evals[0].info.run_id, "--json", "--tracking-uri", server.uri)
    chain = json.loads(up.stdout)
    assert chain["plan"] == plan[0].info.run_id and chain["chunk"] in {r.info.run_id for r in chunks}
    assert chain["checkpoint_uri"].startswith("s3://")
    # The S3 secret given in storage_options never reached MLflow.
    assert s3.storage_options["secret"] not in json.dumps([r.data.params for r in runs])


def test_failed_job_is_reported_with_its_state_and_exit_code(services) -> None:
    s3, server, cluster, folder = services
    path = write_spec(folder, s3, server.uri, "cluster-missing-data", data="no-such-data")
    # Validation passes here (the spec is well-formed); the job itself finds no manifest at the URL and fails.
    submitted = streamssl(cluster, "submit", str(path), "--address", cluster.dashboard_url, "--wait", timeout=600)
    assert submitted.returncode == 6, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[0]
    assert "FAILED" in submitted.stderr + submitted.stdout
    assert "no-such-data" in submitted.stdout  # the job's own error, streamed by --wait
    status = streamssl(cluster, "status", "--job", job_id, "--address", cluster.dashboard_url)
    assert f"job {job_id}: FAILED" in status.stdout
    unknown = streamssl(cluster, "status", "--job", "streamssl-no-such-job", "--address", cluster.dashboard_url)
    assert unknown.returncode == 6 and "streamssl-no-such-job" in unknown.stderr


def test_run_connects_to_a_running_cluster_with_ray_client(services) -> None:
    s3, server, cluster, folder = services
    path = write_spec(folder, s3, server.uri, "cluster-client")
    done = streamssl(cluster, "run", str(path), "--address", cluster.client_address, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("cluster-client").experiment_id],
                              f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    steps, _, _ = planned(path)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        m = run.data.metrics
        assert m["num_nodes"] == 2 and m["world_size"] == 2 and m["restarts"] == 0
        assert m["steps"] == steps[run.data.tags[tr.CHUNK]]


def test_the_services_script_serves_mlflow_from_postgres_and_keeps_runs_across_a_restart(services) -> None:
    """cluster/mlflow/start-local.sh, the script an operator runs (and that started this module's server): runs live
    in PostgreSQL (the database `mlflow`), artifacts in the configured destination (the S3 bucket here), `status`
    tells stopped from running, and a stop and start on the same state keeps the runs. Last in the module: it stops
    the server the other tests used, and leaves it running again."""
    import psycopg2

    s3, server, _, _ = services
    assert server.uri in server.start_output and "stop" in server.start_output
    client = MlflowClient(server.uri)
    experiment_id = client.create_experiment("cluster-start-local")
    run = client.create_run(experiment_id, run_name="smoke")
    client.log_param(run.info.run_id, "optim.lr", "0.3")
    client.log_metric(run.info.run_id, "knn_top1", 0.42)
    note = server.base / "note.txt"
    note.write_text("lineage")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    back = client.get_run(run.info.run_id)
    assert back.data.params == {"optim.lr": "0.3"} and back.data.metrics == {"knn_top1": 0.42}
    assert back.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    fs, root = storage.resolve(s3.url("mlflow"), s3.storage_options)
    fs.invalidate_cache()
    landed = fs.find(root)
    assert any(run.info.run_id in path and path.endswith("/note.txt") for path in landed), landed  # on S3

    connection = psycopg2.connect(host="127.0.0.1", port=server.pg_port, user="mlflow", dbname="mlflow",
                                  passfile=str(server.state / "pgpass"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(experiment_id),))
            assert cursor.fetchone() == ("cluster-start-local",)
    finally:
        connection.close()

    server.script("stop")
    status = server.script("status")
    assert "PostgreSQL: stopped" in status and "mlflow server: stopped" in status
    server.script("start")
    assert "running" in server.script("status")
    assert MlflowClient(server.uri).get_run(run.info.run_id).data.metrics == {"knn_top1": 0.42}
