"""The sweep section and its search space: checked before any trial, sampled reproducibly, decoded back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.errors import SpecError
from orchestrator.hooks import DriverHooks
from orchestrator.spec import validate_spec
from orchestrator.sweep.space import check_space, decode, encode, sample_points, trial_spec
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
        _check(space)
    for word in words:
        assert word in str(caught.value)


def test_every_bad_entry_is_listed_at_once():
    with pytest.raises(SpecError) as caught:
        _check({"optim.lrr": {"uniform": [0.1, 1.0]}, "optim.momentum": {"uniform": [0.5, 2.0]},
                "optim.lr": {"loguniform": [0.01, 1.0]}})
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
