"""The optional studies after a chunk (few-shot, sharpness, interpolation): what the eval run gets, and that each
number is the evaluator's own on the actor's bank and queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evaluators.features import extract_features
from evaluators.fewshot import FewShotConfig, few_shot_accuracy
from evaluators.interpolation import interpolation_curve
from evaluators.sharpness import SharpnessConfig, sharpness
from orchestrator.data.ingest import SplitArrays
from orchestrator.errors import SpecError
from orchestrator.evaluate.studies import study_metrics
from orchestrator.spec.experiment import validate_spec
from orchestrator.spec.params import flatten, identity_digest
from tests.specs import tiny_spec


def _split(n_per_class: int, classes: int, seed: int) -> SplitArrays:
    # class c: noisy images around a class-specific mean colour, so a conv net separates them a little
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    means = torch.linspace(30, 220, classes)[labels]
    images = (means[:, None, None, None] + 25 * torch.randn(len(labels), 3, 8, 8, generator=g)).clamp(0, 255)
    return SplitArrays(images=images.to(torch.uint8), labels=labels.numpy().astype(np.int64),
                       domains=np.zeros(len(labels), dtype=np.int64), keys=[str(i) for i in range(len(labels))])


def _backbone(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def _batches(arrays: SplitArrays, size: int):
    labels = torch.from_numpy(arrays.labels)
    return lambda: [(arrays.images[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def test_each_study_is_the_evaluators_own_number_on_the_same_rows(one_torch_thread) -> None:
    bank, queries = _split(12, 6, seed=0), _split(10, 6, seed=1)
    fewshot = FewShotConfig(way=3, shot=2, query=4, episodes=40).model_dump()
    sharp = SharpnessConfig(epsilons=(0.1, 0.3), search_steps=2, restarts=2, knn_k=5).model_dump()
    eval_spec = {"batch_size": 16, "knn": {"k": 5, "temperature": 0.07}, "fewshot": fewshot, "sharpness": sharp,
                 "interpolation": {"points": 5}}
    previous, current = _backbone(1), _backbone(2)
    before = {k: v.clone() for k, v in current.state_dict().items()}
    out = study_metrics(current, bank, queries, eval_spec, seed=3, previous_state=previous.state_dict(),
                        make_backbone=lambda: _backbone(9))
    assert all(torch.equal(before[k], v) for k, v in current.state_dict().items())  # restored unchanged

    feats, labels = extract_features(current, _batches(queries, 16)())
    direct = few_shot_accuracy(feats, labels, seed=3, **fewshot)
    assert (out["fewshot_mean"], out["fewshot_ci95"]) == (direct.mean, direct.ci95)
    assert 1 / 3 - 0.2 < out["fewshot_mean"] <= 1.0 and out["fewshot_ci95"] > 0
    assert len(out["studies"]["fewshot"]["accuracies"]) == 40

    worst = sharpness(current, _batches(bank, 16), _batches(queries, 16), seed=3, **sharp)
    assert out["sharpness_eps0.1"] == worst.point(0.1).relative_drop
    assert out["sharpness_eps0.3"] == worst.point(0.3).relative_drop
    assert 0.0 <= out["sharpness_eps0.1"] <= 1.0 and out["sharpness_base_accuracy"] == worst.base_accuracy
    assert len(out["studies"]["sharpness"]["points"]) == 2

    curve = interpolation_curve(previous.state_dict(), current.state_dict(), lambda: _backbone(9),
                                _batches(bank, 16), _batches(queries, 16), points=5, knn_k=5, knn_temperature=0.07)
    assert out["interpolation_barrier"] == curve.barrier >= 0
    assert out["studies"]["interpolation"]["accuracies"] == list(curve.accuracies)
    assert out["interpolation_min_accuracy"] == min(curve.accuracies)


def test_studies_off_add_nothing_and_a_first_chunk_has_no_interpolation() -> None:
    bank, queries = _split(4, 3, seed=0), _split(4, 3, seed=1)
    base = {"batch_size": 16, "knn": {"k": 5, "temperature": 0.07}}
    assert study_metrics(_backbone(0), bank, queries, {**base, "fewshot": None, "sharpness": None}) == {}
    out = study_metrics(_backbone(0), bank, queries, {**base, "interpolation": {"points": 3}}, previous_state=None,
                        make_backbone=lambda: _backbone(1))
    assert "interpolation_barrier" not in out


def test_episodes_wider_than_the_evaluation_classes_name_the_field() -> None:
    bank, queries = _split(4, 3, seed=0), _split(6, 3, seed=1)
    spec = {"batch_size": 16, "knn": {"k": 5, "temperature": 0.07},
            "fewshot": FewShotConfig(way=5, shot=1, query=1, episodes=2).model_dump()}
    with pytest.raises(ValueError, match=r"eval\.fewshot\.way: 5-way episodes, but the evaluation split holds only 3"):
        study_metrics(_backbone(0), bank, queries, spec)


def test_the_spec_turns_studies_on_by_section_and_off_ones_leave_the_identity_alone(synthetic_url: str) -> None:
    off = validate_spec(tiny_spec("studies", synthetic_url))
    explicit_off = validate_spec(tiny_spec("studies", synthetic_url, eval={"fewshot": None, "sharpness": None}))
    on = validate_spec(tiny_spec("studies", synthetic_url, eval={"fewshot": {"way": 3}, "sharpness": {}}))
    assert off.eval.fewshot is None and on.eval.fewshot.way == 3 and on.eval.sharpness.epsilons == (0.1, 0.3)
    assert identity_digest(off) == identity_digest(explicit_off) != identity_digest(on)
    assert not any(k.startswith(("eval.fewshot", "eval.sharpness")) for k in flatten(off))
    assert flatten(on)["eval.fewshot.way"] == "3" and flatten(on)["eval.sharpness.epsilons"] == "[0.1, 0.3]"
    with pytest.raises(SpecError, match=r"eval\.sharpness\.epsilons"):
        validate_spec(tiny_spec("studies", synthetic_url, eval={"sharpness": {"epsilons": [0.1, 0.1]}}))
