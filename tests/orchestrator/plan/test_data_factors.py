"""Data factors: class-subsampled training (same planned steps, evaluation keeps every class) and coarse labels."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from orchestrator.data.shards import read_index
from orchestrator.data.synth import generate_synthetic
from orchestrator.errors import SpecError
from orchestrator.plan import streams
from orchestrator.plan.data_factors import group_label_map, kept_classes
from orchestrator.plan.planner import build_plan
from orchestrator.spec.experiment import validate_spec
from orchestrator.spec.params import flatten, identity_digest
from orchestrator.train.runner import planned_line_steps
from tests.specs import tiny_spec

CASES = [("instance", 4), ("random_class", 4), ("distant_class", 3), ("domain", 2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 groups x 2 classes x 2 domains, 480 train rows."""
    url = str(tmp_path_factory.mktemp("factors") / "ds")
    manifest = generate_synthetic(url, train=480, val=96, image_size=8, groups=6, classes_per_group=2, domains=2,
                                  shard_rows=200, progress=False)
    return url, manifest, read_index(url, "train"), read_index(url, "val")


@pytest.mark.parametrize("kind,chunks", CASES)
def test_a_class_fraction_keeps_that_share_of_each_chunks_classes_for_training_only(data, kind, chunks) -> None:
    _, manifest, index, val = data
    full = streams.make_plan(index, manifest, kind, chunks, seed=0)
    half = streams.make_plan(index, manifest, kind, chunks, seed=0, class_fraction=0.5)
    labels = index.column("label").to_numpy()
    owner = half.chunk_of(index)
    trained = np.flatnonzero(half.trained_classes)
    assert set(np.unique(labels[owner >= 0])) == set(trained.tolist())  # rows of dropped classes are in no chunk
    assert np.array_equal(owner[owner >= 0], full.chunk_of(index)[owner >= 0])  # kept rows stay in their chunk
    for f, h in zip(full.chunks, half.chunks):
        in_chunk = sorted(set(f.classes) & set(trained.tolist()))
        assert len(in_chunk) == max(1, round(0.5 * len(f.classes)))  # half of each chunk's classes, at least one
        assert h.rows == int(np.isin(labels[full.chunk_of(index) == f.index], in_chunk).sum())
        assert h.planned_rows == h.unsampled_rows == f.rows > h.rows  # the steps stay the full chunk's
        assert h.classes == f.classes  # the task (what evaluation measures) keeps every class
    val_labels, val_domains = val.column("label").to_numpy(), val.column("domain").to_numpy()
    for t in range(chunks):
        assert np.array_equal(half.task_mask(t, val_labels, val_domains), full.task_mask(t, val_labels, val_domains))
    assert half.digest != full.digest
    assert half.to_dict()["trained_classes"] == trained.tolist()
    again = streams.make_plan(index, manifest, kind, chunks, seed=0, class_fraction=0.5)
    assert again.digest == half.digest and np.array_equal(again.trained_classes, half.trained_classes)
    assert np.array_equal(pickle.loads(pickle.dumps(half)).chunk_of(index), owner)


def test_kept_classes_draw_once_from_classes_every_chunk_shares() -> None:
    shared = kept_classes([range(10)] * 4, 10, 0.3, seed=1)
    assert shared.sum() == 3
    assert kept_classes([[0, 1], [2, 3, 4, 5]], 6, 0.1, seed=0).sum() == 2  # at least one per chunk
    with pytest.raises(SpecError, match=r"data\.class_fraction must be in \(0, 1\]"):
        kept_classes([[0, 1]], 2, 0.0, seed=0)


def test_the_spec_records_factors_only_when_on_and_plans_steps_on_the_full_chunks(data) -> None:
    url = data[0]
    plain = validate_spec(tiny_spec("factors", url))
    explicit = validate_spec(tiny_spec("factors", url, data={"url": url, "image_size": 16, "class_fraction": 1.0,
                                                              "labels": "class"}))
    sub = validate_spec(tiny_spec("factors", url, data={"url": url, "image_size": 16, "class_fraction": 0.5},
                                  stream={"kind": "random_class", "chunks": 2, "seed": 0}))
    assert identity_digest(plain) == identity_digest(explicit) != identity_digest(sub)
    assert "data.class_fraction" not in flatten(plain) and flatten(sub)["data.class_fraction"] == "0.5"
    plan = build_plan(sub)
    full = build_plan(validate_spec(tiny_spec("factors", url, stream={"kind": "random_class", "chunks": 2,
                                                                      "seed": 0})))
    line = plan.lines[0]
    assert planned_line_steps(plan, line) == planned_line_steps(full, full.lines[0])  # same iterations
    assert sum(c.rows for c in plan.stream.chunks) < sum(c.rows for c in full.stream.chunks)
    with pytest.raises(SpecError, match=r"data\.class_fraction"):
        validate_spec(tiny_spec("factors", url, data={"url": url, "class_fraction": 1.5}))


def test_group_labels_train_supervised_lines_on_the_coarse_groups(data) -> None:
    url, manifest = data[0], data[1]
    groups = group_label_map(manifest)
    assert groups.tolist() == [c.group for c in manifest.classes] and groups.max() == 5
    # 6 groups fit a 6-way head, 12 classes would not: the plan checks the labels it will train on
    spec = tiny_spec("coarse", url, data={"url": url, "image_size": 16, "labels": "group"},
                     lines={"method": ["supervised"], "strategy": ["sequential"]},
                     methods={"supervised": {"num_classes": 6}})
    build_plan(validate_spec(spec))
    spec["data"]["labels"] = "class"
    with pytest.raises(SpecError, match=r"methods\.supervised\.num_classes: 6, but the training split has label 11"):
        build_plan(validate_spec(spec))
    ungrouped = manifest.model_copy(update={
        "groups": (), "classes": tuple(c.model_copy(update={"group": -1}) for c in manifest.classes)})
    with pytest.raises(SpecError, match=r"data\.labels: group trains on the manifest's coarse groups, but 12 classes"):
        group_label_map(ungrouped)
