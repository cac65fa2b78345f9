"""The component records: one Config per component is the source of its options, defaults and errors."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.trainers.method_helpers import SMALL_OPTIONS as SMALL
from trainers.backbones import BACKBONES, CIFAR_STEM_MAX_SIZE, build_backbone
from trainers.backbones.resnet import ResNetConfig
from trainers.config import ComponentConfig
from trainers.methods import BYOL, METHODS, BYOLConfig, SimCLR, SimCLRConfig, nt_xent_loss
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY, STRATEGY_REGISTRY, Record, Registry
from trainers.strategies import MAS, STRATEGIES, CaSSLe, Joint, JointConfig, Lump, Replay, build_strategy

ALL_RECORDS = [r for registry in (METHOD_REGISTRY, BACKBONE_REGISTRY, STRATEGY_REGISTRY) for r in registry.values()]


def _backbone(record: Record | None = None) -> torch.nn.Module:
    name = "slimmable_resnet18" if record is not None and record.slimmable else "resnet18"
    return build_backbone(name, image_size=16, width=4)


def test_registries_hold_todays_components_and_the_old_maps_are_views_of_them() -> None:
    assert METHOD_REGISTRY.names[:2] == ("simclr", "byol")  # later methods are appended
    assert BACKBONE_REGISTRY.names[:5] == ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "vit_tiny")
    assert STRATEGY_REGISTRY.names == ("sequential", "joint", "replay", "mas", "lump", "cassle")
    assert dict(METHODS) == {name: r.build for name, r in METHOD_REGISTRY.items()}
    assert METHODS["simclr"] is SimCLR and METHODS["byol"] is BYOL
    assert dict(BACKBONES) == {name: r.build for name, r in BACKBONE_REGISTRY.items()}
    assert dict(STRATEGIES) == {"sequential": STRATEGY_REGISTRY["sequential"].build, "joint": Joint,
                                "replay": Replay, "mas": MAS, "lump": Lump, "cassle": CaSSLe}
    assert METHOD_REGISTRY["simclr"].config is SimCLRConfig and METHOD_REGISTRY["byol"].config is BYOLConfig
    assert BACKBONE_REGISTRY["resnet50"].config is ResNetConfig
    for record in (METHOD_REGISTRY["simclr"], METHOD_REGISTRY["byol"]):
        assert record.needs_labels is False and record.needs_local_views is False and record.min_global_views == 2
    with pytest.raises(TypeError):
        METHODS["nosuch"] = SimCLR  # read-only: the records are the one place to add a method


def test_unknown_names_list_the_known_ones() -> None:
    assert "nosuch" not in METHOD_REGISTRY and ["x"] not in METHOD_REGISTRY and "simclr" in METHOD_REGISTRY
    with pytest.raises(KeyError, match="unknown method 'nosuch'; known: " + ", ".join(METHOD_REGISTRY.names)):
        METHOD_REGISTRY["nosuch"]
    with pytest.raises(ValueError, match="unknown backbone 'vit'; known: resnet18, resnet34, resnet50, mobilenet_v2, vit_tiny"):
        BACKBONE_REGISTRY.require("vit")
    with pytest.raises(ValueError, match="unknown strategy 'ewc'; known: sequential, joint, replay, mas, lump, cassle"):
        build_strategy("sequential+ewc")


def test_a_registry_rejects_duplicates_and_a_record_needs_a_component_config() -> None:
    record = Record("a", SimCLR, SimCLRConfig)
    with pytest.raises(ValueError, match="duplicate method record 'a'"):
        Registry("method", [record, record])
    with pytest.raises(TypeError, match="ComponentConfig"):
        Record("b", SimCLR, dict)  # type: ignore[arg-type]


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: r.name)
def test_every_option_has_a_description_and_a_valid_default(record: Record) -> None:
    assert issubclass(record.config, ComponentConfig)
    for name, info in record.config.model_fields.items():
        assert info.description and len(info.description) > 10, f"{record.name}.{name} needs a description"
    defaults = record.defaults()
    assert set(defaults) == set(record.option_names())
    assert record.options({}) == defaults == record.config.model_validate(defaults).model_dump()


@pytest.mark.parametrize("record", list(METHOD_REGISTRY.values()), ids=lambda r: r.name)
def test_constructor_keywords_and_defaults_are_the_configs(record: Record) -> None:
    # A method takes its options through its Config alone: built without options it holds the Config's defaults.
    built = record.build(_backbone(record), **SMALL.get(record.name, {}))
    assert built.config.model_dump() == record.options(SMALL.get(record.name, {}))
    assert type(built.config) is record.config


def test_simclr_built_without_options_has_the_configs_defaults() -> None:
    cfg = SimCLRConfig()
    assert (cfg.proj_hidden, cfg.proj_out, cfg.temperature) == (2048, 128, 0.1)  # Chen et al., 2020
    method = SimCLR(_backbone())
    assert method.config == cfg
    assert method.temperature == 0.1
    assert method.projector[0].out_features == 2048 and method.projector[-1].out_features == 128
    assert inspect.signature(nt_xent_loss).parameters["temperature"].default == cfg.temperature
    # The default temperature is the one the loss uses: same value as an explicit t = 0.1.
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(nt_xent_loss(z1, z2), nt_xent_loss(z1, z2, temperature=0.1))
    assert not torch.equal(nt_xent_loss(z1, z2), nt_xent_loss(z1, z2, temperature=0.5))


def test_byol_built_without_options_has_the_configs_defaults() -> None:
    cfg = BYOLConfig()
    assert (cfg.proj_hidden, cfg.proj_out, cfg.pred_hidden) == (4096, 256, 4096)  # Grill et al., 2020
    assert (cfg.base_momentum, cfg.final_momentum) == (0.99, 1.0)
    method = BYOL(_backbone())
    assert method.config == cfg
    assert (method.base_momentum, method.final_momentum) == (0.99, 1.0)
    assert method.momentum_at(0.0) == pytest.approx(0.99) and method.momentum_at(1.0) == pytest.approx(1.0)
    assert method.projector[0].out_features == 4096 and method.projector[-1].out_features == 256
    assert method.predictor[0].out_features == 4096 and method.predictor[-1].out_features == 256


def test_options_are_strict_and_errors_name_the_option() -> None:
    record = METHOD_REGISTRY["simclr"]
    assert record.options({"temperature": 1}) == {"proj_hidden": 2048, "proj_out": 128, "temperature": 1.0}
    assert isinstance(record.options({"temperature": 1})["temperature"], float)  # int for a float: fine
    with pytest.raises(ValueError, match=r"simclr: temperature: Input should be a valid number \(got '0.2'\)"):
        record.options({"temperature": "0.2"})  # a string for a float: never coerced
    with pytest.raises(ValueError, match="temperature"):
        record.options({"temperature": True})
    with pytest.raises(ValueError, match="temperature"):
        record.options({"temperature": float("inf")})
    with pytest.raises(ValueError, match="proj_hidden: Input should be a valid integer"):
        record.options({"proj_hidden": 1.5})
    with pytest.raises(ValueError, match="temprature: unknown option; allowed: proj_hidden, proj_out, temperature"):
        record.options({"temprature": 0.2})
    with pytest.raises(ValueError, match=r"final_momentum \(0.5\) must be >= base_momentum \(0.9\)"):
        METHOD_REGISTRY["byol"].options({"base_momentum": 0.9, "final_momentum": 0.5})
    # The constructor goes through the same Config: the same message, before any layer is built.
    with pytest.raises(ValueError, match="simclr: temperature: Input should be a valid number"):
        SimCLR(_backbone(), temperature="0.2")
    with pytest.raises(ValueError, match="simclr: temprature: unknown option"):
        SimCLR(_backbone(), temprature=0.2)


def test_backbone_options_come_from_the_record() -> None:
    assert BACKBONE_REGISTRY["resnet18"].defaults() == {"width": 64, "cifar_stem": None}
    # build_backbone has no option defaults of its own: every omitted option takes its record's Config default.
    assert [p.kind for p in inspect.signature(build_backbone).parameters.values()][-1] is inspect.Parameter.VAR_KEYWORD
    assert build_backbone("resnet18", image_size=CIFAR_STEM_MAX_SIZE).width == ResNetConfig().width
    assert BACKBONE_REGISTRY["mobilenet_v2"].defaults() == {"width_mult": 1.0, "cifar_stem": None}
    assert BACKBONE_REGISTRY["vit_tiny"].defaults() == {"patch_size": None}
    net = build_backbone("resnet18", image_size=CIFAR_STEM_MAX_SIZE, width=8)
    assert net.cifar_stem is True and net.width == 8 and net.out_dim == 64
    assert build_backbone("resnet50", image_size=CIFAR_STEM_MAX_SIZE + 1, width=4).cifar_stem is False
    with pytest.raises(ValueError, match="resnet18: width: Input should be greater than or equal to 4"):
        build_backbone("resnet18", image_size=32, width=2)
    with pytest.raises(ValueError, match="cifar_stem"):
        build_backbone("resnet18", image_size=32, width=8, cifar_stem="yes")


def test_strategy_options_come_from_the_record() -> None:
    assert build_strategy("joint").base == Joint(from_scratch=JointConfig().from_scratch) == Joint()
    assert build_strategy("joint", {"joint": {"from_scratch": False}}).reset_weights_at(1) is False
    assert build_strategy("joint").reset_weights_at(1) is True
    assert STRATEGY_REGISTRY["sequential"].defaults() == {}
    with pytest.raises(ValueError, match="joint: from_scrach: unknown option; allowed: from_scratch"):
        build_strategy("joint", {"joint": {"from_scrach": True}})
    with pytest.raises(ValueError, match="sequential: x: unknown option"):
        build_strategy("sequential", {"sequential": {"x": 1}})
    stack = build_strategy("sequential+replay+mas", {"replay": {"size": 10}, "mas": {"lambd": 2.0}})
    assert [s.name for s in stack.strategies] == ["sequential", "replay", "mas"] and stack.name == "sequential+replay+mas"
    assert stack.strategies[1].size == 10 and stack.strategies[2].lambd == 2.0 and stack.training_chunks(2) == [2]
    with pytest.raises(ValueError, match="exactly one base strategy"):
        build_strategy("replay+sequential")
    with pytest.raises(ValueError, match="exactly one base strategy"):
        build_strategy("sequential+joint")
    with pytest.raises(ValueError, match="listed twice"):
        build_strategy("sequential+mas+mas")
    lump = build_strategy("sequential+lump", {"lump": {"size": 30, "alpha": 0.4}}).strategies[1]
    assert (lump.size, lump.alpha, lump.policy) == (30, 0.4, "reservoir")
    with pytest.raises(ValueError, match="joint\\+lump: lump needs the base sequential, not joint"):
        build_strategy("joint+lump")
    with pytest.raises(ValueError, match="lump: alpha: Input should be greater than 0"):
        build_strategy("sequential+lump", {"lump": {"alpha": 0.0}})
    with pytest.raises(ValueError, match="joint\\+cassle: cassle needs the base sequential, not joint"):
        build_strategy("joint+cassle")
