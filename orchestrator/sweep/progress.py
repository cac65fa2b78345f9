"""What the sweep driver shows and records while Tune runs: a progress bar of trials, a line per trial result, and
the end of every trial in MLflow (a trial ASHA stopped cannot record that itself: its actor is being killed)."""

from __future__ import annotations

import json
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.spec.sweep import SweepSpec
from orchestrator.sweep import records as rec


class SweepCallback(Callback):
    def __init__(self, tracker, console: Console, sweep: SweepSpec, total: int, recorded: int):
        self.tracker, self.console, self.sweep = tracker, console, sweep
        self.progress = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=console, transient=False)
        self.task = self.progress.add_task("", total=total, completed=recorded)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment folder for its own restore, which a sweep never uses
        # (MLflow is what --resume reads); the tracker and the live display do not pickle.
        return {"sweep": self.sweep}

    def __enter__(self) -> "SweepCallback":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    @staticmethod
    def _name(trial) -> str:
        index = (trial.last_result or {}).get(rec.RESULT_TRIAL)
        return rec.trial_name(int(index)) if index is not None else f"tune trial {trial.trial_id}"

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        metric = result.get(self.sweep.metric)
        self.progress.update(self.task, description=f"{self._name(trial)} chunk {result.get('chunk')}: "
                                                    f"{self.sweep.metric} {metric:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        run_id = last.get(rec.RESULT_RUN)
        if run_id and self.tracker.get_run(run_id).info.status == "RUNNING":
            # It returned without ending its run: the scheduler stopped it (see orchestrator.sweep.trial).
            reason = f"{self.sweep.scheduler.kind} stopped it after chunk {last.get('chunk')}"
            rec.mark_stopped(self.tracker, run_id, reason)
            self.console.print(f"{self._name(trial)}: [yellow]stopped[/] ({reason})")
        else:
            self.console.print(f"{self._name(trial)}: [green]finished[/], {self.sweep.metric} "
                               f"{last.get(self.sweep.metric, float('nan')):.4f}")
        self.progress.advance(self.task)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        error = str(trial.error_file and _read(trial.error_file) or "failed").strip().splitlines()
        self.console.print(f"{self._name(trial)}: [red]failed[/]: {error[-1] if error else ''}")
        self.progress.advance(self.task)
        # A trial whose actor died hard wrote no end: its trial, plan, chunk and eval runs are still RUNNING.
        reason = f"the trial's actor died: {error[-1] if error else 'no error file'}"[:500]
        try:
            for run in self.tracker.runs(f"tags.`{rec.TUNE_TRIAL}` = '{trial.trial_id}'"):
                if run.info.status == "RUNNING":
                    rec.mark_dead(self.tracker, run.info.run_id, reason)
                else:  # it recorded its own failure; close what its driver could not
                    for plan in self.tracker.children(run.info.run_id, "plan"):
                        rec.close_plan(self.tracker, plan.info.run_id, "KILLED", reason, unevaluated=False)
        except Exception as exc:  # the sweep driver reconciles again once Tune returns
            self.console.print(f"[yellow]could not close the runs of {self._name(trial)} yet[/]: {exc}")


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def print_trials(console: Console, trials: list[rec.TrialRecord], sweep: SweepSpec,
                 best: rec.TrialRecord | None) -> None:
    table = Table(title=f"sweep: {sweep.metric} ({sweep.mode}), {sweep.search} search, "
                        f"scheduler {sweep.scheduler.kind}")
    for column in ("trial", "state", "values", f"final {sweep.metric}", "chunks", "run"):
        table.add_column(column)
    for trial in trials:
        mark = " [bold green]best[/]" if best is not None and trial.index == best.index else ""
        final = "-" if trial.final is None else f"{trial.final:.4f}"
        state = trial.state + (f": {trial.error.splitlines()[-1][:60]}" if trial.error else "")
        table.add_row(rec.trial_name(trial.index) + mark, state, json.dumps(trial.values), final,
                      str(len(trial.history)), trial.run_id)
    console.print(table)


__all__ = ["SweepCallback", "print_trials"]
