"""bench.test_durations: per-folder totals, the slowest tests and outcomes from a durations table."""

from __future__ import annotations

import json

import pytest

from bench import test_durations

ROWS = [  # elapsed_s, phase_s, phase, outcome, test
    (1.0, 0.5, "setup", "passed", "tests/faults/test_a.py::test_kill"),
    (41.0, 40.0, "call", "passed", "tests/faults/test_a.py::test_kill"),
    (41.1, 0.1, "teardown", "passed", "tests/faults/test_a.py::test_kill"),
    (42.0, 0.2, "setup", "passed", "tests/trainers/test_b.py::test_fast"),
    (43.0, 1.0, "call", "failed", "tests/trainers/test_b.py::test_fast"),
    (43.0, 0.0, "teardown", "passed", "tests/trainers/test_b.py::test_fast"),
    (43.1, 0.1, "setup", "skipped", "tests/test_c.py::test_skipped"),
]


def write(tmp_path, rows=ROWS):
    path = tmp_path / "durations.tsv"
    path.write_text("elapsed_s\tphase_s\tphase\toutcome\ttest\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_totals_per_folder_slowest_and_outcomes(tmp_path) -> None:
    out = tmp_path / "summary.md"
    summary = test_durations.main([str(write(tmp_path)), "--out", str(out), "--wall-s", "120", "--slowest", "2"])
    assert summary["tests"] == 3 and summary["test_s"] == 41.9 and summary["last_elapsed_s"] == 43.1
    assert summary["outcomes"] == {"failed": 1, "passed": 1, "skipped": 1}
    assert [f["folder"] for f in summary["folders"]] == ["tests/faults", "tests/trainers", "tests"]
    assert summary["folders"][0] == {"folder": "tests/faults", "setup": 0.5, "call": 40.0, "teardown": 0.1,
                                     "total_s": 40.6, "tests": 1}
    assert summary["slowest"] == [{"test": "tests/faults/test_a.py::test_kill", "s": 40.6},
                                  {"test": "tests/trainers/test_b.py::test_fast", "s": 1.2}]
    assert summary["under_2s"] == 2
    text = out.read_text()
    assert "3 tests, 0.7 min" in text and "wall time 2.0 min" in text
    assert "| 40.6 | tests/faults/test_a.py::test_kill |" in text
    assert json.loads(out.with_suffix(".json").read_text())["wall_s"] == 120.0


def test_a_file_that_is_not_a_durations_table_is_named(tmp_path) -> None:
    bad = tmp_path / "other.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="other.tsv: not a durations table"):
        test_durations.main([str(bad)])
