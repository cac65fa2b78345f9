"""`streamssl sweep` for real: Ray Tune trials of the real driver, ASHA, a diverging trial, a driver killed mid-sweep
and resumed, nested MLflow runs, the best spec, status and lineage.

One sweep (4 grid trials over optim.lr on the synthetic set, 2 chunks each) is run by the CLI in a subprocess, the way
a user runs it: from a folder of their own that is not the repo, with a relative `data.url`, the default
`storage.workdir` and no tracking URI (issue 21: Tune moves every trial into a folder of its own, and every run must
still land in the user's store). It is killed (process group and all) once its first trial has finished, and
resumed; the tests read what it left. Planned outcome: lr 0.5 learns (finished); lr 1e-5 and 2e-5 barely move from
the initial weights, so ASHA stops them after chunk 0 against lr 0.5's chunk-0 accuracy (the first of them after the
resume, from the rungs refilled from MLflow); lr 1e6 diverges in its first chunk (failed, with its error).
(Issue 23: the relative-path sweep that ran a second sweep of its own on the session's Ray is this one now.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import ViewType

from orchestrator.sweep import records as rec
from tests.specs import tiny_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LRS = [0.5, 1e-5, 1e6, 2e-5]


def _cli(*args: str, timeout: float = 1200, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.app", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    # The repo first on the path: the subprocess runs from the user's folder, and must run this checkout's code.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "COLUMNS": "200", "PYTHONPATH": path}


def _runs(uri: str, name: str, query: str = "", view=ViewType.ACTIVE_ONLY):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], query, run_view_type=view) if experiment else []


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the sweep driver and everything it started (its local Ray included), as a machine loss would."""
    import psutil

    parent = psutil.Process(process.pid)
    family = [parent, *parent.children(recursive=True)]
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, synthetic_url):
    user = tmp_path_factory.mktemp("sweep")  # the user's folder: the sweep runs from here, the repo is elsewhere
    data = os.path.relpath(synthetic_url, user)
    assert not os.path.isabs(data)
    raw = tiny_spec("sweep-it", data, optim={"epochs_per_chunk": 1, "batch_size": 64},
                    eval={"every_chunk": ["knn"], "baseline": False},
                    sweep={"metric": "knn_top1", "search": "grid", "scheduler": {"kind": "asha"},
                           "space": {"optim.lr": {"grid": LRS}}})
    raw.pop("storage", None)  # the default workdir, streamssl-runs/ under the folder it is run from
    (user / "sweep.yaml").write_text(yaml.safe_dump(raw))
    store = user / "streamssl-runs" / "mlflow.db"  # where a sweep without a tracking URI records
    uri = f"sqlite:///{store}"
    best = user / "best.yaml"
    args = ["sweep", "sweep.yaml", "--best-spec", str(best)]

    first = subprocess.Popen([sys.executable, "-m", "cli.app", *args], cwd=user, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.time() + 900
    try:
        while time.time() < deadline and first.poll() is None:
            trials = store.is_file() and _runs(uri, "sweep-it", f"tags.`{rec.TRIAL}` = '1'")
            if trials and _runs(uri, "sweep-it", f"tags.`{rec.TRIAL}` = '0' and attributes.status = 'FINISHED'"):
                break  # trial-000 is recorded and trial-001 has begun: cut the sweep there
            time.sleep(2)
        assert first.poll() is None, f"the sweep ended before it could be killed:\n{first.stdout.read()}"
        assert time.time() < deadline, "trial-001 never started"
        _kill_tree(first)
    finally:
        if first.poll() is None:
            first.kill()
    killed_trials = {r.info.run_id: r.info.status
                     for r in _runs(uri, "sweep-it", "tags.`streamssl.run_type` = 'trial'")}

    resumed = _cli(*args, "--resume", cwd=user)
    return {"uri": uri, "folder": user, "store": store, "spec": user / "sweep.yaml", "best": best, "resumed": resumed,
            "killed_trials": killed_trials}


def _trials(swept):
    runs = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'trial'")
    return sorted(runs, key=lambda r: int(r.data.tags[rec.TRIAL]))


def test_a_killed_sweep_resumes_and_logs_each_trial_once(swept):
    assert swept["resumed"].returncode == 0, swept["resumed"].stdout + swept["resumed"].stderr
    assert "RUNNING" in swept["killed_trials"].values()  # trial-001 was cut short
    trials = _trials(swept)
    assert [int(r.data.tags[rec.TRIAL]) for r in trials] == [0, 1, 2, 3]  # once each
    sweeps = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    # trial-000 was not run again: the same run as before the kill
    finished_before = [run for run, status in swept["killed_trials"].items() if status == "FINISHED"]
    assert trials[0].info.run_id in finished_before
    # the interrupted trial-001 run (and what was under it) was deleted, not left beside the new one
    deleted = _runs(swept["uri"], "sweep-it", f"tags.`{rec.TRIAL}` = '1' and tags.`streamssl.run_type` = 'trial'",
                    ViewType.DELETED_ONLY)
    assert len(deleted) == 1 and deleted[0].info.run_id not in {r.info.run_id for r in trials}
    assert "cut short by the previous driver" in swept["resumed"].stdout


def test_asha_stops_the_trials_that_fall_behind_and_a_diverging_trial_fails(swept):
    states = {float(r.data.params["optim.lr"]): (r.info.status, r.data.tags) for r in _trials(swept)}
    assert states[0.5][0] == "FINISHED"
    for lr in (1e-5, 2e-5):  # stopped after chunk 0, trial-001 against the refilled rungs
        status, tags = states[lr]
        assert status == "KILLED" and "asha stopped it after chunk 0" in tags[rec.STOPPED], (lr, status, tags)
    status, tags = states[1e6]
    assert status == "FAILED" and "stopped at chunk 0 (not retried)" in tags[rec.ERROR], (status, tags)
    sweep = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'sweep'")[0]
    assert sweep.data.metrics["trials_finished"] == 1 and sweep.data.metrics["trials_stopped"] == 2
    assert sweep.data.metrics["trials_failed"] == 1


def test_trials_nest_sweep_to_chunks_with_their_values_as_params(swept):
    client = mlflow.MlflowClient(swept["uri"])
    sweep = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'sweep'")[0]
    for trial in _trials(swept):
        index = int(trial.data.tags[rec.TRIAL])
        assert trial.info.run_name == f"trial-{index:03d}"
        assert trial.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        assert float(trial.data.params["optim.lr"]) == LRS[index]
        assert json.loads(trial.data.tags[rec.VALUES]) == {"optim.lr": LRS[index]}
        plans = _runs(swept["uri"], "sweep-it", f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        assert len(plans) == 1 and plans[0].data.tags["streamssl.run_type"] == "plan"
        assert float(plans[0].data.params["optim.lr"]) == LRS[index]  # the plan ran the trial's value
        chunks = sorted(_runs(swept["uri"], "sweep-it", f"tags.`mlflow.parentRunId` = '{plans[0].info.run_id}' and "
                                                        "tags.`streamssl.run_type` = 'chunk'"),
                        key=lambda c: int(c.data.tags["streamssl.chunk"]))
        assert all(c.info.run_name.startswith(f"trial-{index:03d}/") for c in chunks)
        if trial.info.status == "FINISHED":
            assert len(chunks) == 2 and all(c.info.status == "FINISHED" for c in chunks)
            history = client.get_metric_history(trial.info.run_id, "knn_top1")
            assert [int(m.step) for m in history] == [0, 1]
            assert history[-1].value == pytest.approx(chunks[-1].data.metrics["knn_top1"])
        if trial.info.status == "KILLED":  # nothing left open under a stopped trial
            assert plans[0].info.status == "KILLED"
            assert all(c.info.status != "RUNNING" for c in chunks)


def test_the_best_trial_is_tagged_and_its_spec_runs(swept):
    sweep = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'sweep'")[0]
    trials = {r.info.run_id: r for r in _trials(swept)}
    best = trials[sweep.data.tags[rec.BEST_TRIAL]]
    assert float(best.data.params["optim.lr"]) == 0.5 and best.data.tags[rec.BEST] == "true"
    assert sum(r.data.tags.get(rec.BEST) == "true" for r in trials.values()) == 1
    assert sweep.data.metrics["best_knn_top1"] == pytest.approx(best.data.metrics["knn_top1"])
    written = yaml.safe_load(swept["best"].read_text())
    assert written["optim"]["lr"] == 0.5 and "sweep" not in written
    assert sweep.data.tags[rec.BEST_SPEC] == str(swept["best"])
    artifacts = {a.path for a in mlflow.MlflowClient(swept["uri"]).list_artifacts(sweep.info.run_id)}
    plots = {a.path for a in mlflow.MlflowClient(swept["uri"]).list_artifacts(sweep.info.run_id, "plots")}
    assert {"best_spec.yaml", "sweep_spec.yaml"} <= artifacts
    assert {"plots/sweep_metric_by_trial.png", "plots/sweep_metric_by_value.png"} <= plots
    dry = _cli("run", str(swept["best"]), "--dry-run", "--tracking-uri", swept["uri"], timeout=300,
               cwd=swept["folder"])  # its data.url is relative to the user's folder, as they wrote it
    assert dry.returncode == 0, dry.stdout + dry.stderr


def test_status_and_lineage_walk_the_sweep(swept):
    status = _cli("status", "sweep.yaml", "--tracking-uri", swept["uri"], timeout=300, cwd=swept["folder"])
    assert status.returncode == 0, status.stdout + status.stderr
    for index, state in ((0, "finished"), (1, "stopped"), (2, "failed"), (3, "stopped")):
        assert any(f"trial-{index:03d}" in line and state in line for line in status.stdout.splitlines()), status.stdout
    assert "1 finished" in status.stdout and "of 4 trials" in status.stdout
    sweep = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'sweep'")[0]
    walked = _cli("lineage", sweep.info.run_id, "--tracking-uri", swept["uri"], "--json", timeout=300)
    assert walked.returncode == 0, walked.stderr
    chain = json.loads(walked.stdout)
    assert [t["state"] for t in chain["trials"]] == ["finished", "stopped", "failed", "stopped"]
    finished = chain["trials"][0]
    assert len(finished["plans"]) == 1 and len(finished["plans"][0]["chunks"]) == 2
    assert all(c["evals"] and c["model_id"] for c in finished["plans"][0]["chunks"])
    chunk_run = finished["plans"][0]["chunks"][0]["chunk"]
    up = json.loads(_cli("lineage", chunk_run, "--tracking-uri", swept["uri"], "--json", timeout=300).stdout)
    assert up["sweep"] == sweep.info.run_id and up["trial"] == finished["run"]
    tree = _cli("lineage", chunk_run, "--tracking-uri", swept["uri"], timeout=300)
    assert f"of sweep run {sweep.info.run_id}" in tree.stdout


def test_a_bad_space_stops_the_sweep_before_any_trial(tmp_path, synthetic_url):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_spec("sweep-bad", synthetic_url, storage={"workdir": str(tmp_path / "work")},
                    sweep={"space": {"optim.momentum": {"uniform": [0.5, 1.5]}, "optim.lr": {"loguniform": [0.01, 1]}}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = _cli("sweep", str(path), "--tracking-uri", uri, timeout=300)
    assert out.returncode != 0
    assert "sweep.space.optim.momentum" in out.stderr and "less than 1" in out.stderr
    assert not _runs(uri, "sweep-bad")  # nothing recorded


def test_an_optuna_sweep_numbers_its_trials_and_a_finished_sweep_resumes_to_nothing(tmp_path, synthetic_url):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Issue 23: what this proves is the search's (numbering, sampled values reaching trial and plan, the resume of a
    # finished sweep), not training's: each trial trains on one DDP worker, 4 steps of 256 rows (it was 2 workers,
    # 37 steps of 32). The module's sweep keeps 2 workers a trial.
    raw = tiny_spec("sweep-optuna", synthetic_url, storage={"workdir": str(tmp_path / "work")},
                    stream={"kind": "instance", "chunks": 1, "seed": 0}, resources={"workers": 1},
                    optim={"epochs_per_chunk": 1, "batch_size": 256},
                    eval={"every_chunk": ["knn"], "baseline": False},
                    sweep={"search": "optuna", "trials": 2, "seed": 3,
                           "space": {"optim.lr": {"loguniform": [0.05, 0.5]},
                                     "views.global.scale": {"choice": [[0.14, 1.0], [0.3, 1.0]]}}})
    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(raw))
    first = _cli("sweep", str(path), "--tracking-uri", uri)
    assert first.returncode == 0, first.stdout + first.stderr
    trials = sorted(_runs(uri, "sweep-optuna", "tags.`streamssl.run_type` = 'trial'"),
                    key=lambda r: int(r.data.tags[rec.TRIAL]))
    assert [r.info.run_name for r in trials] == ["trial-000", "trial-001"]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert 0.05 <= float(trial.data.params["optim.lr"]) <= 0.5
        assert json.loads(trial.data.params["views.global.scale"]) in ([0.14, 1.0], [0.3, 1.0])
        plan = _runs(uri, "sweep-optuna", f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")[0]
        assert plan.data.params["views.global.scale"] == trial.data.params["views.global.scale"]
    again = _cli("sweep", str(path), "--tracking-uri", uri, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "every one of the 2 trials is recorded" in again.stdout
    assert "Started a local Ray instance" in first.stderr and "Ray instance" not in again.stderr  # no Ray to start
    assert len(_runs(uri, "sweep-optuna", "tags.`streamssl.run_type` = 'trial'")) == 2
    assert len(_runs(uri, "sweep-optuna", "tags.`streamssl.run_type` = 'sweep'")) == 1


@pytest.fixture(scope="module")
def chromium() -> str:
    from tests.cli import browser

    return browser.chromium_executable()  # a skip without chromium, a failure where CI installed it


def _shown(value: str, logged: float) -> bool:
    """The page shows the logged value (MLflow rounds to about 4 significant digits)."""
    return abs(float(value) - logged) <= max(1e-3, 1e-3 * abs(logged))


def test_the_mlflow_ui_shows_the_trials_params_and_metric_in_a_browser(chromium, swept):
    """`streamssl ui` on the sweep's record: it serves MLflow on loopback only; in headless Chromium, the runs table
    with the sweep expanded to its trials (swept param and metric as columns), then MLflow's compare view of two
    trials (the finished one and a stopped one), differing params only. Screenshots: test-artifacts/ui/ (or
    $STREAMSSL_UI_ARTIFACTS). (Issue 23: the CLI's own loopback test, a second `streamssl ui` start, is this one.)"""
    from tests.cli import browser
    from tests.cli.ui_process import streamssl_ui

    client = mlflow.MlflowClient(swept["uri"])
    experiment_id = client.get_experiment_by_name("sweep-it").experiment_id
    sweep = _runs(swept["uri"], "sweep-it", "tags.`streamssl.run_type` = 'sweep'")[0]
    trials = _trials(swept)
    compared = [trials[0], trials[3]]  # lr 0.5 (finished, best) and lr 2e-5 (stopped)
    folder = browser.artifacts_folder()
    shots = [folder / "sweep-runs-table.png", folder / "sweep-compare-trials.png"]
    for old in shots:
        old.unlink(missing_ok=True)
    with streamssl_ui(swept["uri"], "sweep-it") as ui, browser.chromium_page() as page:
        ui.wait_for_line(f"{ui.base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        page_html = urllib.request.urlopen(f"{ui.base_url}/", timeout=5).read().decode()
        assert "MLflow" in page_html
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{ui.port}" in listening and f"0.0.0.0:{ui.port}" not in listening
        browser.open_runs_table(page, ui.base_url, experiment_id, expand=[sweep.info.run_name],
                                columns=["optim.lr", "knn_top1"])
        for trial in trials:
            name = trial.info.run_name
            assert float(browser.runs_table_cell(page, name, "optim.lr")) == float(trial.data.params["optim.lr"])
            if "knn_top1" in trial.data.metrics:
                assert _shown(browser.runs_table_cell(page, name, "knn_top1"), trial.data.metrics["knn_top1"]), name
        assert browser.screenshot(page, "sweep-runs-table", folder) == shots[0]

        browser.open_compare(page, ui.base_url, experiment_id, [t.info.run_id for t in compared],
                             diff_only=["Parameters"])
        shown_lrs = browser.compare_param(page, "optim.lr")
        assert [float(v) for v in shown_lrs] == [float(t.data.params["optim.lr"]) for t in compared]
        assert page.get_by_role("rowheader", name="optim.name", exact=True).count() == 0  # shared: hidden
        values = browser.compare_metric(page, "knn_top1")
        assert len(values) == 2 and all(_shown(v, t.data.metrics["knn_top1"]) for v, t in zip(values, compared))
        assert browser.screenshot(page, "sweep-compare-trials", folder) == shots[1]
    for shot in shots:
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000, (shot, len(data))


def test_a_sweep_run_from_the_users_folder_records_there_and_closes_stopped_chunks(swept):
    """Issue 21, items 1 and 3a: a relative `data.url`, the default `storage.workdir`, no tracking URI, run from a
    folder that is not the repo. Every run lands in the user's store, checkpoints under their folder; ASHA stops
    trial-003 after chunk 0, by when its chunk 1 is logged (the driver collects chunk 0's evaluation at chunk 1's end)
    and never evaluated: that chunk run must end KILLED with the reason (and so in every stopped trial)."""
    from orchestrator.tracking import tags as tr

    user = swept["folder"]
    assert swept["store"].is_file() and swept["best"].is_file()
    runs = _runs(swept["uri"], "sweep-it")
    kinds: dict[str, list] = {}
    for run in runs:
        kinds.setdefault(run.data.tags.get(tr.RUN_TYPE), []).append(run)
    assert len(kinds["sweep"]) == 1 and len(kinds["trial"]) == 4  # all in the user's store
    trials = {int(r.data.tags[rec.TRIAL]): r for r in kinds["trial"]}
    plans = {r.data.tags[tr.PARENT]: r for r in kinds["plan"]}
    assert {t.info.run_id for t in trials.values()} <= set(plans)  # each trial's plan, in the same store
    finished_plan = plans[trials[0].info.run_id].info.run_id
    chunks = [r for r in kinds["chunk"] if r.data.tags[tr.PARENT] == finished_plan]
    evals = [r for r in kinds["eval"] if r.data.tags[tr.PARENT] == finished_plan]
    assert len(chunks) == 2 and len(evals) == 2  # the lineage is not hollow: chunk -> checkpoint -> metrics
    assert all(r.info.status == "FINISHED" and r.data.tags[tr.CHECKPOINT].startswith(str(user)) for r in chunks)
    evaluated = {r.data.tags[tr.EVALUATES] for r in kinds.get("eval", [])}
    for index in (1, 3):  # lr 1e-5 and 2e-5 fall behind after chunk 0: stopped
        assert trials[index].info.status == "KILLED" and rec.STOPPED in trials[index].data.tags
        stopped_plan = plans[trials[index].info.run_id].info.run_id
        stopped_chunks = sorted((r for r in kinds["chunk"] if r.data.tags[tr.PARENT] == stopped_plan),
                                key=lambda r: int(r.data.tags[tr.CHUNK]))
        assert stopped_chunks, f"trial-{index:03d} logged no chunk"
        for run in stopped_chunks:  # no chunk of a stopped trial is left FINISHED without its evaluation
            if run.info.run_id not in evaluated:
                assert run.info.status == "KILLED", f"chunk {run.data.tags[tr.CHUNK]} left FINISHED unevaluated"
                assert "never evaluated" in run.data.tags[rec.ENDED_BY]
        if index == 3:  # untouched by the kill: chunk 1 came before the stop
            assert [r.info.status for r in stopped_chunks] == ["FINISHED", "KILLED"]
