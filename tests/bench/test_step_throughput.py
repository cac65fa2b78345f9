"""bench.step_throughput runs and writes what its readers expect; its two loops do the same work.

No timing is asserted: figures on a shared machine say nothing about correctness. The bench itself is run with
`python -m bench.step_throughput --quick` (see the module's docstring).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from bench import step_throughput
from bench.steps import (
    SMALL_HEAD,
    BareLoop,
    EngineLoop,
    StepConfig,
    cycle,
    method_options,
    premade_batches,
    view_plan_for,
)
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY, backbone_suits

RECORDS = list(METHOD_REGISTRY.values())


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads per process make these small
    steps 10x slower (measured: 7.3 s vs 0.5 s for 2 tiny steps at a load of 30)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_quick_path_writes_every_field_with_positive_throughputs(tmp_path) -> None:
    out = tmp_path / "step_throughput.json"
    step_throughput.main(["--quick", "--device", "cpu", "--methods", "simclr", "--backbones", "resnet18",
                          "--steps", "2", "--reps", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "step_throughput"
    assert {"measured_at", "command", "hardware", "settings", "results", "table"} <= set(doc)
    settings = doc["settings"]
    assert settings["quick"] and settings["small_heads"] and settings["steps"] == 2 and settings["reps"] == 1
    assert settings["size"] == 32 and settings["batch"] == 32 and settings["device"] == "cpu"
    assert "simclr" in settings["registered_methods"]
    [cell] = doc["results"]
    assert cell["status"] == "ok" and cell["method"] == "simclr" and cell["backbone"] == "resnet18"
    for variant in ("engine", "bare"):
        assert len(cell["samples_per_s"][variant]) == 1
        assert cell["median_samples_per_s"][variant] > 0
        assert cell["median_samples_per_s_wall"][variant] > 0
        assert len(cell["step_seconds"][variant][0]) == 2
    assert cell["median_ratio"] > 0 and math.isfinite(cell["median_ratio"])
    assert cell["same_first_loss"] is True
    assert cell["views"] == {"global": 2, "global_size": 32, "local": 0, "local_size": None}
    assert cell["method_options"]["proj_hidden"] == SMALL_HEAD
    [row] = doc["table"]
    assert row["engine img/s"] > 0 and row["bare img/s"] > 0 and row["ratio"] == cell["median_ratio"]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_both_loops_start_from_the_same_weights_views_and_batch(record) -> None:
    """The first step of the engine and of the bare loop gives the same loss: the bare loop does the engine's work
    (views the record asks for, labels where it needs them), so their ratio compares loops, not workloads."""
    cfg = StepConfig(backbone="slimmable_resnet18" if record.slimmable else "resnet18", width=4, method=record.name,
                     size=16, batch=8, precision="fp32", channels_last=False, small_heads=True)
    plan = view_plan_for(cfg)
    assert len(plan.global_) >= max(2, record.min_global_views)
    assert bool(plan.local) == record.needs_local_views
    batches = premade_batches(cfg, "cpu", 2)
    assert all(b.has_labels for b in batches) == record.needs_labels
    engine, bare = EngineLoop(cfg, "cpu"), BareLoop(cfg, "cpu")
    assert engine.run(cycle(batches), 2) == bare.run(cycle(batches), 2) == 16
    assert math.isfinite(engine.first_loss)
    assert bare.first_loss == pytest.approx(engine.first_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_small_heads_only_shrink_head_widths(record) -> None:
    defaults = record.defaults()
    small = method_options(StepConfig(method=record.name, small_heads=True))
    for name, value in small.items():
        if value != defaults[name]:
            assert value == SMALL_HEAD < defaults[name], name
    assert method_options(StepConfig(method=record.name)) == defaults


def test_the_gpu_suite_lists_the_anchors_first_then_every_method_x_backbone_once() -> None:
    cells = step_throughput.cells_for(SimpleNamespace(gpu_suite=True))
    assert [(b, m) for b, m, _ in cells[:len(step_throughput.ANCHORS)]] == list(step_throughput.ANCHORS)
    assert ("resnet18", "simclr") in step_throughput.ANCHORS and ("vit_tiny", "simclr") in step_throughput.ANCHORS
    pairs = [(b, m) for b, m, _ in cells]
    suited = {(b, m) for b in BACKBONE_REGISTRY.names for m in METHOD_REGISTRY.names if backbone_suits(m, b)}
    assert len(pairs) == len(set(pairs)) == len(suited)
    assert set(pairs) == suited and ("resnet18", "us3l") not in suited and ("slimmable_resnet18", "us3l") in suited


def test_local_views_get_a_side_the_backbone_accepts_and_both_loops_consume_them() -> None:
    # default_local_size(32) is 14; ViT-Tiny's default patch at 32 px is 4, so the side steps down to 12
    plan = view_plan_for(StepConfig(backbone="vit_tiny", method="simclr", size=32, local_views=2))
    assert [c.size for c in plan.local] == [12, 12]
    cfg = StepConfig(backbone="resnet18", width=4, method="simclr", size=16, batch=8, precision="fp32",
                     channels_last=False, small_heads=True, local_views=2)
    batches = premade_batches(cfg, "cpu", 1)
    engine, bare = EngineLoop(cfg, "cpu"), BareLoop(cfg, "cpu")
    engine.run(cycle(batches), 1)
    bare.run(cycle(batches), 1)
    assert bare.first_loss == pytest.approx(engine.first_loss, rel=1e-5, abs=1e-6)
