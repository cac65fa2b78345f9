"""Where a test run's minutes went: totals per folder and the slowest tests, from the per-phase times the test
suite writes as it goes (`test-artifacts/durations.tsv`, see tests/conftest.py; a run cut short still has them).

    python -m bench.test_durations                               # the last run's test-artifacts/durations.tsv
    python -m bench.test_durations run.tsv --out bench/results/test_durations-2026-12-07.md --wall-s 3010

Writes a Markdown summary (and the same as JSON beside it) and prints it. Phases are pytest's setup, call and
teardown: a module fixture's cost (a shared run, a server) shows as the setup of the first test that takes it.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

DEFAULT_TSV = REPO_ROOT / "test-artifacts" / "durations.tsv"


def read_phases(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"phase_s", "phase", "outcome", "test"} <= set(rows[0]):
        raise ValueError(f"{path}: not a durations table (columns elapsed_s, phase_s, phase, outcome, test)")
    return [{"elapsed_s": float(r["elapsed_s"]), "s": float(r["phase_s"]), "phase": r["phase"],
             "outcome": r["outcome"], "test": r["test"]} for r in rows]


def folder_of(test: str) -> str:
    parts = test.split("::", 1)[0].split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def summarise(phases: list[dict[str, Any]], slowest: int = 40) -> dict[str, Any]:
    per_test: dict[str, float] = defaultdict(float)
    per_folder: dict[str, dict[str, float]] = defaultdict(lambda: {"setup": 0.0, "call": 0.0, "teardown": 0.0})
    outcomes: dict[str, str] = {}  # a test failed or was skipped if any of its phases was
    for p in phases:
        per_test[p["test"]] += p["s"]
        per_folder[folder_of(p["test"])][p["phase"]] += p["s"]
        if outcomes.get(p["test"], "passed") == "passed":
            outcomes[p["test"]] = p["outcome"]
    total = sum(per_test.values())
    folders = [{"folder": name, **{k: round(v, 1) for k, v in c.items()}, "total_s": round(sum(c.values()), 1),
                "tests": sum(1 for t in per_test if folder_of(t) == name)}
               for name, c in sorted(per_folder.items(), key=lambda kv: -sum(kv[1].values()))]
    ranked = sorted(per_test.items(), key=lambda kv: -kv[1])
    return {"tests": len(per_test), "test_s": round(total, 1), "last_elapsed_s": max(p["elapsed_s"] for p in phases),
            "outcomes": {o: sum(1 for v in outcomes.values() if v == o) for o in sorted(set(outcomes.values()))},
            "folders": folders, "slowest": [{"test": t, "s": round(s, 1)} for t, s in ranked[:slowest]],
            "under_2s": sum(1 for _, s in ranked if s < 2.0)}


def markdown(summary: dict[str, Any], title: str, wall_s: float | None) -> str:
    lines = [f"# {title}", ""]
    head = f"{summary['tests']} tests, {summary['test_s'] / 60:.1f} min in their phases"
    if wall_s:
        head += f"; `bash .ci/run` wall time {wall_s / 60:.1f} min (set-up included)"
    lines += [head + ".", f"Outcomes: {summary['outcomes']}. Tests under 2 s: {summary['under_2s']}.", "",
              "| folder | tests | setup s | call s | teardown s | total s | share |", "|---|---|---|---|---|---|---|"]
    for f in summary["folders"]:
        share = f["total_s"] / summary["test_s"] if summary["test_s"] else 0.0
        lines.append(f"| {f['folder']} | {f['tests']} | {f['setup']:.0f} | {f['call']:.0f} | {f['teardown']:.0f} | "
                     f"{f['total_s']:.0f} | {share:.1%} |")
    lines += ["", f"## The {len(summary['slowest'])} slowest tests (setup + call + teardown)", "", "| s | test |",
              "|---|---|"]
    lines += [f"| {row['s']:.1f} | {row['test']} |" for row in summary["slowest"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", nargs="?", type=Path, default=DEFAULT_TSV, help="durations.tsv [%(default)s]")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (and .json beside it)")
    parser.add_argument("--title", default="Test durations")
    parser.add_argument("--wall-s", type=float, default=None, help="the CI run's wall time, for the header")
    parser.add_argument("--slowest", type=int, default=40)
    args = parser.parse_args(argv)
    summary = summarise(read_phases(args.tsv), args.slowest)
    text = markdown(summary, args.title, args.wall_s)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({**summary, "wall_s": args.wall_s}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
