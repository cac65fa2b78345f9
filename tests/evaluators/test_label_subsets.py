"""Label-fraction subsets: per-class counts by the rounding rule, determinism, seeds, the record, disjointness and
input errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from evaluators.label_subsets import check_disjoint, check_fraction, label_subset, per_class_count


def _labels() -> np.ndarray:
    """Unbalanced, shuffled: class 0 has 300 rows, class 1 150, class 2 40, class 3 a single row."""
    labels = np.repeat(np.arange(4), [300, 150, 40, 1])
    return np.random.default_rng(123).permutation(labels)


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.01, {0: 3, 1: 2, 2: 1, 3: 1}),       # 1.5 rounds up to 2; 0.4 to at least 1
    (0.1, {0: 30, 1: 15, 2: 4, 3: 1}),
    (0.25, {0: 75, 1: 38, 2: 10, 3: 1}),    # 37.5 rounds up
    (1.0, {0: 300, 1: 150, 2: 40, 3: 1}),
])
def test_per_class_counts_follow_the_rounding_rule(fraction, expected):
    labels = _labels()
    subset = label_subset(labels, fraction, seed=0)
    assert subset.class_counts == expected
    assert subset.class_totals == {0: 300, 1: 150, 2: 40, 3: 1}
    chosen = labels[subset.indices]
    assert {c: int((chosen == c).sum()) for c in range(4)} == expected
    assert subset.size == sum(expected.values())
    assert np.all(np.diff(subset.indices) > 0)  # sorted, no repeats
    assert subset.indices.dtype == np.int64 and not subset.indices.flags.writeable


def test_same_seed_same_rows_and_different_seeds_differ():
    labels = _labels()
    a, b = label_subset(labels, 0.1, seed=7), label_subset(torch.from_numpy(labels), 0.1, seed=7)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.sha256 == b.sha256
    c = label_subset(labels, 0.1, seed=8)
    assert c.class_counts == a.class_counts
    assert not np.array_equal(a.indices, c.indices)
    assert a.sha256 != c.sha256


def test_global_rng_is_not_used():
    labels = _labels()
    np.random.seed(0)
    torch.manual_seed(0)
    a = label_subset(labels, 0.1, seed=1)
    np.random.seed(99)
    torch.manual_seed(99)
    b = label_subset(labels, 0.1, seed=1)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_record_is_json_and_hash_matches_the_indices():
    subset = label_subset(_labels(), 0.1, seed=3)
    record = json.loads(json.dumps(subset.to_record()))
    assert record["fraction"] == 0.1 and record["seed"] == 3
    assert record["rows"] == 50 and record["split_rows"] == 491
    assert record["class_counts"] == {"0": 30, "1": 15, "2": 4, "3": 1}
    assert record["indices"] == subset.indices.tolist()
    expected = hashlib.sha256(np.asarray(record["indices"], dtype="<i8").tobytes()).hexdigest()
    assert record["indices_sha256"] == expected
    assert "indices" not in subset.to_record(include_indices=False)


def test_disjoint_subset_passes_and_overlap_is_named():
    labels = _labels()
    subset = label_subset(labels, 0.1, seed=0)
    outside = sorted(set(range(labels.size)) - set(subset.indices.tolist()))
    check_disjoint(subset, outside)  # no error
    shared = [int(subset.indices[0]), int(subset.indices[5])]
    with pytest.raises(ValueError, match=rf"shares 2 row\(s\) with the validation set: {shared[0]}, {shared[1]}"):
        check_disjoint(subset, outside + shared)


def test_disjointness_by_row_keys():
    labels = _labels()
    keys = [f"train/{i:05d}" for i in range(labels.size)]
    subset = label_subset(labels, 0.01, seed=0)
    check_disjoint(subset, [f"val/{i:05d}" for i in range(100)], subset_keys=keys)
    leaked = keys[int(subset.indices[2])]
    with pytest.raises(ValueError, match=f"shares 1 row.*'{leaked}'"):
        check_disjoint(subset, ["val/00000", leaked], subset_keys=keys)
    with pytest.raises(ValueError, match="outside subset_keys"):
        check_disjoint(subset, [], subset_keys=keys[:3])


def test_long_overlap_is_quoted_in_part():
    with pytest.raises(ValueError, match=r"shares 25 row\(s\).* and 15 more"):
        check_disjoint(range(25), np.arange(30))


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.01, float("nan"), float("inf"), True, "0.1", None])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction must"):
        label_subset(_labels(), fraction)
    with pytest.raises(ValueError, match="fraction must"):
        check_fraction(fraction)


def test_bad_labels_and_seed_are_refused():
    with pytest.raises(ValueError, match="row 2 has -1"):
        label_subset(np.array([0, 1, -1, 1]), 0.5)
    with pytest.raises(ValueError, match="integers"):
        label_subset(np.array([0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        label_subset(np.zeros((2, 2), dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        label_subset(np.array([], dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="seed"):
        label_subset(np.array([0, 1]), 0.5, seed=-1)


def test_per_class_count_bounds():
    assert per_class_count(0.001, 5) == 1
    assert per_class_count(1.0, 5) == 5
    assert per_class_count(0.5, 3) == 2  # 1.5 rounds half up
