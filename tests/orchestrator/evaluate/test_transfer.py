"""The transfer evaluation's options and task registry, in-process on a tiny backbone and synthetic-like splits:
`--set` routing and its errors, every task's score names and ranges, the label-subset record and the grid.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/orchestrator/evaluate/test_transfer.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.data.ingest import SplitArrays
from orchestrator.errors import SpecError
from orchestrator.evaluate.transfer import TRANSFER_TASKS, percent
from orchestrator.spec.transfer import TASKS, transfer_params, transfer_spec
from trainers.backbones import build_backbone

CLASSES = 4


def _split(name: str, per_class: int, seed: int) -> SplitArrays:
    """Each class a different mean colour plus noise: 16 px, uint8, keys `<name>/<row>` (disjoint across splits)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    base = np.array([[40, 40, 200], [200, 40, 40], [40, 200, 40], [200, 200, 40]])[labels]
    images = np.clip(base[:, :, None, None] + rng.normal(0, 20, (len(labels), 3, 16, 16)), 0, 255).astype(np.uint8)
    return SplitArrays(images=torch.from_numpy(images), labels=labels.astype(np.int64),
                       domains=np.zeros(len(labels), np.int64), keys=[f"{name}/{i:04d}" for i in range(len(labels))])


@pytest.fixture(scope="module")
def splits() -> tuple[SplitArrays, SplitArrays]:
    return _split("train", 20, 0), _split("val", 16, 1)


def _backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", image_size=16, width=4).eval()


def test_set_routes_bare_task_options_and_names_bad_keys() -> None:
    spec = transfer_spec("finetune", "runs/data/synth-downstream/", ["fraction=0.01", "epochs=3", "seed=2",
                                                                    "data.eval_split=test"])
    assert (spec.finetune.label_fraction, spec.finetune.epochs, spec.seed) == (0.01, 3, 2)
    assert spec.data.set_name == "synth-downstream" and spec.data.eval_split == "test"
    assert transfer_spec("fewshot", "x", ["way=3", "shot=1"]).fewshot.way == 3
    params = transfer_params(spec)
    assert params["finetune.label_fraction"] == "0.01" and params["norm_rescale"] == "off"
    assert not any(k.startswith(("fewshot.", "linear.")) for k in params)  # only the chosen task's options

    with pytest.raises(SpecError, match=r"--task 'detection': unknown transfer task; known: finetune, linear"):
        transfer_spec("detection", "x")
    with pytest.raises(SpecError, match=r"--set way: .* nor an option of finetune \(label_fraction, epochs"):
        transfer_spec("finetune", "x", ["way=5"])
    with pytest.raises(SpecError, match=r"finetune\.label_fraction: Input should be less than or equal to 1"):
        transfer_spec("finetune", "x", ["fraction=2"])
    with pytest.raises(SpecError, match=r"norm_rescale: mode=constant needs target_norm"):
        transfer_spec("linear", "x", ["norm_rescale.mode=constant"])
    with pytest.raises(SpecError, match=r"norm_rescale\.mode: anchor needs the run id of the anchor model"):
        transfer_spec("linear", "x", ["norm_rescale.mode=anchor"])
    with pytest.raises(SpecError, match=r"bogus: unknown field; allowed: task, data, seed"):
        transfer_spec("linear", "x", ["bogus.x=1"])
    with pytest.raises(SpecError, match=r"the task and the data URL are --task and --data"):
        transfer_spec("linear", "x", ["task=fewshot"])
    with pytest.raises(SpecError, match=r"data\.name: String should match pattern"):
        transfer_spec("linear", "x", ["data.name=a b"])


def test_every_task_the_spec_accepts_has_a_runner() -> None:
    assert tuple(TRANSFER_TASKS) == TASKS
    assert [percent(f) for f in (1.0, 0.1, 0.01, 0.005)] == ["100pct", "10pct", "1pct", "0.5pct"]


