"""The transfer evaluation's options and task registry, in-process on a tiny backbone and synthetic-like splits:
`--set` routing and its errors, every task's score names and ranges, the label-subset record and the grid; the
detection and segmentation tasks on the synthetic shapes set read through its prepared shards.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/orchestrator/evaluate/test_transfer.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.data.detection_shards import DetectionShards, prepare_detection_set
from orchestrator.data.ingest import SplitArrays
from orchestrator.data.synth_detection import generate_detection_set
from orchestrator.errors import SpecError
from orchestrator.evaluate.transfer import TRANSFER_TASKS, percent, run_transfer
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

    with pytest.raises(SpecError, match=r"--task 'keypoints': unknown transfer task; known: finetune, linear"):
        transfer_spec("keypoints", "x")
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
                            ({"task": "pose"}, r"eval\.transfer\[0\]\.task: Input should be 'finetune'"),
                            ({"finetune": {"epoch": 1}}, r"eval\.transfer\[0\]\.finetune\.epoch: unknown field")):
        with pytest.raises(SpecError, match=message):
            validate_spec(tiny_spec("t", "/data/x", eval={"transfer": [{**entry, **change}]}))


# Heads at CPU sizes: two steps prove the wiring; AP itself is checked in tests/evaluators/test_detection_ap.py.
TINY_DETECTOR = ["steps=2", "min_size=48", "max_size=48", "fpn_channels=8", "box_head_dim=16", "mask_head_dim=8",
                 "box_batch_size_per_image=16", "detection.warmup_steps=1", "segmentation.warmup_steps=1"]


def _detector_sets(task: str) -> list[str]:
    """TINY_DETECTOR for `task` (the bare keys route to it; the other task's dotted ones are dropped)."""
    other = "segmentation" if task == "detection" else "detection"
    return [s for s in TINY_DETECTOR if not s.startswith(other)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    """The synthetic shapes set (8 train, 4 val images of 48 px) prepared from its VOC and its COCO tree."""
    root = tmp_path_factory.mktemp("shapes")
    made = generate_detection_set(root / "trees", train=8, val=4, image_size=48, num_classes=3, seed=0)
    prepare_detection_set(made.voc_root, str(root / "voc"), format="voc", classes=made.classes)
    prepare_detection_set(made.coco_root, str(root / "coco"), format="coco")
    return {"voc": str(root / "voc"), "coco": str(root / "coco"), "classes": made.classes}


def test_detection_options_route_to_the_task_and_init_random_is_a_param() -> None:
    spec = transfer_spec("detection", "x", ["steps=7", "min_size=64", "lr=0.01", "init=random", "fpn_channels=32"])
    assert (spec.detection.steps, spec.detection.min_size, spec.detection.lr) == (7, 64, 0.01)
    assert spec.detection.detector("faster_rcnn").fpn_channels == 32 and spec.init == "random"
    assert spec.detection.training()["lr"] == 0.01 and "steps" not in spec.detection.training()
    params = transfer_params(spec)
    assert params["init"] == "random" and params["detection.steps"] == "7" and params["detection.min_size"] == "64"
    assert not any(k.startswith("segmentation.") for k in params)
    assert transfer_params(transfer_spec("linear", "x"))["init"] == "checkpoint"
    assert transfer_spec("segmentation", "x", ["mask_head_dim=8"]).segmentation.mask_head_dim == 8
    with pytest.raises(SpecError, match=r"image_size: detection resizes images by detection\.min_size"):
        transfer_spec("detection", "x", ["image_size=64"])
    with pytest.raises(SpecError, match=r"data\.max_train_per_class: a segmentation set has objects"):
        transfer_spec("segmentation", "x", ["data.max_train_per_class=5"])
    with pytest.raises(SpecError, match=r"init: Input should be 'checkpoint' or 'random'"):
        transfer_spec("detection", "x", ["init=imagenet"])
    with pytest.raises(SpecError, match=r"--set model: neither a field .* nor an option of detection"):
        transfer_spec("detection", "x", ["model=mask_rcnn"])  # the task picks the detector


@pytest.mark.parametrize("task,tree", [("detection", "voc"), ("segmentation", "coco")])
def test_detection_tasks_train_a_detector_and_score_ap_on_the_eval_split(shapes, task, tree, capsys) -> None:
    spec = transfer_spec(task, shapes[tree], _detector_sets(task))
    masks = task == "segmentation"
    train = DetectionShards(shapes[tree], "train", masks=masks)
    val = DetectionShards(shapes[tree], "val", masks=masks)
    assert train.classes == tuple(shapes["classes"])
    outcome = TRANSFER_TASKS[task].run(_backbone(), train, val, spec, "cpu")
    names = {f"{task}_{k}" for k in ("ap", "ap50", "ap75")}
    if masks:
        names |= {f"{task}_mask_{k}" for k in ("ap", "ap50", "ap75")}
    assert set(outcome.scores) == names and all(0 <= v <= 1 for v in outcome.scores.values())
    metrics = outcome.metrics
    assert (metrics["steps"], metrics["train_images"], metrics["val_images"], metrics["num_classes"]) == (2, 8, 4, 3)
    assert metrics["epochs"] == pytest.approx(2 * 2 / 8) and metrics["final_loss"] > 0
    assert "final_loss_mask" in metrics if masks else "final_loss_mask" not in metrics
    record = outcome.records[f"{task}_training.json"]
    assert len(record["loss_curve"]) == 2 and record["steps"] == 2
    printed = capsys.readouterr().out  # the progress a user sees (Ray forwards the task's prints)
    assert f"{task}: step 1/2, loss {record['loss_curve'][0]:.3f}" in printed and f"{task}: step 2/2" in printed


def test_run_transfer_reads_a_checkpoint_or_its_random_init_and_the_set_its_task_needs(shapes, tmp_path) -> None:
    from dataclasses import asdict

    from orchestrator.data.detection_shards import load_detection_manifest
    from trainers.engine.checkpoint import save_state
    from trainers.engine.loop_config import LoopConfig
    from trainers.views.plan import view_plan

    config = LoopConfig(method="simclr", strategy="sequential", image_size=16, backbone_options={"width": 4},
                        views=view_plan(global_count=2, global_size=16))
    torch.manual_seed(1)  # not the seed-0 draw `init=random` makes
    trained = build_backbone("resnet18", image_size=16, width=4)
    weights = {f"backbone.{k}": v for k, v in trained.state_dict().items()}
    save_state(tmp_path, {"config": asdict(config), "method": weights})
    manifest = load_detection_manifest(shapes["voc"])
    outcomes = {}
    for init in ("checkpoint", "random"):
        spec = transfer_spec("detection", shapes["voc"], [*_detector_sets("detection"), f"init={init}"])
        outcomes[init] = run_transfer(spec, str(tmp_path), shapes["voc"], manifest, {})
        assert outcomes[init]["image_size"] == 48 and outcomes[init]["device"] == "cpu"
        assert "corrupt_rows_skipped" not in outcomes[init]["metrics"]
        assert set(outcomes[init]["scores"]) == {"detection_ap", "detection_ap50", "detection_ap75"}
    # The same seed gives the same heads and batches: only the backbone differs, and so does the first loss.
    assert outcomes["checkpoint"]["metrics"]["first_loss"] != outcomes["random"]["metrics"]["first_loss"]
