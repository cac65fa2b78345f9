"""Issue 11's online study: linear and kNN accuracy of online SSL (per-batch LR cycle, replay memory, RALS) at 10
and 20 steps a stream batch, against constant-LR online training and offline training at the same number of steps;
RALS's cost per step; the deadline counts at a rate training cannot keep up with.

    streamssl data prepare ../shared/datasets/imagenette /work/study/imagenette-300 \\
        --groups examples/imagenette-groups.json --max-per-class 300
    python -m bench.online_study --data /work/study/imagenette-300 --workdir /work/study/online-study
    python -m bench.online_study --data ... --workdir ... --collect-only     # read an earlier record again

Every case is a real `streamssl run` of `examples/online_imagenette.yaml` (or its offline twin) with `--set`
overrides, the case's own MLflow experiment in one SQLite store under --workdir; both methods are two lines of one
plan, so a case is one Ray Train job. The figures are then read back from MLflow alone:
- accuracy: the line's evaluation run (online: the final segment's checkpoint; offline: the one chunk's);
- steps: the online run's `online_steps`, the offline chunk run's `steps`;
- RALS's cost per step: the sum of the online run's per-batch `rals_seconds` over its steps, beside `step_seconds`
  (views + train step) per step;
- the deadline case: the online run's `late_batches` and `dropped_steps` with `online.time_budget_s` set below
  what a batch's steps take.
The offline twin trains batches of 256 rows (the rows a step sees online: RALS's k, or stream 128 + memory 128)
for as many epochs as give the online run's steps, within one epoch's worth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/online_study.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, print_table, write_results

ONLINE_SPEC = REPO_ROOT / "examples" / "online_imagenette.yaml"
OFFLINE_SPEC = REPO_ROOT / "examples" / "online_imagenette_offline.yaml"
ROWS_PER_STEP = 256  # what one online step trains on: RALS's k, or stream 128 + memory 128 without it


def cases(args: argparse.Namespace, train_rows: int) -> list[dict[str, Any]]:
    """The study's runs, each a dict: its name, kind, settings, spec file and `--set` overrides. Online cases first;
    the offline epochs follow from the online steps."""
    methods = "[" + ", ".join(args.methods) + "]"
    out = []
    for steps in args.steps:
        for rals in (True, False):
            out.append({"case": f"online cycle {steps} steps{' RALS' if rals else ''}", "kind": "online",
                        "steps_per_batch": steps, "rals": rals, "schedule": "local_cycle", "spec": ONLINE_SPEC,
                        "sets": [f"lines.method={methods}", f"online.steps_per_batch={steps}",
                                 f"online.rals={str(rals).lower()}"]})
    out.append({"case": f"online constant {args.steps[0]} steps", "kind": "online", "steps_per_batch": args.steps[0],
                "rals": False, "schedule": "constant", "spec": ONLINE_SPEC,
                "sets": [f"lines.method={methods}", f"online.steps_per_batch={args.steps[0]}", "online.rals=false",
                         "online.schedule=constant"]})
    batches = train_rows // 128
    per_epoch = train_rows // ROWS_PER_STEP
    for steps in args.steps:
        epochs = max(1, round(batches * steps / per_epoch))
        out.append({"case": f"offline {epochs} epochs (= {steps} steps/batch)", "kind": "offline",
                    "steps_per_batch": steps, "rals": False, "schedule": "cosine", "spec": OFFLINE_SPEC,
                    "sets": [f"lines.method={methods}", f"optim.epochs_per_chunk={epochs}",
                             f"optim.batch_size={ROWS_PER_STEP}"]})
    for budget in args.deadline_budget:
        out.append({"case": f"deadline {budget:g}s/batch, {args.steps[0]} steps RALS", "kind": "online",
                    "steps_per_batch": args.steps[0], "rals": True, "schedule": "local_cycle", "spec": ONLINE_SPEC,
                    "deadline": budget,
                    "sets": [f"lines.method=[{args.methods[0]}]", f"online.steps_per_batch={args.steps[0]}",
                             "online.rals=true", f"online.time_budget_s={budget}", "online.late_policy=drop"]})
    for i, case in enumerate(out):
        case["experiment"] = f"online-study-{i:02d}"
    return out


def run_case(case: dict[str, Any], args: argparse.Namespace, tracking_uri: str, log: Path) -> float:
    cmd = [str(Path(sys.executable).parent / "streamssl"), "run", str(case["spec"]),
           "--set", f"data.url={args.data}", "--set", f"tracking.uri={tracking_uri}",
           "--set", f"tracking.experiment={case['experiment']}",
           "--set", f"storage.workdir={args.workdir / 'runs'}", *[a for s in case["sets"] for a in ("--set", s)]]
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n### {case['case']}\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=args.workdir)  # mlruns/ there
    if done.returncode != 0:
        raise SystemExit(f"{case['case']}: streamssl run exited {done.returncode}; see {log}")
    return time.perf_counter() - start


def collect(case: dict[str, Any], tracking_uri: str) -> list[dict[str, Any]]:
    """One row per line of the case's newest plan run, read from MLflow."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import tags as tr

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(case["experiment"])
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    plans = sorted((r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "plan"), key=lambda r: r.info.start_time)
    if not plans:
        return []
    plan = plans[-1]
    trained = {r.info.run_id: r for r in runs if r.data.tags.get(tr.RUN_TYPE) == "chunk"
               and r.data.tags.get(tr.PARENT) == plan.info.run_id}
    rows = []
    for run in runs:
        if run.data.tags.get(tr.RUN_TYPE) != "eval" or run.data.tags.get(tr.EVALUATES) not in trained:
            continue
        line_run = trained[run.data.tags[tr.EVALUATES]]
        metrics = line_run.data.metrics
        row = {"case": case["case"], "line": line_run.data.tags.get(tr.LINE),
               "linear_top1": run.data.metrics.get("linear_top1"), "knn_top1": run.data.metrics.get("knn_top1"),
               "plan_run": plan.info.run_id, "line_run": line_run.info.run_id,
               "wall_s": (plan.info.end_time - plan.info.start_time) / 1000 if plan.info.end_time else None}
        if case["kind"] == "online":
            steps = metrics.get("online_steps")
            history = {key: [m.value for m in client.get_metric_history(line_run.info.run_id, key)]
                       for key in ("rals_seconds", "step_seconds")}
            row.update(steps=steps, late_batches=metrics.get("late_batches"),
                       dropped_steps=metrics.get("dropped_steps"),
                       new_fraction_mean100=metrics.get("rals_new_fraction_mean100"),
                       rals_ms_per_step=1000 * sum(history["rals_seconds"]) / steps if steps else None,
                       step_ms=1000 * sum(history["step_seconds"]) / steps if steps else None)
        else:
            row.update(steps=metrics.get("steps"))
        rows.append(row)
    return sorted(rows, key=lambda r: r["line"] or "")


