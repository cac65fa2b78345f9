"""Stream plans: exact partitions, determinism, group-respecting distant-class chunks, errors naming stream.chunks.

    cd /work/main && .venv/bin/python -m pytest tests/orchestrator/plan/test_streams.py -q
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.data.shards import read_index
from orchestrator.data.synth import generate_synthetic
from orchestrator.errors import DataError, SpecError
from orchestrator.plan import streams

CASES = [("instance", 4), ("random_class", 5), ("distant_class", 4), ("domain", 3)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 groups x 2 classes x 4 domains, 480 train rows (tiny 8 px images: only the index matters here)."""
    url = str(tmp_path_factory.mktemp("streams") / "ds")
    manifest = generate_synthetic(url, train=480, val=96, image_size=8, groups=6, classes_per_group=2, domains=4,
                                  shard_rows=200, progress=False)
    return manifest, read_index(url, "train"), read_index(url, "val")


@pytest.mark.parametrize("kind,chunks", CASES)
def test_every_kind_partitions_the_index_exactly(data, kind, chunks):
    manifest, index, _ = data
    plan = streams.make_plan(index, manifest, kind, chunks, seed=0)
    assert plan.kind == kind and plan.num_chunks == chunks == len(plan.chunks)
    owner = plan.chunk_of(index)
    assert owner.min() == 0 and owner.max() == chunks - 1  # every row in exactly one chunk
    parts = [plan.select(index, [c]) for c in range(chunks)]
    keys = [set(p.column("key").to_pylist()) for p in parts]
    assert sum(len(k) for k in keys) == index.num_rows == len(set().union(*keys))  # disjoint, union = all
    assert [p.num_rows for p in parts] == [c.rows for c in plan.chunks]
    assert plan.select(index, range(chunks)).num_rows == index.num_rows
    batch = {name: index.column(name).to_numpy(zero_copy_only=False) for name in index.column_names}  # Ray's numpy batches
    assert np.array_equal(plan.chunk_of(batch), owner)
    assert list(plan.select(batch, [1])["key"]) == parts[1].column("key").to_pylist()
    joint = plan.select(index, [0, 1])
    assert joint.num_rows == plan.chunks[0].rows + plan.chunks[1].rows
    assignment = plan.assignment_table()
    assert assignment.column_names == ["key", "chunk"] and assignment.num_rows == index.num_rows
    by_key = dict(zip(index.column("key").to_pylist(), owner.tolist()))
    assert all(by_key[k] == c for k, c in zip(assignment.column("key").to_pylist(), assignment.column("chunk").to_pylist()))
    doc = json.loads(json.dumps(plan.to_dict()))
    assert doc["kind"] == kind and doc["digest"] == plan.digest and len(doc["chunks"]) == chunks
    assert [c["rows"] for c in doc["chunks"]] == [c.rows for c in plan.chunks]


def test_instance_chunks_are_near_equal_and_share_all_classes(data):
    manifest, index, val = data
    plan = streams.make_plan(index, manifest, "instance", 7, seed=3)
    assert sorted(c.rows for c in plan.chunks) == [68] * 3 + [69] * 4  # 480 = 3*68 + 4*69
    assert all(c.classes == tuple(range(12)) and c.domains == (0, 1, 2, 3) for c in plan.chunks)
    assert (plan.chunk_of(val) == -1).all()  # val rows are in no chunk of a train plan
    assert plan.task_mask(2, val.column("label").to_numpy(), val.column("domain").to_numpy()).all()


def test_class_and_domain_chunks_hold_their_units(data):
    manifest, index, val = data
    plan = streams.make_plan(index, manifest, "random_class", 5, seed=0)
    classes = [set(c.classes) for c in plan.chunks]
    assert sorted(len(c) for c in classes) == [2, 2, 2, 3, 3] and set().union(*classes) == set(range(12))
    labels = index.column("label").to_numpy()
    for c, spec in enumerate(plan.chunks):
        assert set(labels[plan.chunk_of(index) == c].tolist()) == set(spec.classes)
    vl, vd = val.column("label").to_numpy(), val.column("domain").to_numpy()
    assert np.array_equal(plan.task_mask(1, vl, vd), np.isin(vl, plan.chunks[1].classes))
    assert np.array_equal(plan.chunk_of(val), np.array([next(c.index for c in plan.chunks if l in c.classes) for l in vl]))

    plan = streams.make_plan(index, manifest, "domain", 2, seed=0)
    assert sorted(d for c in plan.chunks for d in c.domains) == [0, 1, 2, 3]
    assert all(c.classes == tuple(range(12)) for c in plan.chunks)
    domains = index.column("domain").to_numpy()
    assert all(set(domains[plan.chunk_of(index) == c.index].tolist()) == set(c.domains) for c in plan.chunks)
    assert np.array_equal(plan.task_mask(0, vl, vd), np.isin(vd, plan.chunks[0].domains))


