"""What the driver says about an incomplete record: which line lacks which runs (issue 8: never drop a line
silently), and the exit code that goes with it."""

from __future__ import annotations

from orchestrator.errors import IncompleteRecordError
from orchestrator.plan.planner import build_plan
from orchestrator.run.recovery import missing_records
from orchestrator.spec.experiment import validate_spec
from tests.specs import tiny_spec


def test_missing_chunk_and_evaluation_runs_are_named_per_line(synthetic_url: str, tmp_path) -> None:
    spec = validate_spec(tiny_spec("records", synthetic_url, stream={"chunks": 3},
                                   lines={"method": ["simclr"], "strategy": ["sequential", "joint"]},
                                   storage={"workdir": str(tmp_path)}))
    plan = build_plan(spec)
    jobs = {(j.line.id, j.chunk): j.key for j in plan.jobs}
    chunk_runs = {key: f"run-{i}" for i, key in enumerate(jobs.values())}
    results = {key: {} for key in jobs.values()}
    assert missing_records(plan, chunk_runs, results, ["knn"]) == []

    del results[jobs[("simclr-sequential", 1)]]  # evaluation died with the driver
    del chunk_runs[jobs[("simclr-joint", 2)]], results[jobs[("simclr-joint", 2)]]  # never logged
    missing = missing_records(plan, chunk_runs, results, ["knn"])
    assert len(missing) == 2
    assert missing[0].startswith("simclr-sequential: no evaluation of chunk(s) 1, so its accuracy matrix")
    assert missing[1].startswith("simclr-joint: no chunk run for chunk(s) 2, so")
    # Without per-chunk evaluation there is nothing to miss but chunk runs.
    assert missing_records(plan, chunk_runs, {}, []) == [missing[1]]
    assert IncompleteRecordError.exit_code == 7


def test_a_diverged_line_is_not_listed_as_missing(synthetic_url: str, tmp_path) -> None:
    # A diverged line is reported as failed, not as incomplete: `--resume` would diverge again.
    spec = validate_spec(tiny_spec("records", synthetic_url, stream={"chunks": 2},
                                   lines={"method": ["simclr"], "strategy": ["sequential", "sequential+mas"]},
                                   storage={"workdir": str(tmp_path)}))
    plan = build_plan(spec)
    first = [j for j in plan.jobs if j.chunk == 0]
    chunk_runs = {j.key: "run" for j in first}
    results = {j.key: {} for j in first}
    missing = missing_records(plan, chunk_runs, results, ["knn"])
    assert [m.split(":")[0] for m in missing] == ["simclr-sequential", "simclr-sequential-mas"]
    assert missing_records(plan, chunk_runs, results, ["knn"], skip_lines={"simclr-sequential-mas": "nan"}) \
        == missing[:1]