def train_rows(url: Path) -> int:
    return json.loads((url / "manifest.json").read_text())["splits"]["train"]["rows"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared imagenette shards (streamssl data prepare)")
    parser.add_argument("--workdir", type=Path, required=True, help="MLflow store, checkpoints and the run log")
    parser.add_argument("--methods", nargs="+", default=["simclr", "barlow_twins"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20], help="steps per stream batch [10 20]")
    parser.add_argument("--deadline-budget", nargs="+", type=float, default=[1.0, 5.0],
                        help="seconds per stream batch in the deadline cases, below what a batch's steps take; one "
                             "case each [1 5]")
    parser.add_argument("--only", nargs="*", type=int, default=None, help="run only these case numbers")
    parser.add_argument("--collect-only", action="store_true", help="read the record, run nothing")
    parser.add_argument("--out", type=Path, default=None, help="JSON path [bench/results/online_study-<host>.json]")
    args = parser.parse_args(argv)
    args.data, args.workdir = args.data.resolve(), args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{args.workdir / 'mlflow.db'}"
    rows_in_train = train_rows(args.data)
    plan = cases(args, rows_in_train)
    walls: dict[str, float] = {}
    if not args.collect_only:
        for i, case in enumerate(plan):
            if args.only is None or i in args.only:
                print(f"[{i}/{len(plan)}] {case['case']}", flush=True)
                walls[case["case"]] = run_case(case, args, tracking_uri, args.workdir / "runs.log")
    rows = [row for case in plan for row in collect(case, tracking_uri)]
    columns = ["case", "line", "steps", "linear_top1", "knn_top1", "step_ms", "rals_ms_per_step",
               "new_fraction_mean100", "late_batches", "dropped_steps", "wall_s"]
    print_table("Online SSL on imagenette: final accuracy (the line's evaluation run) and cost", columns, rows,
                caption=f"data {args.data} ({rows_in_train} training rows); MLflow {tracking_uri}")
    write_results("online_study", "cpu", {"settings": {"data": str(args.data), "methods": args.methods,
                                                       "steps": args.steps, "deadline_budget": args.deadline_budget,
                                                       "tracking_uri": tracking_uri,
                                                       "cases": [{k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in c.items()} for c in plan]},
                                          "rows": rows, "driver_seconds": walls}, path=args.out)


if __name__ == "__main__":
    main()
