"""eval.downstream: more data sets evaluated after every chunk; prepared shards or an ImageFolder tree, checked
before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from orchestrator.data.downstream import downstream_shards, prepare_downstream, resolve_downstream
from orchestrator.data.ingest import SplitArrays
from orchestrator.errors import DataError, SpecError
from orchestrator.evaluate.evaluation import evaluate_downstream
from orchestrator.plan.planner import build_plan
from orchestrator.spec.experiment import validate_spec
from orchestrator.spec.params import identity_digest
from tests.specs import tiny_spec

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _split(labels: list[int]) -> SplitArrays:
    images = torch.tensor([COLOURS[c] for c in labels], dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 8, 8)
    return SplitArrays(images=images.contiguous(), labels=np.array(labels, dtype=np.int64),
                       domains=np.zeros(len(labels), dtype=np.int64), keys=[str(i) for i in range(len(labels))])


def _spec(url: str, tmp_path: Path, downstream: list[dict]) -> dict:
    return tiny_spec("downstream", url, eval={"downstream": downstream}, storage={"workdir": str(tmp_path / "w")})


def test_every_set_gets_each_protocols_accuracy_under_its_name() -> None:
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # one direction per colour: kNN is exact
    loaded = {"colours": (_split([0, 1, 2] * 4), _split([2, 1, 0, 0])), "two": (_split([0, 1] * 3), _split([1, 1]))}
    eval_spec = {"batch_size": 4, "every_chunk": ["knn"], "knn": {"k": 3, "temperature": 0.07}}
    assert evaluate_downstream(backbone, loaded, eval_spec) == {"colours.knn_top1": 1.0, "colours.knn_top5": 1.0,
                                                                "two.knn_top1": 1.0, "two.knn_top5": 1.0}
    blind = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1, bias=False))
    nn.init.zeros_(blind[2].weight)  # every feature equal: ties go to the smallest class id
    assert evaluate_downstream(blind, {"two": loaded["two"]}, eval_spec) == {"two.knn_top1": 0.0, "two.knn_top5": 1.0}


def test_prepared_shards_resolve_and_bad_entries_name_their_field(synthetic_url: str, tmp_path: Path) -> None:
    spec = validate_spec(_spec(synthetic_url, tmp_path, [{"name": "same", "url": synthetic_url}]))
    (resolved,) = resolve_downstream(spec)
    assert resolved.url == synthetic_url and resolved.manifest.num_classes == 12
    missing = validate_spec(_spec(synthetic_url, tmp_path, [{"name": "gone", "url": str(tmp_path / "nothing")}]))
    with pytest.raises(SpecError, match=r"eval\.downstream\[0\] \('gone'\)\.url: .* neither prepared shards"):
        build_plan(missing)
    wrong = validate_spec(_spec(synthetic_url, tmp_path, [{"name": "s", "url": synthetic_url, "eval_split": "test"}]))
    with pytest.raises(SpecError, match=r"eval\.downstream\[0\] \('s'\)\.eval_split: split 'test' is not in"):
        resolve_downstream(wrong)
    with pytest.raises(SpecError, match=r"eval\.downstream"):
        validate_spec(_spec(synthetic_url, tmp_path, [{"name": "a", "url": "x"}, {"name": "a", "url": "y"}]))
    with pytest.raises(SpecError, match=r"eval\.downstream.*'downstream' names the mean over the sets"):
        validate_spec(_spec(synthetic_url, tmp_path, [{"name": "downstream", "url": "x"}]))
    none = validate_spec(_spec(synthetic_url, tmp_path, []))
    assert identity_digest(none) == identity_digest(validate_spec(tiny_spec("downstream", synthetic_url)))
    assert identity_digest(none) != identity_digest(spec)


def test_an_imagefolder_tree_is_prepared_once_into_the_workdir(synthetic_url: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        for c, colour in enumerate(COLOURS):
            folder = tree / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), colour).save(folder / f"{i}.jpg")
    spec = validate_spec(_spec(synthetic_url, tmp_path, [{"name": "folder", "url": str(tree)}]))
    with pytest.raises(DataError, match=r"eval\.downstream\[0\] \('folder'\)\.url: .* not prepared yet"):
        resolve_downstream(spec)  # planning only reads: the tree is prepared by a run's data step
    assert not (tmp_path / "w" / "downstream").exists()
    prepare_downstream(spec)
    (resolved,) = resolve_downstream(spec)
    assert resolved.url == str(tmp_path / "w" / "downstream" / "folder")
    assert resolved.manifest.num_classes == 3 and set(resolved.manifest.splits) >= {"train", "val"}
    manifest = Path(resolved.url) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    prepare_downstream(spec)
    assert resolve_downstream(spec)[0].manifest.digest == resolved.manifest.digest
    assert manifest.stat().st_mtime_ns == stamp  # not prepared again


def test_a_transfer_set_outside_a_spec_is_shards_or_a_tree_prepared_once(tmp_path: Path) -> None:
    """`streamssl eval --data`: prepared shards are read where they are; a tree is prepared once where it is told."""
    tree = tmp_path / "pets"
    for split in ("train", "val"):
        for c, colour in enumerate(COLOURS):
            (tree / split / f"class{c}").mkdir(parents=True)
            Image.new("RGB", (12, 12), colour).save(tree / split / f"class{c}" / "0.jpg")
    prepared = str(tmp_path / "runs" / "downstream" / "pets")
    url, manifest = downstream_shards(str(tree), {}, prepared, "--data", ["train", "val"])
    assert url == prepared and manifest.num_classes == 3 and manifest.splits["val"].rows == 3
    stamp = (Path(prepared) / "manifest.json").stat().st_mtime_ns
    assert downstream_shards(str(tree), {}, prepared, "--data", ["train"])[1].digest == manifest.digest
    assert (Path(prepared) / "manifest.json").stat().st_mtime_ns == stamp  # not prepared again
    assert downstream_shards(prepared, {}, str(tmp_path / "unused"), "--data", ["val"])[0] == prepared
    assert not (tmp_path / "unused").exists()
    with pytest.raises(SpecError, match=r"--data: split 'test' is not in .*; it has \['train', 'val'\]"):
        downstream_shards(prepared, {}, str(tmp_path / "unused"), "--data", ["test"])
    with pytest.raises(SpecError, match=r"--data: '.*nothing' holds neither prepared shards"):
        downstream_shards(str(tmp_path / "nothing"), {}, str(tmp_path / "unused"), "--data", ["val"])


def test_a_downstream_score_equals_the_held_out_protocols_to_the_last_bit(one_torch_thread) -> None:
    from orchestrator.evaluate.evaluation import evaluate_backbone, protocol_scores
    from orchestrator.plan.streams import ChunkSpec, StreamPlan

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(20)
    images = (torch.rand(80, 3, 8, 8, generator=g) * 255 + labels[:, None, None, None] * 10).clamp(0, 255)
    arrays = SplitArrays(images.to(torch.uint8), labels.numpy(), np.zeros(80, dtype=np.int64),
                         [str(i) for i in range(80)])
    plan = StreamPlan("random_class", 0, [ChunkSpec(0, (0, 1), (0,), 10), ChunkSpec(1, (2, 3), (0,), 10)], "d")
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    spec = {"batch_size": 16, "every_chunk": ["knn", "linear"], "knn": {"k": 5, "temperature": 0.07},
            "linear": {"epochs": 5}}
    held_out = evaluate_backbone(backbone, arrays, arrays, plan, spec)
    scores = protocol_scores(backbone, arrays, arrays, spec)
    assert scores == {k: held_out[k] for k in scores} and 0.3 < scores["knn_top1"] < 1  # (0.7375 measured)
