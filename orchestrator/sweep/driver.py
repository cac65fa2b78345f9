"""The driver of `streamssl sweep`: the spec's `sweep:` section -> Ray Tune trials -> MLflow runs -> the best spec.

    result = run_sweep(raw_spec, "examples/sweep_views.yaml")          # raises on a bad space, before any trial
    result.best.values, result.best_spec_path

Each trial is `orchestrator.sweep.trial.run_trial` in a Tune actor: the same driver as `streamssl run` (with its
own TorchTrainer, since Train V2 deprecates `Tuner(trainer)`), reporting the evaluation's headline metric after
every chunk, which ASHA judges. MLflow, not Tune's experiment folder, is the sweep's record, and the only one
`--resume` reads: finished, stopped and failed trials are not run again, a trial an interrupted driver left
RUNNING is deleted and run again, and each resume is a new Tuner of its own name (a Tuner of an old name would
overwrite its state, and Tune's restore would rebuild ASHA's rungs from its own files only). Random and grid
trials are fixed up front by the seed, so a resume runs exactly the missing indices; Optuna gets the recorded
trials as evaluated points; ASHA's rungs are refilled from the recorded per-chunk metrics.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from orchestrator import storage
from orchestrator.data.materialise import materialise
from orchestrator.errors import SpecError, TrainingError
from orchestrator.plan.planner import build_plan
from orchestrator.run.base import artifact_root
from orchestrator.spec.experiment import Spec, flatten, redact, validate_spec
from orchestrator.spec.sweep import SweepSpec
from orchestrator.sweep import records as rec
from orchestrator.sweep.paths import resolve_paths
from orchestrator.sweep.plots import log_sweep_plots
from orchestrator.sweep.records import sweep_key
from orchestrator.sweep.space import check_space, checked_points, encode, optuna_space, sample_points, with_values
from orchestrator.sweep.trial import TrialContext, TrialCounter, run_trial
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from orchestrator.train.online_runner import total_batches
from orchestrator.train.ray_init import init_ray


@dataclass
class SweepResult:
    sweep_run: str
    trials: list[rec.TrialRecord] = field(default_factory=list)
    best: rec.TrialRecord | None = None
    best_spec_path: Path | None = None
    skipped: int = 0  # trials a resume found recorded
    rerun: int = 0  # interrupted trials deleted and run again


def max_planned_reports(raw: dict[str, Any], sweep: SweepSpec, source: str) -> int:
    """ASHA's max_t: the most reports any trial of the space makes. Sampling `stream.chunks`, the online segment
    size or the stream's length (anything under stream, online or data) changes a trial's count, so each distinct
    such point the sweep can run (grid / random: the trials; Optuna: the corners of the box) is planned."""
    shaping = [path for path in sweep.space if path.split(".")[0] in ("stream", "online", "data")]
    counts: dict[str, int] = {}
    for point in checked_points(sweep) if shaping else [{}]:
        values = {path: point[path] for path in shaping}
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in counts:
            counts[key] = planned_reports(validate_spec(with_values(raw, values), source))
    return max(counts.values())


def planned_reports(base: Spec) -> int:
    """How many times a trial reports (ASHA's max_t): once per chunk, or once per online segment."""
    materialise(base, progress=False)  # the synthetic set made once, before trials race to
    plan = build_plan(base)
    if base.stream.kind == "online":
        return max(1, math.ceil(total_batches(plan) / base.online.segment_batches))
    return plan.stream.num_chunks


class _Sweep:
    def __init__(self, raw: dict[str, Any], source: str, console: Console, best_spec_path: str | Path | None):
        # Every local path and the tracking store against the user's directory, here, before any trial: Tune runs
        # each trial in a working directory of its own (orchestrator.sweep.paths). The spec as written is kept for
        # what the user reads back (the logged sweep spec, the best spec).
        self.written, self.base_dir = raw, os.getcwd()
        raw = resolve_paths(raw, self.base_dir)
        spec = validate_spec(raw, source)
        if spec.sweep is None:
            raise SpecError(f"{source}: no sweep section: add `sweep: {{metric: knn_top1, trials: 4, space: "
                            "{optim.lr: {loguniform: [0.01, 1.0]}}}}` (README, Sweeps)")
        self.sweep: SweepSpec = spec.sweep
        check_space(raw, self.sweep, source)  # every problem of the space, before anything runs
        self.raw, self.source, self.console = raw, source, console
        self.base = validate_spec(with_values(raw, {}), source)
        self.key = sweep_key(self.base, self.sweep)
        self.best_spec_path = Path(best_spec_path) if best_spec_path else (
            self.base.workdir / "sweeps" / f"{self.base.name}-{self.key}" / "best_spec.yaml")
        self.artifact_root = artifact_root(self.base)
        self.tracker = Tracker(self.base.tracking_uri, self.base.experiment_name, self.artifact_root)

    # ---------------------------------------------------------------- the sweep run
    def open_run(self, resume: bool) -> tuple[str, list[rec.TrialRecord]]:
        previous = self.tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'sweep' and tags.`{rec.SWEEP_KEY}` = '{self.key}'")
        previous.sort(key=lambda r: r.info.start_time or 0, reverse=True)
        if resume and previous:
            run_id = previous[0].info.run_id
            self.tracker.update_run(run_id, status="RUNNING")
            self.console.print(f"resuming sweep run [bold]{run_id}[/]")
            return run_id, rec.read_trials(self.tracker, run_id, self.sweep.metric)
        tags = {tr.RUN_TYPE: "sweep", rec.SWEEP_KEY: self.key, tr.TAG + "spec_name": self.base.name,
                tr.TAG + "sweep.search": self.sweep.search, tr.TAG + "sweep.scheduler": self.sweep.scheduler.kind,
                tr.TAG + "sweep.metric": self.sweep.metric, tr.TAG + "sweep.mode": self.sweep.mode}
        run_id = self.tracker.create_run(f"{self.base.name}/sweep", tags)
        params = flatten(self.base)
        params.update({f"sweep.{k}": str(v) for k, v in self.sweep.model_dump(exclude={"space"}).items()})
        params.update({f"sweep.space.{path}": json.dumps(dist.model_dump(exclude_none=True))
                       for path, dist in self.sweep.space.items()})
        self.tracker.log_params(run_id, params)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "sweep_spec.yaml"
            path.write_text(yaml.safe_dump(redact(self.written), sort_keys=False))
            self.tracker.log_file(run_id, path)
        return run_id, []

    # ---------------------------------------------------------------- the trials
    def run(self, resume: bool, address: str | None) -> SweepResult:
        max_reports = max_planned_reports(self.raw, self.sweep, self.source)
        sweep_run, recorded = self.open_run(resume)
        result = SweepResult(sweep_run)
        for record in recorded:
            if record.state == "interrupted":
                removed = rec.delete_trial(self.tracker, record.run_id)
                self.console.print(f"{rec.trial_name(record.index)} was cut short by the previous driver: "
                                   f"removed its {removed} run(s), running it again")
                result.rerun += 1
        done = [r for r in recorded if r.state != "interrupted"]
        result.skipped = len(done)
        try:
            if self.sweep.trial_count > len(done):  # the resume of a finished sweep only reads MLflow: no Ray to start
                init_ray(address, self.base, dashboard=True)
            self._tune(sweep_run, done, max_reports)
            result.trials = rec.read_trials(self.tracker, sweep_run, self.sweep.metric)
            self._reconcile(result.trials)
            result.trials = rec.read_trials(self.tracker, sweep_run, self.sweep.metric)
            self._finish(result)
        except BaseException:
            try:
                self.tracker.end_run(sweep_run, "FAILED", retry_seconds=5)
            except Exception:
                pass  # the next --resume reopens it
            raise
        return result

    def _tune(self, sweep_run: str, done: list[rec.TrialRecord], max_reports: int) -> None:
        import ray
        from ray import tune

        from orchestrator.sweep.progress import SweepCallback  # Ray Tune, loaded when a sweep runs
        sweep, total = self.sweep, self.sweep.trial_count
        todo = total - len(done)
        if todo <= 0:
            self.console.print(f"every one of the {total} trials is recorded; nothing to run")
            return
        points = counter = search_alg = None
        if sweep.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            scored = [r for r in done if r.final is not None]
            search_alg = OptunaSearch(
                space=optuna_space(sweep), metric=sweep.metric, mode=sweep.mode, seed=sweep.seed,
                points_to_evaluate=[encode(sweep, r.values) for r in scored] or None,
                evaluated_rewards=[r.final for r in scored] or None)
            counter = ray.remote(num_cpus=0)(TrialCounter).remote(max((r.index for r in done), default=-1) + 1)
            param_space: dict[str, Any] = {}
            num_samples = todo
        else:
            points = sample_points(sweep)
            missing = sorted(set(range(len(points))) - {r.index for r in done})
            param_space, num_samples = {"trial": tune.grid_search(missing)}, 1
        context = TrialContext(self.raw, self.source, sweep, sweep_run, self.base.tracking_uri,
                               self.base.experiment_name, self.artifact_root, points, counter, self.base_dir)
        # The trial's placement group holds its driver and the driver's evaluation actor (1 CPU, as in
        # `streamssl run`); the training workers get a placement group of their own from Ray Train.
        own = sweep.resources_per_trial
        # (No GPU in these bundles: the spec refuses resources_per_trial.gpu, see orchestrator.spec.sweep.)
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), tune.PlacementGroupFactory(
            [{"CPU": own.cpu}, {"CPU": 1.0}]))
        scheduler = self._scheduler(done, max_reports)
        fs, path = storage.pyarrow_filesystem(f"{self.base.checkpoint_url.rstrip('/')}/tune",
                                              self.base.storage.storage_options)
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record, not CSV files
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # (with verbose=0: Tune prints nothing; ours does)
        callback = SweepCallback(self.tracker, self.console, sweep, total, len(done))
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            # (metric and mode go to the searcher and the scheduler themselves: Tune refuses them twice)
            tune_config=tune.TuneConfig(num_samples=num_samples,
                                        search_alg=search_alg, scheduler=scheduler, reuse_actors=False,
                                        max_concurrent_trials=sweep.concurrency),
            run_config=tune.RunConfig(name=f"sweep-{self.key}-{int(time.time())}", storage_path=path,
                                      storage_filesystem=fs, callbacks=[callback], verbose=0),
        )
        import logging

        # (Tune's result analysis looks for the result files the disabled loggers would have written)
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        with callback:
            tuner.fit()

    def _scheduler(self, done: list[rec.TrialRecord], max_reports: int):
        config = self.sweep.scheduler
        if config.kind == "none":
            return None
        from orchestrator.sweep.asha import RefilledASHA  # Ray Tune, loaded when a sweep runs

        return RefilledASHA(metric=self.sweep.metric, mode=self.sweep.mode,
                            recorded=[(rec.trial_name(r.index), r.history) for r in done],
                            max_t=max(max_reports, config.grace_period), grace_period=config.grace_period,
                            reduction_factor=config.reduction_factor)

    def _reconcile(self, trials: list[rec.TrialRecord]) -> None:
        """After Tune returned (every trial actor is gone): a trial still RUNNING never said how it ended (its actor
        died hard): FAILED, and its plan, chunk and evaluation runs KILLED with the reason. A stopped trial's plan
        is closed again, for a chunk its actor logged after the stop was recorded (KILLED: never evaluated)."""
        for record in trials:
            if record.state == "interrupted":
                rec.mark_dead(self.tracker, record.run_id, "the trial's actor died before it recorded an end")
            elif record.state == "stopped":
                reason = self.tracker.get_run(record.run_id).data.tags.get(rec.STOPPED, "stopped by the scheduler")
                rec.mark_stopped(self.tracker, record.run_id, reason)
            elif record.state == "failed":
                for plan in self.tracker.children(record.run_id, "plan"):
                    rec.close_plan(self.tracker, plan.info.run_id, "KILLED", f"trial failed: {record.error or '?'}"[:500],
                                   unevaluated=False)

    # ---------------------------------------------------------------- the outcome
    def _finish(self, result: SweepResult) -> None:
        from orchestrator.sweep.progress import print_trials  # Ray Tune, loaded when a sweep runs

        trials = result.trials
        sign = 1 if self.sweep.mode == "max" else -1
        finished = [t for t in trials if t.state == "finished" and t.final is not None]
        candidates = finished or [t for t in trials if t.final is not None]
        result.best = max(candidates, key=lambda t: sign * t.final) if candidates else None
        counts = {state: sum(t.state == state for t in trials) for state in ("finished", "stopped", "failed")}
        self.tracker.log_metrics(result.sweep_run, {f"trials_{k}": v for k, v in counts.items()})
        log_sweep_plots(self.tracker, result.sweep_run, trials, self.sweep)
        print_trials(self.console, trials, self.sweep, result.best)
        if result.best is None:
            first = next((t for t in trials if t.error), None)
            self.tracker.set_tags(result.sweep_run, {rec.ERROR: (first.error if first else "no trial reported")[:5000]})
            self.tracker.end_run(result.sweep_run, "FAILED")
            reason = f"{rec.trial_name(first.index)}: {first.error}" if first else "no trial reported a metric"
            raise TrainingError(f"every trial of sweep run {result.sweep_run} failed; the first: {reason}")
        best = result.best
        for trial in trials:
            self.tracker.set_tags(trial.run_id, {rec.BEST: "true" if trial is best else "false"})
        text = yaml.safe_dump(with_values(self.written, best.values), sort_keys=False)
        result.best_spec_path = self.best_spec_path
        self.best_spec_path.parent.mkdir(parents=True, exist_ok=True)
        self.best_spec_path.write_text(f"# The best trial ({rec.trial_name(best.index)}, {self.sweep.metric} "
                                       f"{best.final:.4f}) of sweep run {result.sweep_run}: `streamssl run` it.\n"
                                       + text)
        with tempfile.TemporaryDirectory() as folder:
            logged = Path(folder) / "best_spec.yaml"
            logged.write_text(yaml.safe_dump(redact(with_values(self.written, best.values)), sort_keys=False))
            self.tracker.log_file(result.sweep_run, logged)
        self.tracker.set_tags(result.sweep_run, {rec.BEST_TRIAL: best.run_id, rec.BEST_SPEC: str(self.best_spec_path),
                                                 tr.TAG + "best_values": json.dumps(best.values)[:5000]})
        self.tracker.log_metrics(result.sweep_run, {f"best_{self.sweep.metric}": best.final})
        self.tracker.end_run(result.sweep_run, "FINISHED")


def run_sweep(raw: dict[str, Any], source: str, resume: bool = False, address: str | None = None,
              console: Console | None = None, best_spec_path: str | Path | None = None) -> SweepResult:
    console = console or Console()
    sweep = _Sweep(raw, source, console, best_spec_path)
    started = time.time()
    result = sweep.run(resume, address)
    console.print(f"done in {time.time() - started:.0f} s — sweep run {result.sweep_run}; best spec written to "
                  f"{result.best_spec_path}; `streamssl lineage {result.sweep_run}` walks it")
    return result


__all__ = ["SweepResult", "max_planned_reports", "planned_reports", "run_sweep"]
