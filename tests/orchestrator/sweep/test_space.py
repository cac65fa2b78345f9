"""The sweep section and its search space: checked before any trial, sampled reproducibly, decoded back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec.experiment import validate_spec
from orchestrator.sweep.space import check_space, decode, encode, sample_points, trial_spec
from orchestrator.train.hooks import DriverHooks
from tests.specs import tiny_spec


def _raw(space, **sweep):
    return tiny_spec("sweep-unit", "/tmp/nowhere", sweep={"space": space, **sweep})


def _check(space, **sweep):
    raw = _raw(space, **sweep)
    check_space(raw, validate_spec(raw).sweep, "sweep.yaml")


@pytest.mark.parametrize("space, words", [
    ({"optim.lrr": {"uniform": [0.1, 1.0]}}, ["sweep.space.optim.lrr", "unknown field"]),
    ({"optim.epochs_per_chunk": {"uniform": [1, 4]}}, ["sweep.space.optim.epochs_per_chunk", "valid integer"]),
    ({"optim.momentum": {"uniform": [0.5, 1.5]}}, ["sweep.space.optim.momentum", "1.5", "less than 1"]),
    ({"views.global.scale": {"choice": [[0.3, 1.0], [1.2, 1.0]]}}, ["sweep.space.views.global.scale", "[1.2, 1.0]"]),
    ({"optim.name": {"choice": ["sgd", "rmsprop"]}}, ["sweep.space.optim.name", "rmsprop"]),
    ({"online.max_lr": {"uniform": [0.1, 1.0]}}, ["sweep.space.online.max_lr", "online"]),
    ({"lines.method": {"choice": [["simclr"], ["nope"]]}}, ["sweep.space.lines.method", "nope"]),
])
def test_a_bad_space_entry_is_a_spec_error_naming_its_path(space, words):
    with pytest.raises(SpecError) as caught:
        _check(space, search="optuna")  # (the corners of Optuna's box: every range end and listed value)
    for word in words:
        assert word in str(caught.value)


def test_every_bad_entry_is_listed_at_once():
    with pytest.raises(SpecError) as caught:
        _check({"optim.lrr": {"uniform": [0.1, 1.0]}, "optim.momentum": {"uniform": [0.5, 2.0]},
                "optim.lr": {"loguniform": [0.01, 1.0]}}, search="optuna")
    message = str(caught.value)
    assert "sweep.space.optim.lrr" in message and "sweep.space.optim.momentum" in message
    assert "sweep.space.optim.lr:" not in message


@pytest.mark.parametrize("sweep, words", [
    ({"metric": "linear_top1"}, ["sweep.metric", "linear_top1", "knn_top1"]),
    ({"search": "random", "space": {"optim.lr": {"grid": [0.1, 0.2]}}}, ["grid", "choice"]),
    ({"search": "grid", "space": {"optim.lr": {"uniform": [0.1, 0.2]}}}, ["every space entry to be a grid"]),
    ({"space": {"optim.lr": {"uniform": [0.3, 0.2]}}}, ["low must be below high"]),
    ({"space": {"optim.lr": {"loguniform": [0.0, 0.2]}}}, ["loguniform", "> 0"]),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}}, ["exactly one"]),
    ({"space": {"sweep.trials": {"choice": [1, 2]}}}, ["cannot be swept"]),
])
def test_a_bad_sweep_section_is_a_spec_error(sweep, words):
    raw = tiny_spec("sweep-unit", "/tmp/nowhere", eval={"every_chunk": ["knn"]},
                    sweep={"space": {"optim.lr": {"loguniform": [0.01, 1.0]}}, **sweep})
    with pytest.raises(SpecError) as caught:
        check_space(raw, validate_spec(raw).sweep, "sweep.yaml")
    for word in words:
        assert word in str(caught.value)


def test_a_valid_space_passes_and_trials_are_fixed_by_the_seed():
    space = {"optim.lr": {"loguniform": [0.01, 1.0]}, "optim.epochs_per_chunk": {"randint": [1, 3]},
             "views.global.scale": {"choice": [[0.14, 1.0], [0.3, 1.0]]}, "optim.momentum": {"uniform": [0.8, 0.95]}}
    _check(space, trials=40)
    sweep = validate_spec(_raw(space, trials=40)).sweep
    points = sample_points(sweep)
    assert points == sample_points(sweep) and len(points) == 40
    assert points != sample_points(validate_spec(_raw(space, trials=40, seed=1)).sweep)
    assert all(0.01 <= p["optim.lr"] <= 1.0 and 0.8 <= p["optim.momentum"] <= 0.95 for p in points)
    assert {p["optim.epochs_per_chunk"] for p in points} == {1, 2, 3}  # randint's high is included
    assert {tuple(p["views.global.scale"]) for p in points} == {(0.14, 1.0), (0.3, 1.0)}
    spec = trial_spec(_raw(space), points[0], "sweep.yaml")
    assert spec.sweep is None and spec.optim.lr == points[0]["optim.lr"]
    assert spec.views.global_.scale == tuple(points[0]["views.global.scale"])


def test_a_grid_is_every_combination_the_first_path_slowest():
    sweep = validate_spec(_raw({"optim.lr": {"grid": [0.1, 0.2]}, "optim.epochs_per_chunk": {"grid": [1, 2, 3]}},
                               search="grid")).sweep
    points = sample_points(sweep)
    assert sweep.trial_count == 6 and len(points) == 6
    assert points[:3] == [{"optim.lr": 0.1, "optim.epochs_per_chunk": e} for e in (1, 2, 3)]
    capped = validate_spec(_raw({"optim.lr": {"grid": [0.1, 0.2, 0.3]}}, search="grid", trials=2)).sweep
    assert sample_points(capped) == [{"optim.lr": 0.1}, {"optim.lr": 0.2}]


def test_optuna_configs_decode_to_spec_values_and_back():
    sweep = validate_spec(_raw({"views.global.scale": {"choice": [[0.14, 1.0], [0.3, 1.0]]},
                                "optim.epochs_per_chunk": {"randint": [1, 3]}}, search="optuna")).sweep
    values = decode(sweep, {"views.global.scale": 1, "optim.epochs_per_chunk": 2.0})
    assert values == {"views.global.scale": [0.3, 1.0], "optim.epochs_per_chunk": 2}
    assert encode(sweep, values) == {"views.global.scale": 1, "optim.epochs_per_chunk": 2}


def test_refilled_asha_stops_a_new_trial_behind_the_recorded_ones():
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.sweep.asha import RefilledASHA

    recorded = [("trial-000", [(0, 0.60), (1, 0.70)]), ("trial-001", [(0, 0.50)])]
    asha = RefilledASHA(metric="knn_top1", mode="max", recorded=recorded, max_t=4, grace_period=1,
                        reduction_factor=2)
    bracket = asha._brackets[0]
    assert bracket.on_result(SimpleNamespace(trial_id="new-low"), 1, 0.40) == TrialScheduler.STOP
    assert bracket.on_result(SimpleNamespace(trial_id="new-high"), 1, 0.65) == TrialScheduler.CONTINUE
    fresh = RefilledASHA(metric="knn_top1", mode="max", recorded=[], max_t=4, grace_period=1, reduction_factor=2)
    assert fresh._brackets[0].on_result(SimpleNamespace(trial_id="first"), 1, 0.40) == TrialScheduler.CONTINUE
    minimising = RefilledASHA(metric="loss", mode="min", recorded=[("t", [(0, 1.0)])], max_t=4, grace_period=1,
                              reduction_factor=2)
    assert minimising._brackets[0].on_result(SimpleNamespace(trial_id="worse"), 1, -2.0) == TrialScheduler.STOP


def test_driver_hooks_report_each_chunk_once_in_order_averaged_over_lines():
    seen = []
    hooks = DriverHooks(on_score=lambda index, metrics, final: seen.append((index, metrics, final)))
    lines = ["a", "b"]
    hooks.scored("a", 0, {"knn_top1": 0.2}, lines, final=False)
    hooks.scored("a", 1, {"knn_top1": 0.4}, lines, final=True)
    assert seen == []  # line b has not reported chunk 0
    hooks.scored("b", 1, {"knn_top1": 0.6}, lines, final=True)
    assert seen == []
    hooks.scored("b", 0, {"knn_top1": 0.4}, lines, final=False)
    assert [(i, round(m["knn_top1"], 6), f) for i, m, f in seen] == [(0, 0.3, False), (1, 0.5, True)]


# ---------------------------------------------------------------- whole points (issue 21, item 2)
_VIEWS = {"global": {"count": 2, "size": 32}, "local": {"count": 2, "size": 8}}


def test_grid_values_invalid_together_are_refused_naming_both_fields_and_values():
    # Each value is valid against the base spec (global 32 px, local 8 px); (global 16, local 24) is not.
    space = {"views.global.size": {"grid": [16, 32]}, "views.local.size": {"grid": [8, 24]}}
    raw = tiny_spec("sweep-unit", "/tmp/nowhere", views=_VIEWS, sweep={"search": "grid", "space": space})
    with pytest.raises(SpecError) as caught:
        check_space(raw, validate_spec(raw).sweep, "sweep.yaml")
    message = str(caught.value)
    assert "1 of the 4 points" in message
    assert "sweep.space.views.global.size = 16, sweep.space.views.local.size = 24 together (trial 1)" in message
    assert "must not be larger than the global ones" in message


def test_random_points_invalid_together_are_refused_before_the_sweep():
    # min_iou 0.5 needs local and global scales close together; the seeded draws of random search are all checked.
    space = {"views.local.min_iou": {"choice": [0.05, 0.5]}, "views.global.scale": {"choice": [[0.9, 1.0], [0.1, 1.0]]},
             "views.local.scale": {"choice": [[0.05, 0.1], [0.8, 0.9]]}}
    raw = tiny_spec("sweep-unit", "/tmp/nowhere", views=_VIEWS, sweep={"search": "random", "trials": 16,
                                                                      "space": space})
    sweep = validate_spec(raw).sweep
    with pytest.raises(SpecError) as caught:
        check_space(raw, sweep, "sweep.yaml")
    assert "sweep.space.views.local.min_iou = 0.5" in str(caught.value)
    assert "cannot be reached" in str(caught.value)
    from orchestrator.sweep.space import checked_points

    assert checked_points(sweep) == sample_points(sweep)


def test_an_lr_cycle_grid_valid_only_jointly_is_accepted():
    # pct_start 0.1 of the base 10 steps is a one-step warm-up (refused); of 20 or 50 steps it is fine.
    raw = tiny_spec("sweep-unit", "/tmp/nowhere", stream={"kind": "online", "chunks": 2, "seed": 0},
                    online={"batch_size": 32, "steps_per_batch": 10},
                    sweep={"search": "grid", "space": {"online.pct_start": {"grid": [0.1, 0.3]},
                                                       "online.steps_per_batch": {"grid": [20, 50]}}})
    with pytest.raises(SpecError):  # (the base alone, with pct_start 0.1, is invalid: that is the point)
        validate_spec({**raw, "online": {**raw["online"], "pct_start": 0.1}, "sweep": None})
    raw["eval"] = {**raw["eval"], "every_chunk": ["knn"]}
    check_space(raw, validate_spec(raw).sweep, "sweep.yaml")  # no error
    from orchestrator.sweep.space import checked_points

    assert len(checked_points(validate_spec(raw).sweep)) == 4


def test_optuna_checks_the_corners_of_the_joint_box():
    space = {"views.global.size": {"randint": [16, 32]}, "views.local.size": {"choice": [8, 24]}}
    raw = tiny_spec("sweep-unit", "/tmp/nowhere", views=_VIEWS, sweep={"search": "optuna", "space": space})
    sweep = validate_spec(raw).sweep
    with pytest.raises(SpecError) as caught:
        check_space(raw, sweep, "sweep.yaml")
    assert "sweep.space.views.global.size = 16, sweep.space.views.local.size = 24 together (box point 1)" in str(
        caught.value)
    from orchestrator.sweep.space import checked_points

    corners = checked_points(sweep)[:-1]
    assert sorted((p["views.global.size"], p["views.local.size"]) for p in corners) == [(16, 8), (16, 24), (32, 8),
                                                                                          (32, 24)]


def test_resources_per_trial_gpu_is_refused_naming_the_field():
    raw = _raw({"optim.lr": {"loguniform": [0.01, 1.0]}}, resources_per_trial={"gpu": 1})
    with pytest.raises(SpecError) as caught:
        validate_spec(raw)
    assert "sweep.resources_per_trial.gpu" in str(caught.value)
    assert "resources.gpus_per_worker" in str(caught.value)
    assert validate_spec(_raw({"optim.lr": {"loguniform": [0.01, 1.0]}},
                              resources_per_trial={"gpu": 0, "cpu": 0.5})).sweep.resources_per_trial.gpu == 0


# ---------------------------------------------------------------- ASHA's max_t follows the space (item 3d)
def test_asha_max_t_is_the_most_reports_any_trial_of_the_space_makes(tmp_path, synthetic_url):
    from rich.console import Console

    from orchestrator.sweep.driver import _Sweep, max_planned_reports, planned_reports

    raw = tiny_spec("sweep-maxt", synthetic_url, storage={"workdir": str(tmp_path)},
                    eval={"every_chunk": ["knn"], "baseline": False},
                    sweep={"search": "grid", "scheduler": {"kind": "asha"},
                           "space": {"stream.chunks": {"grid": [2, 4]}, "optim.lr": {"grid": [0.1, 0.2]}}})
    sweep = _Sweep(raw, "sweep.yaml", Console(quiet=True), None)
    assert planned_reports(sweep.base) == 2  # the base spec's 2 chunks (what max_t was before)
    assert max_planned_reports(sweep.raw, sweep.sweep, "sweep.yaml") == 4
    assert sweep._scheduler([], max_planned_reports(sweep.raw, sweep.sweep, "sweep.yaml"))._max_t == 4
    optuna = tiny_spec("sweep-maxt", synthetic_url, stream={"kind": "instance", "chunks": 3, "seed": 0},
                       sweep={"search": "optuna", "space": {"stream.chunks": {"randint": [1, 5]}}})
    assert max_planned_reports(optuna, validate_spec(optuna).sweep, "sweep.yaml") == 5  # the box's upper corner


def test_asha_max_t_follows_a_swept_online_segment_size(synthetic_url):
    from orchestrator.sweep.driver import max_planned_reports, planned_reports

    raw = tiny_spec("sweep-maxt-online", synthetic_url, stream={"kind": "online", "chunks": 2, "seed": 0},
                    online={"batch_size": 32, "steps_per_batch": 4, "segment_batches": 8, "max_batches": 8},
                    eval={"every_chunk": ["knn"], "baseline": False},
                    sweep={"search": "grid", "space": {"online.segment_batches": {"grid": [2, 8]}}})
    base = validate_spec({**raw, "sweep": None})
    assert planned_reports(base) == 1
    assert max_planned_reports(raw, validate_spec(raw).sweep, "sweep.yaml") == 4  # 8 batches / 2 a segment


# ---------------------------------------------------------------- runs a trial left open (item 3a, 3b)
def _lineage(tracker, sweep_run: str, trial_state: str, trial_tags: dict) -> dict[str, str]:
    """A trial run, its plan run and chunk/eval runs as a trial actor leaves them (real MLflow on SQLite)."""
    from orchestrator.sweep import records as rec
    from orchestrator.tracking import tags as tr

    trial = tracker.create_run("trial-000", {tr.RUN_TYPE: "trial", tr.PARENT: sweep_run, rec.SWEEP_RUN: sweep_run,
                                             rec.TRIAL: "0", rec.VALUES: "{}", **trial_tags})
    plan = tracker.create_run("trial-000/plan", {tr.RUN_TYPE: "plan", tr.PARENT: trial})
    runs = {"trial": trial, "plan": plan}
    for chunk in (0, 1):
        runs[f"chunk{chunk}"] = tracker.create_run(f"chunk-{chunk}", {tr.RUN_TYPE: "chunk", tr.PARENT: plan,
                                                                      tr.CHUNK: str(chunk), tr.CHECKPOINT: "/ck"})
        tracker.end_run(runs[f"chunk{chunk}"], "FINISHED")
    runs["eval0"] = tracker.create_run("chunk-0/eval", {tr.RUN_TYPE: "eval", tr.PARENT: plan,
                                                        tr.EVALUATES: runs["chunk0"]})
    tracker.end_run(runs["eval0"], "FINISHED")
    tracker.set_tags(runs["chunk0"], {tr.TAG + "eval_run": runs["eval0"]})  # (what link_eval writes)
    # chunk 1 is FINISHED with its checkpoint and no evaluation; chunk 2 and its evaluation are still open
    runs["chunk2"] = tracker.create_run("chunk-2", {tr.RUN_TYPE: "chunk", tr.PARENT: plan, tr.CHUNK: "2"})
    if trial_state == "KILLED":
        tracker.set_tags(trial, {rec.STOPPED: "asha stopped it after chunk 0"})
        tracker.end_run(trial, "KILLED")
    return runs


def _sweep_for(tmp_path):
    from rich.console import Console

    from orchestrator.sweep.driver import _Sweep

    raw = tiny_spec("sweep-reconcile", "/tmp/nowhere", storage={"workdir": str(tmp_path)},
                    eval={"every_chunk": ["knn"], "baseline": False},
                    sweep={"space": {"optim.lr": {"choice": [0.1, 0.2]}}})
    sweep = _Sweep(raw, "sweep.yaml", Console(quiet=True), None)
    return sweep, sweep.tracker.create_run("sweep", {"streamssl.run_type": "sweep"})


def test_a_trial_whose_actor_died_leaves_no_run_running(tmp_path):
    from orchestrator.sweep import records as rec

    sweep, sweep_run = _sweep_for(tmp_path)
    runs = _lineage(sweep.tracker, sweep_run, "RUNNING", {})
    sweep._reconcile(rec.read_trials(sweep.tracker, sweep_run, "knn_top1"))
    status = {name: sweep.tracker.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"trial": "FAILED", "plan": "KILLED", "chunk0": "FINISHED", "eval0": "FINISHED",
                      "chunk1": "KILLED", "chunk2": "KILLED"}
    for name in ("plan", "chunk1", "chunk2"):
        assert "actor died" in sweep.tracker.get_run(runs[name]).data.tags[rec.ENDED_BY]
    assert "never evaluated" in sweep.tracker.get_run(runs["chunk1"]).data.tags[rec.ENDED_BY]


def test_a_stopped_trials_chunk_without_its_evaluation_ends_killed_with_the_reason(tmp_path):
    from orchestrator.sweep import records as rec

    sweep, sweep_run = _sweep_for(tmp_path)
    runs = _lineage(sweep.tracker, sweep_run, "RUNNING", {})
    rec.mark_stopped(sweep.tracker, runs["trial"], "asha stopped it after chunk 0")  # what the callback does
    status = {name: sweep.tracker.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"trial": "KILLED", "plan": "KILLED", "chunk0": "FINISHED", "eval0": "FINISHED",
                      "chunk1": "KILLED", "chunk2": "KILLED"}
    tags = sweep.tracker.get_run(runs["chunk1"]).data.tags
    assert tags[rec.STOPPED] == "asha stopped it after chunk 0" and "never evaluated" in tags[rec.ENDED_BY]
    # a chunk the actor logged after the stop was recorded is closed when Tune returns
    late = sweep.tracker.create_run("chunk-3", {"streamssl.run_type": "chunk", "mlflow.parentRunId": runs["plan"]})
    sweep.tracker.end_run(late, "FINISHED")
    sweep._reconcile(rec.read_trials(sweep.tracker, sweep_run, "knn_top1"))
    assert sweep.tracker.get_run(late).info.status == "KILLED"


# ---------------------------------------------------------------- paths against the user's directory (item 1)
def test_a_sweeps_paths_resolve_against_the_working_directory_and_status_finds_it(tmp_path, monkeypatch):
    from rich.console import Console

    from orchestrator.lineage import newest_sweep
    from orchestrator.sweep.driver import _Sweep

    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    raw = tiny_spec("sweep-paths", "data/synth", tracking={"uri": "sqlite:///store/mlflow.db"},
                    storage={"checkpoints": "ckpt"}, eval={"every_chunk": ["knn"], "baseline": False,
                                                           "downstream": [{"name": "other", "url": "data/other"}],
                                                           "transfer": [{"task": "fewshot", "data": {"url": "data/held"}}]},
                    sweep={"space": {"optim.lr": {"choice": [0.1, 0.2]}}})
    (user / "store").mkdir()
    sweep = _Sweep(raw, "sweep.yaml", Console(quiet=True), None)
    monkeypatch.chdir(tmp_path)  # where Tune runs a trial: anywhere but the user's directory
    spec = trial_spec(sweep.raw, {"optim.lr": 0.1}, "sweep.yaml")
    assert spec.data.url == str(user / "data" / "synth")
    assert spec.eval.downstream[0].url == str(user / "data" / "other")
    assert spec.eval.transfer[0].data.url == str(user / "data" / "held")
    assert spec.tracking_uri == f"sqlite:///{user / 'store' / 'mlflow.db'}"
    assert spec.workdir == user / "streamssl-runs" and spec.checkpoint_url == str(user / "ckpt")
    run_id, _ = sweep.open_run(resume=False)
    monkeypatch.chdir(user)  # `streamssl status SPEC` from the user's directory finds the sweep by its key
    assert newest_sweep(sweep.tracker, raw, "sweep.yaml").info.run_id == run_id
