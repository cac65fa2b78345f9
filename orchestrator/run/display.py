"""What the driver shows on the terminal while it runs: a progress bar per line, the plan (dry run), the results.

    with TrainingProgress(console) as progress:
        progress.add_line("simclr-sequential", offsets={0: 0, 1: 40}, total=80, completed=0)
        progress.step(event)                 # a worker's "step" event: steps done, loss, samples/s
        progress.chunk_done(event)           # a "chunk" event: the chunk's steps are all done
    print_summary(summary, console, spec)    # per-chunk table, continual metrics, baseline, ST-JT gap per line

It is rich output on the Console that `run_experiment` is given (the CLI's, or a test's); the driver owns it
because it renders while training runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evaluators.report import results_table
from orchestrator.evaluate.evaluation import headline
from orchestrator.plan.planner import ExperimentPlan
from orchestrator.run.summary import EVAL_COLUMNS, ExperimentSummary
from orchestrator.spec.experiment import Spec
from orchestrator.tracking.tracker import Tracker


class TrainingProgress:
    """One bar per line, counting its steps over all its chunks (a resumed line starts where it stopped)."""

    def __init__(self, console: Console):
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
                   TimeElapsedColumn()]
        self._progress = Progress(*columns, console=console, transient=False)
        self._tasks: dict[str, Any] = {}  # line id -> rich task
        self._offsets: dict[str, dict[int, int]] = {}  # line id -> chunk -> steps before it

    def __enter__(self) -> "TrainingProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def add_line(self, line_id: str, offsets: dict[int, int], total: int, completed: int) -> None:
        self._offsets[line_id] = offsets
        self._tasks[line_id] = self._progress.add_task(f"{line_id}", total=total, completed=completed,
                                                       loss="-", speed="-")

    def step(self, event: dict[str, Any]) -> None:
        task = self._tasks.get(event["line"])
        if task is not None:
            done = self._offsets[event["line"]].get(event["chunk"], 0) + event["step"]
            self._progress.update(task, completed=done, description=f"{event['line']} chunk {event['chunk']}",
                                  loss=f"{event['loss']:.3f}", speed=f"{event['samples_per_s']:.0f}")

    def chunk_done(self, event: dict[str, Any]) -> None:
        if event["line"] in self._tasks:
            self._progress.update(self._tasks[event["line"]],
                                  completed=self._offsets[event["line"]][event["chunk"]] + event["report"]["steps"],
                                  loss=f"{event['report']['final_loss']:.3f}")


def print_summary(summary: ExperimentSummary, console: Console, spec: Spec) -> None:
    columns = ["line", "chunk", "loss", *[c for c in EVAL_COLUMNS if c.split("_")[0] in spec.eval.every_chunk],
               "train_s", "samples/s"]
    console.print(results_table(summary.rows, columns, title=f"{spec.name}: after each chunk (held-out split)"))
    if summary.lines:
        rows = [{"line": line, "eval": name, **metrics} for line, per in summary.lines.items()
                for name, metrics in per.items()]
        columns = ["line", "eval", "avg_acc", "bwt", "fwt", "forgetting"]
        console.print(results_table(rows, columns, title="continual metrics after the last chunk"))
    if summary.baseline:
        console.print("random-init baseline: " + ", ".join(
            f"{k} {v:.3f}" for k, v in headline(summary.baseline, spec.eval.every_chunk).items()))
    for line, per in summary.gaps.items():  # line id -> protocol -> final gap (JT minus this line, top-1)
        console.print(f"ST-JT gap ({line}): " + ", ".join(
            f"{k} {v:+.3f}" if np.isfinite(v) else f"{k} unknown" for k, v in per.items()))
    for line in summary.notes:
        console.print(f"note: {line}")
    for line in summary.unknown:
        console.print(f"[yellow]unknown[/] {line}")
    for line in summary.missing:
        console.print(f"[red]incomplete[/] {line}")
    for line, message in summary.diverged.items():
        console.print(f"[red]failed[/] {line}: {message}")


def dry_run(plan: ExperimentPlan, console: Console, tracker: Tracker | None) -> list[dict[str, Any]]:
    finished = tracker.finished_chunk_runs(plan.key) if tracker else {}
    rows = []
    for job in plan.jobs:
        rows.append({"job": job.name, "key": job.key, "training_chunks": ",".join(map(str, job.training_chunks)),
                     "rows": sum(plan.stream.chunks[c].rows for c in job.training_chunks),
                     "state": "FINISHED" if job.key in finished else "PENDING"})
    console.print(results_table(rows, ["job", "key", "training_chunks", "rows", "state"],
                                title=f"plan {plan.key}: {plan.stream.kind} stream, {plan.stream.num_chunks} chunks"))
    return rows