def test_finetune_scores_its_label_fraction_and_records_the_subset(splits) -> None:
    train, val = splits
    spec = transfer_spec("finetune", "x", ["fraction=0.25", "epochs=2", "finetune.batch_size=8"])
    outcome = TRANSFER_TASKS["finetune"].run(_backbone(), train, val, spec, "cpu")
    assert set(outcome.scores) == {"finetune_25pct_top1", "finetune_25pct_top5"}
    assert 0 <= outcome.scores["finetune_25pct_top1"] <= outcome.scores["finetune_25pct_top5"] == 1.0  # 4 classes
    record = outcome.records["label_subset.json"]
    assert record["rows"] == outcome.metrics["train_rows"] == 4 * 5  # 25% of 20 per class
    assert record["class_counts"] == {str(c): 5 for c in range(CLASSES)} and record["split"] == "train"
    assert record["keys"] == [train.keys[i] for i in record["indices"]]
    assert outcome.metrics["val_rows"] == len(val.labels) and outcome.metrics["steps"] == 2 * (20 // 8)


def test_linear_and_fewshot_score_frozen_features(splits) -> None:
    train, val = splits
    linear = TRANSFER_TASKS["linear"].run(_backbone(), train, val, transfer_spec("linear", "x", ["epochs=20"]),
                                          "cpu")
    assert linear.scores["linear_top1"] > 0.9  # colour classes: separable even on random features
    spec = transfer_spec("fewshot", "x", ["way=3", "shot=2", "fewshot.query=4", "fewshot.episodes=20"])
    fewshot = TRANSFER_TASKS["fewshot"].run(_backbone(), train, val, spec, "cpu")
    assert set(fewshot.scores) == {"fewshot_3way2shot_mean", "fewshot_3way2shot_ci95"}
    assert 1 / 3 < fewshot.scores["fewshot_3way2shot_mean"] <= 1.0 and fewshot.scores["fewshot_3way2shot_ci95"] >= 0
    assert len(fewshot.records["fewshot_episodes.json"]["accuracies"]) == 20
    spec = transfer_spec("fewshot", "x", ["way=5"])  # 4 classes only: the evaluator's error names it
    with pytest.raises(ValueError, match=r"way=5 needs 5 classes"):
        TRANSFER_TASKS["fewshot"].run(_backbone(), train, val, spec, "cpu")


def test_reconstruction_gives_relative_error_and_a_grid(splits) -> None:
    train, val = splits
    spec = transfer_spec("reconstruction", "x", ["epochs=2", "reconstruction.hidden=16", "reconstruction.samples=3"])
    outcome = TRANSFER_TASKS["reconstruction"].run(_backbone(), train, val, spec, "cpu")
    assert outcome.scores["reconstruction_mse"] > 0 and outcome.scores["reconstruction_relative_mse"] > 0
    grid = outcome.images["reconstructions.png"]
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] > 16
    assert outcome.metrics["eval_rows"] == len(val.labels)


def test_eval_transfer_entries_are_checked_and_leave_the_plan_key_alone() -> None:
    from orchestrator.spec.experiment import flatten, identity_digest, validate_spec
    from tests.specs import tiny_spec

    entry = {"task": "finetune", "data": {"url": "/data/held-out"}, "finetune": {"label_fraction": 0.01},
             "after_chunks": [0, "last"]}
    plain = validate_spec(tiny_spec("t", "/data/x"))
    spec = validate_spec(tiny_spec("t", "/data/x", eval={"transfer": [entry]}))
    (parsed,) = spec.eval.transfer
    assert parsed.chunks(2) == [0, 1] and parsed.finetune.label_fraction == 0.01 and parsed.data.set_name == "held-out"
    assert identity_digest(spec) == identity_digest(plain)  # transfer reads checkpoints; training is the same plan
    assert "eval.transfer" in flatten(spec) and "eval.transfer" not in flatten(plain)
    for change, message in (({"after_chunks": [2]}, r"eval\.transfer: entry 0 \(finetune\): after_chunks \[2\] are "
                                                    r"not chunks of the stream's 2 \(0\.\.1 or last\)"),
                            ({"after_chunks": [-1]}, r"eval\.transfer\[0\]: after_chunks: chunk indices are >= 0"),
                            ({"task": "detection"}, r"eval\.transfer\[0\]\.task: Input should be 'finetune'"),
                            ({"finetune": {"epoch": 1}}, r"eval\.transfer\[0\]\.finetune\.epoch: unknown field")):
        with pytest.raises(SpecError, match=message):
            validate_spec(tiny_spec("t", "/data/x", eval={"transfer": [{**entry, **change}]}))
