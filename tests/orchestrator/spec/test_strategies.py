"""The spec's `lines.strategy`: a base strategy with aids, each aid's options and the bases it allows."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec.experiment import flatten, validate_spec
from tests.orchestrator.spec.test_spec import minimal


def test_lines_compose_a_base_strategy_with_aids() -> None:
    spec = validate_spec({**minimal(), "lines": {"method": ["simclr"],
                                                 "strategy": ["sequential", ["sequential", "replay", "mas"],
                                                              "sequential+replay", "joint"]},
                          "strategy": {"replay": {"size": 500, "ratio": 1.0}}})
    assert spec.lines.strategy == ["sequential", "sequential+replay+mas", "sequential+replay", "joint"]
    assert spec.strategy_options("sequential+replay+mas") == {
        "replay": {"size": 500, "ratio": 1.0, "policy": "reservoir", "seed": 0}, "mas": {"lambd": 1.0, "batches": 20}}
    params = flatten(spec)
    assert params["strategy.replay.size"] == "500" and params["strategy.mas.lambd"] == "1.0"
    # Options of a strategy no line uses are not recorded (they change no number).
    assert not any(k.startswith("strategy.replay") for k in flatten(validate_spec(minimal())))
    assert validate_spec(spec.model_dump(mode="json", by_alias=True)) == spec
    for entry, says in [(["replay", "sequential"], "exactly one base strategy"),
                        (["sequential", "joint"], "exactly one base strategy"),
                        (["sequential", "mas", "mas"], "listed twice"), ([], "expected a strategy name")]:
        with pytest.raises(SpecError, match=rf"lines\.strategy\[0\]: .*{says}"):
            validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": [entry]}})
    for options, path in [({"replay": {"ratio": 1.5}}, r"strategy\.replay\.ratio"),
                          ({"replay": {"sise": 5}}, r"strategy\.replay\.sise"),
                          ({"mas": {"lambd": -1}}, r"strategy\.mas\.lambd")]:
        with pytest.raises(SpecError, match=path):
            validate_spec({**minimal(), "strategy": options})


def test_cassle_lines_validate_with_their_options_and_joint_cassle_is_refused() -> None:
    spec = validate_spec({**minimal(), "lines": {"method": ["simclr", "supervised"],
                                                 "strategy": ["sequential+cassle", ["sequential", "replay", "cassle"]]},
                          "strategy": {"cassle": {"lambd": 0.5}}})
    assert spec.lines.strategy == ["sequential+cassle", "sequential+replay+cassle"]
    assert spec.strategy_options("sequential+cassle") == {"cassle": {
        "lambd": 0.5, "hidden": 2048, "frozen_bn": "batch", "contrastive": "cross", "temperature": 0.2}}
    params = flatten(spec)
    assert params["strategy.cassle.lambd"] == "0.5" and params["strategy.cassle.hidden"] == "2048"
    with pytest.raises(SpecError, match=r"lines\.strategy\[1\]: cassle needs the base sequential, not joint"):
        validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["sequential", "joint+cassle"]}})
    with pytest.raises(SpecError, match=r"strategy\.cassle\.hidden"):
        validate_spec({**minimal(), "strategy": {"cassle": {"hidden": 0}}})


@pytest.mark.parametrize("entry", ["joint+mas", "joint+replay", ["joint", "replay", "mas"]])
def test_joint_with_mas_or_replay_is_refused_naming_the_line(entry) -> None:
    # MAS would pull a re-initialised model towards the last chunk's weights; JT trains on every past chunk already.
    aid = "replay" if "replay" in entry else "mas"
    with pytest.raises(SpecError, match=rf"lines\.strategy\[1\]: {aid} needs the base sequential, not joint"):
        validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["sequential", entry]}})
    assert validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["joint", "sequential+replay+mas"]}})


@pytest.mark.parametrize("aid", ["replay", "lump"])
def test_a_buffer_smaller_than_the_workers_is_refused_naming_its_size(aid: str) -> None:
    # Each DDP worker draws from its own shard of the buffer: with 1 row and 2 workers one shard is empty.
    lines = {"method": ["simclr"], "strategy": [f"sequential+{aid}"]}
    with pytest.raises(SpecError, match=rf"strategy\.{aid}\.size \(1\) must be >= resources\.workers \(2\)"):
        validate_spec({**minimal(), "lines": lines, "strategy": {aid: {"size": 1}}, "resources": {"workers": 2}})
    spec = validate_spec({**minimal(), "lines": lines, "strategy": {aid: {"size": 2}}, "resources": {"workers": 2}})
    assert spec.strategy_options(f"sequential+{aid}")[aid]["size"] == 2
    # A line without the buffer is not held to it.
    assert validate_spec({**minimal(), "strategy": {aid: {"size": 1}}, "resources": {"workers": 2}})
