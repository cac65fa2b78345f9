"""Transfer of one experiment's checkpoints, paired over seeds: pre-trained weights against a random init of the same
architecture, and SSL against SL.

    python -m bench.transfer_study --experiment transfer-imagenette                 # the embedded default store
    python -m bench.transfer_study --experiment transfer-imagenette --chunk 0 --tracking-uri sqlite:///x/mlflow.db

The numbers are the experiment's transfer evaluation runs as the report collects them (`streamssl eval`, a spec's
`eval.transfer`; orchestrator.report.collect), after chunk `--chunk` (default: each line's last). Every (set, score)
is compared per seed (the plan run's `seed`): each line's trained weights against the `init=random` baseline
evaluated with that seed (on any line's checkpoint: it reads only the architecture), and the SSL line against the
supervised one. A comparison's row gives both arms per seed, the mean paired difference with its 95% Student-t
interval over the seeds (the findings table's interval) and what the interval says: above 0, below 0, or spans 0
(inconclusive at this budget); n < 2 gives no interval. `_ci95` scores (a few-shot mean's own episode interval) are
not compared. Prints a table per comparison; writes JSON to bench/results/transfer_study-<host>.json.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from bench.common import print_table, write_results

RANDOM = "random init"


def _arms(transfers: list, chunk: int | None) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """(set, score) -> arm -> seed -> value: each line's trained weights after `chunk` (None: its last chunk
    evaluated), and the random-init baseline."""
    last: dict[tuple[str, str], int] = {}
    for t in transfers:
        if t.chunk is not None and t.status == "FINISHED":
            last[(t.plan_run, t.line)] = max(last.get((t.plan_run, t.line), -1), t.chunk)
    arms: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for t in transfers:
        if t.chunk is None or t.status != "FINISHED":
            continue
        random = t.params.get("init") == "random"
        if not random and t.chunk != (last[(t.plan_run, t.line)] if chunk is None else chunk):
            continue
        for score, value in t.scores.items():
            if not score.endswith("_ci95"):
                arms[(t.data_set, score)][RANDOM if random else t.line][t.plan_seed] = float(value)
    return arms


def _compare(name: str, a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    from orchestrator.report.findings import t_interval

    seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
    diffs = [a[s] - b[s] for s in seeds]
    row: dict[str, Any] = {"comparison": name, "n": len(seeds), "seeds": seeds, "a": [a[s] for s in seeds],
                           "b": [b[s] for s in seeds], "diffs": diffs}
    if diffs and all(d == 0 for d in diffs):  # e.g. top-5 of a set with at most 5 classes: 1.0 on both sides
        row.update(mean=0.0, lo=0.0, hi=0.0, says="equal at every seed")
    elif len(diffs) >= 2:
        mean, lo, hi = t_interval(diffs)
        says = "above 0" if lo > 0 else "below 0" if hi < 0 else "spans 0: inconclusive at this budget"
        row.update(mean=mean, lo=lo, hi=hi, says=says)
    else:
        row.update(mean=diffs[0] if diffs else None, lo=None, hi=None, says="n < 2: no interval")
    return row


def study(tracking_uri: str, experiment: str, chunk: int | None) -> list[dict[str, Any]]:
    from orchestrator.report.collect import collect
    from orchestrator.tracking.tracker import Tracker

    found = collect(Tracker(tracking_uri), experiment)
    rows = []
    for (data_set, score), arms in sorted(_arms(found.transfers, chunk).items()):
        lines = sorted(a for a in arms if a != RANDOM)
        pairs = [(f"{line} - {RANDOM}", line, RANDOM) for line in lines if RANDOM in arms]
        ssl = [line for line in lines if not line.startswith("supervised")]
        sl = [line for line in lines if line.startswith("supervised")]
        pairs += [(f"{a} - {b}", a, b) for a in ssl for b in sl]
        for name, a, b in pairs:
            rows.append({"set": data_set, "score": score, **_compare(name, arms[a], arms[b])})
    return rows


def _cell(row: dict[str, Any]) -> str:
    if row["mean"] is None:
        return "none"
    if row["lo"] is None:
        return f"{row['mean']:+.3f} (n=1)"
    return f"{row['mean']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="the MLflow experiment (the spec's name)")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///streamssl-runs/mlflow.db")
    parser.add_argument("--chunk", type=int, default=None, help="the chunk whose checkpoints are compared "
                                                                "[each line's last evaluated]")
    args = parser.parse_args(argv)
    from cli.options import resolve_tracking_uri

    rows = study(resolve_tracking_uri(args.tracking_uri), args.experiment, args.chunk)
    shown = [{"set.score": f"{r['set']}.{r['score']}", "comparison": r["comparison"], "n": r["n"],
              "per seed (a, b)": " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(r["a"], r["b"])),
              "mean a - b [95% CI]": _cell(r), "interval": r["says"]} for r in rows]
    print_table(f"transfer of {args.experiment}: paired over seeds", list(shown[0]) if shown else ["set.score"],
                shown, caption="95% Student-t interval of the per-seed differences")
    payload = {"experiment": args.experiment, "chunk": args.chunk, "rows": rows}
    write_results("transfer_study", "cpu", payload)
    return payload


if __name__ == "__main__":
    main()