@pytest.mark.parametrize("chunks", [2, 3, 4, 6])
def test_distant_class_never_splits_a_group(data, chunks):
    manifest, index, _ = data
    class_group = {c.id: c.group for c in manifest.classes}
    for seed in range(5):
        plan = streams.make_plan(index, manifest, "distant_class", chunks, seed=seed)
        groups = [{class_group[c] for c in spec.classes} for spec in plan.chunks]
        for a in range(chunks):  # a group lives in exactly one chunk, with all its classes
            assert all(class_group[c] in groups[a] for c in plan.chunks[a].classes)
            for b in range(a + 1, chunks):
                assert not groups[a] & groups[b]
        assert sorted(len(g) for g in groups) == sorted([6 // chunks + (i < 6 % chunks) for i in range(chunks)])
        rows_group = index.column("group").to_numpy()
        owner = plan.chunk_of(index)
        for g in range(6):
            assert len(set(owner[rows_group == g].tolist())) == 1


@pytest.mark.parametrize("kind,chunks", CASES)
def test_deterministic_and_seed_dependent(data, kind, chunks):
    manifest, index, _ = data
    plan = streams.make_plan(index, manifest, kind, chunks, seed=0)
    shuffled = index.take(pa.array(np.random.default_rng(1).permutation(index.num_rows)))
    again = streams.make_plan(shuffled, manifest, kind, chunks, seed=0)
    assert again.digest == plan.digest and again.to_dict() == plan.to_dict()
    assert np.array_equal(again.chunk_of(index), plan.chunk_of(index))
    other = streams.make_plan(index, manifest, kind, chunks, seed=1)
    assert other.digest != plan.digest
    if kind in ("instance", "random_class"):  # enough units that another seed must give another split
        assert not np.array_equal(other.chunk_of(index), plan.chunk_of(index))


def test_plan_pickles_small_and_behaves_the_same(data):
    manifest, index, val = data
    for kind, chunks in CASES:
        plan = streams.make_plan(index, manifest, kind, chunks, seed=0)
        blob = pickle.dumps(plan)
        assert len(blob) < 2000 + 16 * index.num_rows
        copy = pickle.loads(blob)
        assert copy.digest == plan.digest and copy.chunks == plan.chunks
        assert np.array_equal(copy.chunk_of(index), plan.chunk_of(index))
        assert np.array_equal(copy.chunk_of(val), plan.chunk_of(val))
        with pytest.raises(ValueError, match="pass the index"):
            copy.assignment_table()
        assert copy.assignment_table(index).equals(plan.assignment_table())


def test_errors_name_stream_chunks(data):
    manifest, index, _ = data
    for kind, too_many, unit in (("random_class", 13, "12 classes"), ("distant_class", 7, "6 groups"),
                                 ("domain", 5, "4 domains"), ("instance", 481, "480 rows")):
        with pytest.raises(SpecError, match=rf"stream\.chunks is {too_many}.*{unit}") as err:
            streams.make_plan(index, manifest, kind, too_many, seed=0)
        if kind == "distant_class":
            assert "--groups" in str(err.value)
    with pytest.raises(SpecError, match=r"stream\.chunks must be an integer >= 1, got 0"):
        streams.make_plan(index, manifest, "instance", 0, seed=0)
    with pytest.raises(SpecError, match=r"stream\.kind: unknown stream kind 'online_class'; known: instance, random_class"):
        streams.make_plan(index, manifest, "online_class", 2, seed=0)
    no_groups = manifest.model_copy(update={"groups": (), "classes": tuple(c.model_copy(update={"group": -1}) for c in manifest.classes)})
    with pytest.raises(DataError, match="no coarse groups.*--groups FILE"):
        streams.make_plan(index, no_groups, "distant_class", 2, seed=0)
    # Chunks whose classes have no training rows are refused rather than trained on nothing.
    only_two = index.filter(pa.compute.less(index.column("label"), 2))
    with pytest.raises(DataError, match=r"hold no rows of the index"):
        streams.make_plan(only_two, manifest, "random_class", 6, seed=0)
