"""The sweep's plots, logged to its MLflow run: the metric of every trial (per chunk, and its final value), and the
final metric against each swept value."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from orchestrator.spec.sweep import SweepSpec
from orchestrator.sweep import records as rec

STATE_COLOURS = {"finished": "tab:blue", "stopped": "tab:orange", "failed": "tab:red", "interrupted": "tab:gray"}


def _figures(trials: list[rec.TrialRecord], sweep: SweepSpec, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for trial in trials:
        if trial.history:
            steps, values = zip(*trial.history)
            curves.plot(steps, values, marker="o", color=STATE_COLOURS[trial.state], alpha=0.8)
            curves.annotate(rec.trial_name(trial.index), (steps[-1], values[-1]), fontsize=7)
    curves.set(xlabel="chunk (or segment)", ylabel=sweep.metric, title="per trial, as reported to the scheduler")
    names = [rec.trial_name(t.index) for t in trials]
    finals = [t.final if t.final is not None else 0.0 for t in trials]
    bars.bar(names, finals, color=[STATE_COLOURS[t.state] for t in trials])
    bars.set(ylabel=f"final {sweep.metric}", title="final value (colour: finished / stopped / failed)")
    bars.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    paths.append(folder / "sweep_metric_by_trial.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    scored = [t for t in trials if t.final is not None]
    if scored:
        fig, axes = plt.subplots(1, len(sweep.space), figsize=(4 * len(sweep.space), 3.6), squeeze=False)
        for ax, (path, dist) in zip(axes[0], sweep.space.items()):
            xs = [t.values.get(path) for t in scored]
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            labels = xs if numeric else [json.dumps(x) for x in xs]
            ax.scatter(labels, [t.final for t in scored], c=[STATE_COLOURS[t.state] for t in scored])
            if dist.kind == "loguniform":
                ax.set_xscale("log")
            ax.set(xlabel=path, ylabel=f"final {sweep.metric}")
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        paths.append(folder / "sweep_metric_by_value.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def log_sweep_plots(tracker, sweep_run: str, trials: list[rec.TrialRecord], sweep: SweepSpec) -> list[str]:
    if not trials:
        return []
    with tempfile.TemporaryDirectory() as folder:
        paths = _figures(trials, sweep, Path(folder))
        for path in paths:
            tracker.log_file(sweep_run, path, "plots")
        return [p.name for p in paths]


__all__ = ["log_sweep_plots"]
