"""bench.planning_scale at a tiny scale: its index set is what planning expects, its numbers agree with each other
and with the files it writes. No timing is asserted (a shared machine's figures say nothing about correctness).
The bench itself: `python -m bench.planning_scale` (see its docstring)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench import planning_scale
from bench.index_fixture import write_index_dataset
from orchestrator.data.manifest import load_manifest
from orchestrator.data.shards import read_index


def test_the_index_set_has_imagenet_layout_and_no_images(tmp_path) -> None:
    manifest = write_index_dataset(str(tmp_path / "idx"), rows=5003, classes=100, groups=7, domains=3, shard_rows=1000)
    assert load_manifest(str(tmp_path / "idx")).digest == manifest.digest
    assert [s.rows for s in manifest.shard_entries("train")] == [1000] * 5 + [3]
    assert manifest.splits["val"].rows == 100 and manifest.num_classes == 100 and len(manifest.domains) == 3
    index = read_index(str(tmp_path / "idx"), "train")  # every shard checked against its sha256
    keys = index.column("key").to_pylist()
    labels, groups, domains = (index.column(c).to_numpy() for c in ("label", "group", "domain"))
    assert len(set(keys)) == 5003
    assert keys[0] == "train/n10000000/n10000000_0.JPEG" and keys[-1] == "train/n10000099/n10000099_49.JPEG"
    assert np.all(np.diff(labels) >= 0)  # class order, as data prepare writes ImageNet
    assert np.bincount(labels).min() == 50 and np.bincount(labels).max() == 51
    class_group = np.array([c.group for c in manifest.classes])
    assert np.array_equal(groups, class_group[labels]) and sorted(set(class_group)) == list(range(7))
    assert np.array_equal(domains, np.arange(5003) % 3)
    images = pq.read_table(tmp_path / "idx" / "train-00000.parquet", columns=["image"]).column("image").to_pylist()
    assert set(images) == {b""}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("planning")
    payload = planning_scale.main([
        "--rows", "18000", "--scales", "1", "2", "--kinds", "instance", "distant_class", "--ray-shards", "2",
        "--in-process", "--workdir", str(out / "work"), "--json", str(out / "planning_scale.json")])
    # A benchmark shuts down only a Ray it started: the session's Ray stays up for the tests after it (the next
    # ray_local test otherwise joined the dead session's address and hung).
    assert ray_local.is_initialized()
    return out, payload


def test_every_kind_and_scale_plans_the_full_protocol_consistently(small_run) -> None:
    out, payload = small_run
    doc = json.loads((out / "planning_scale.json").read_text())
    assert doc["benchmark"] == "planning_scale" and {"hardware", "settings", "fixtures", "results", "ratios"} <= set(doc)
    results = doc["results"]
    assert [(r["rows"], r["kind"]) for r in results] == [(18000, "instance"), (18000, "distant_class"),
                                                         (36000, "instance"), (36000, "distant_class")]
    for r in results:
        assert sum(r["chunks"]) == r["rows"] and len(r["chunks"]) == 4
        assert r["jobs"] == 40 and len(r["lines"]) == 10 and "moco_v2-sequential-replay-mas" in r["lines"]
        assert r["datasets_per_worker_group"] == 20  # 5 strategies x 4 chunks; the two methods share them
        assert r["same_digest_twice"]
        assert r["build_plan_s"] > 0 and r["make_plan_s"] > 0  # peak memory: the child test below
        reading = r["read_plan"]
        assert reading["read_tasks"] == r["rows"] // 2000  # one read task per shard of 2,000 rows
        assert reading["rows_selected"] == r["chunks"][0]
        assert reading["udf_one_shard_rows"] == reading["udf_one_shard_expected"]
        assert reading["executed_shards"] == 2 and reading["executed_rows"] == reading["executed_expected"] > 0
        assert reading["decode"] == "device" and "ReadChunkRows" in reading["logical_plan"]
        assert 0 < r["chunk0_rows_in_shards"]["with_rows"] == reading["shards_with_rows"] <= reading["read_tasks"]
    # Instance plans carry 12 bytes a row to every read task; class plans a lookup table of 1,000 classes.
    instance = [r for r in results if r["kind"] == "instance"]
    assert instance[1]["plan_pickle_bytes"] > 1.9 * instance[0]["plan_pickle_bytes"] > 1.9 * 12 * 18000
    distant = [r for r in results if r["kind"] == "distant_class"]
    assert distant[1]["plan_pickle_bytes"] == distant[0]["plan_pickle_bytes"] < 50_000
    assert "lookup table of 1000 entries" in distant[0]["read_plan"]["filter"]


def test_the_artifacts_it_measures_are_the_plan_it_made(small_run) -> None:
    out, payload = small_run
    for r in payload["results"]:
        folder = out / "work" / f"artifacts-{r['rows']}" / r["kind"]
        table = pq.read_table(folder / "stream_assignment.parquet")
        assert (folder / "stream_assignment.parquet").stat().st_size == r["assignment_parquet_bytes"]
        assert table.num_rows == r["rows"] and table.column_names == ["key", "chunk"]
        assert np.bincount(table.column("chunk").to_numpy()).tolist() == r["chunks"]
        plan_json = json.loads((folder / "stream_plan.json").read_text())
        assert (folder / "stream_plan.json").stat().st_size == r["stream_plan_json_bytes"]
        assert plan_json["digest"] == r["stream_digest"] and [c["rows"] for c in plan_json["chunks"]] == r["chunks"]


def test_the_ratio_rows_compare_each_scale_with_the_first(small_run) -> None:
    _, payload = small_run
    ratios = {row["kind"]: row for row in payload["ratios"]}
    assert set(ratios) == {"instance", "distant_class"}
    for kind, row in ratios.items():
        small, large = [r for r in payload["results"] if r["kind"] == kind]
        assert row["x rows"] == 2.0
        assert row["x time/row"] == pytest.approx(large["build_plan_s"] / small["build_plan_s"] / 2)
        assert row["assignment B/row"] == pytest.approx(large["assignment_parquet_bytes"] / large["rows"])
        assert row["x assignment/row"] == pytest.approx(
            (large["assignment_parquet_bytes"] / 36000) / (small["assignment_parquet_bytes"] / 18000))


def test_a_child_process_plans_what_this_process_plans(small_run, tmp_path) -> None:
    out, payload = small_run
    first = payload["results"][0]
    overrides = [f"data.url={payload['fixtures'][0]['url']}", "stream.kind=instance", f"storage.workdir={tmp_path}"]
    child = planning_scale.isolated(planning_scale.plan_one, str(planning_scale.DEFAULT_SPEC), overrides,
                                    str(tmp_path / "child"))
    assert child["stream_digest"] == first["stream_digest"] and child["chunks"] == first["chunks"]
    assert child["memory_method"] == first["memory_method"] and child["peak_rss_delta_bytes"] > 0
