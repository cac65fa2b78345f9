"""The spec loader: valid specs load, every invalid one names its field path (and never raises anything else)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SpecError
from orchestrator.spec.experiment import Spec, apply_overrides, flatten, identity_digest, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[3]


def minimal() -> dict:
    return {
        "name": "t",
        "data": {"url": "memory://x"},
        "stream": {"kind": "instance", "chunks": 2},
        "lines": {"method": ["simclr"], "strategy": ["sequential"]},
    }


def test_defaults_and_derived_values(tmp_path: Path) -> None:
    spec = validate_spec(minimal())
    assert spec.views.global_.count == 2 and spec.views.global_.scale == (0.08, 1.0)
    assert spec.view_size == spec.data.image_size == 32
    assert spec.tracking_uri.startswith("sqlite:///") and spec.tracking_uri.endswith("streamssl-runs/mlflow.db")
    assert spec.experiment_name == "t"
    with pytest.raises(Exception):
        spec.optim.lr = 1.0  # frozen


def test_unknown_field_names_its_path() -> None:
    raw = minimal()
    raw["optim"] = {"lr": 0.1, "learning_rate": 0.2}
    with pytest.raises(SpecError) as err:
        validate_spec(raw, "my.yaml")
    assert "optim.learning_rate" in str(err.value) and "unknown field" in str(err.value)
    assert "my.yaml" in str(err.value)


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"stream": {"kind": "sideways", "chunks": 2}}, "stream.kind"),
        ({"stream": {"kind": "instance", "chunks": 0}}, "stream.chunks"),
        ({"lines": {"method": ["simclr", "simclr"], "strategy": ["joint"]}}, "lines.method"),
        ({"lines": {"method": ["nosuch"], "strategy": ["joint"]}}, "lines.method[0]"),
        ({"views": {"global": {"scale": [0.9, 0.1]}}}, "views.global.scale"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"batch_size": 3}}, "batch_size"),
        ({"methods": {"nosuch": {}}}, "methods"),
        ({"name": "has space"}, "name"),
    ],
)
def test_bad_values_name_the_field(patch: dict, path: str) -> None:
    raw = {**minimal(), **patch}
    with pytest.raises(SpecError) as err:
        validate_spec(raw)
    assert path in str(err.value)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    spec = load_spec(path, ["optim.lr=0.05", "lines.method=[simclr, byol]", "views.global.scale=[0.2, 1.0]"])
    assert spec.optim.lr == 0.05
    assert spec.lines.method == ["simclr", "byol"]
    assert spec.views.global_.scale == (0.2, 1.0)
    with pytest.raises(SpecError, match="optim.lr"):
        load_spec(path, ["optim.lr=fast"])
    with pytest.raises(SpecError, match="key=value"):
        load_spec(path, ["optim.lr"])
    with pytest.raises(SpecError, match="is not a section"):
        apply_overrides(minimal(), ["name.x=1"])


def test_missing_empty_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "list.yaml")


def test_flatten_redacts_secrets_and_is_stable() -> None:
    raw = minimal()
    raw["data"]["storage_options"] = {"key": "AKIA-SECRET", "secret": "shh", "client_kwargs": {"endpoint_url": "http://h"}}
    spec = validate_spec(raw)
    params = flatten(spec)
    joined = " ".join(f"{k}={v}" for k, v in params.items())
    assert "AKIA-SECRET" not in joined and "shh" not in joined
    assert params["data.storage_options.key"] == "***"
    assert params["data.storage_options.client_kwargs.endpoint_url"] == "http://h"
    assert params["optim.lr"] == "0.3"
    expected = (set(flatten(validate_spec(minimal()))) - {"data.storage_options"}) | {
        "data.storage_options.key", "data.storage_options.secret", "data.storage_options.client_kwargs.endpoint_url"
    }
    assert set(params) == expected


def test_identity_ignores_where_things_are_stored() -> None:
    a = validate_spec(minimal())
    b = validate_spec({**minimal(), "tracking": {"uri": "http://127.0.0.1:1"}, "storage": {"workdir": "/elsewhere"}})
    c = validate_spec({**minimal(), "optim": {"lr": 0.01}})
    assert identity_digest(a) == identity_digest(b) != identity_digest(c)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
field_names = st.sampled_from(["name", "data", "stream", "lines", "optim", "views", "eval", "resources", "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values, max_size=6))
def test_fuzzed_specs_fail_only_with_spec_errors(raw: dict) -> None:
    spec = {**minimal(), **raw}
    try:
        result = validate_spec(spec)
    except SpecError as exc:
        message = str(exc)
        assert "invalid spec" in message or "mapping" in message
        assert "Traceback" not in message
    else:
        assert isinstance(result, Spec)


# --- per-component options from the records in trainers.registry (issue 9, item 2) -------------------------------


@pytest.mark.parametrize(
    "methods, path, says",
    [
        ({"simclr": {"temprature": 0.2}}, "methods.simclr.temprature",
         "unknown option of simclr; allowed: proj_hidden, proj_out, temperature"),
        ({"simclr": {"temperature": "0.2"}}, "methods.simclr.temperature", "valid number (got '0.2')"),
        ({"simclr": {"temperature": 0}}, "methods.simclr.temperature", "greater than 0"),
        ({"simclr": {"proj_hidden": 1.5}}, "methods.simclr.proj_hidden", "valid integer (got 1.5)"),
        ({"simclr": {"proj_out": True}}, "methods.simclr.proj_out", "valid integer"),
        ({"simclr": 3}, "methods.simclr", "expected a mapping"),
        ({"byol": {"base_momentum": 1.5}}, "methods.byol.base_momentum", "less than or equal to 1"),
        ({"byol": {"base_momentum": 0.9, "final_momentum": 0.5}}, "methods.byol",
         "final_momentum (0.5) must be >= base_momentum (0.9)"),
        ({"nosuch": {}}, "methods.nosuch", "unknown method; known: simclr, byol"),
    ],
)
def test_method_options_are_checked_against_the_methods_config(methods: dict, path: str, says: str) -> None:
    with pytest.raises(SpecError) as err:
        validate_spec({**minimal(), "methods": methods}, "s.yaml")
    line = next(l for l in str(err.value).splitlines() if l.strip().startswith(path + ":"))
    assert says in line, line


def test_a_mistyped_option_on_the_command_line_fails_in_load_spec(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(SpecError, match=r"methods\.simclr\.temprature: unknown option of simclr; allowed: "):
        load_spec(path, ["methods.simclr.temprature=0.2"])
    assert load_spec(path, ["methods.simclr.temperature=0.2"]).methods["simclr"]["temperature"] == 0.2


def test_allowed_names_come_from_the_registry() -> None:
    import typing

    from orchestrator.spec.experiment import LinesSpec
    from trainers.registry import METHOD_REGISTRY, STRATEGY_REGISTRY

    method_item = typing.get_args(LinesSpec.model_fields["method"].annotation)[0]
    assert typing.get_args(method_item) == METHOD_REGISTRY.names
    known = ", ".join(STRATEGY_REGISTRY.names)
    with pytest.raises(SpecError, match=rf"lines\.strategy: .*lines\.strategy\[1\]: unknown strategy 'ewc'; known: {known}"):
        validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["sequential", ["sequential", "ewc"]]}})
    raw = {**minimal(), "lines": {"method": ["nosuch"], "strategy": ["sequential"]}}
    with pytest.raises(SpecError, match=r"lines\.method\[0\]: Input should be 'simclr', 'byol'.* \(got 'nosuch'\)"):
        validate_spec(raw)


def _tiny_backbone():
    from trainers.backbones import build_backbone

    return build_backbone("resnet18", image_size=16, width=4)


def test_method_options_are_plain_dicts_with_every_default_filled_in() -> None:
    from trainers.methods import METHODS
    from trainers.registry import METHOD_REGISTRY

    spec = validate_spec({**minimal(), "lines": {"method": ["simclr", "byol"], "strategy": ["joint"]},
                          "methods": {"simclr": {"temperature": 1}, "byol": None}})
    assert spec.methods == {
        "simclr": {"proj_hidden": 2048, "proj_out": 128, "temperature": 1.0},
        "byol": METHOD_REGISTRY["byol"].defaults(),
    }
    assert type(spec.methods) is dict and all(type(v) is dict for v in spec.methods.values())
    # What the runner hands the workers, and what the loop then calls, unchanged.
    options = dict(spec.methods.get("simclr", {}))
    method = METHODS["simclr"](_tiny_backbone(), **options)
    assert method.temperature == 1.0 and method.projector[0].out_features == 2048
    assert validate_spec(spec.model_dump(mode="json", by_alias=True)) == spec  # the staged spec.yaml round-trips


def test_explicit_and_omitted_defaults_flatten_and_hash_alike() -> None:
    omitted = validate_spec(minimal())
    explicit = validate_spec({**minimal(), "methods": {"simclr": {"temperature": 0.1, "proj_out": 128}}})
    changed = validate_spec({**minimal(), "methods": {"simclr": {"temperature": 0.2}}})
    params = flatten(omitted)
    assert params == flatten(explicit)
    assert {k: v for k, v in params.items() if k.startswith("methods.")} == {
        "methods.simclr.proj_hidden": "2048", "methods.simclr.proj_out": "128", "methods.simclr.temperature": "0.1",
    }
    assert identity_digest(omitted) == identity_digest(explicit) != identity_digest(changed)
    assert flatten(changed)["methods.simclr.temperature"] == "0.2"
    # Options of a method no line trains are validated and kept, but change no number: not recorded, not hashed.
    unused = validate_spec({**minimal(), "methods": {"byol": {"base_momentum": 0.9}}})
    assert unused.methods["byol"]["base_momentum"] == 0.9
    assert flatten(unused) == params and identity_digest(unused) == identity_digest(omitted)
    with pytest.raises(SpecError, match=r"methods\.byol\.base_momentun"):
        validate_spec({**minimal(), "methods": {"byol": {"base_momentun": 0.9}}})


def test_eval_widths_is_hashed_only_when_set_and_checked() -> None:
    omitted = validate_spec(minimal())
    null = validate_spec({**minimal(), "eval": {"widths": None}})
    set_ = validate_spec({**minimal(), "eval": {"widths": [1.0, 0.5, 0.25]}})
    assert omitted.eval.widths is None and set_.eval.widths == [1.0, 0.5, 0.25]
    # unset: the plan key and params of a spec written before the option existed
    assert identity_digest(omitted) == identity_digest(null) != identity_digest(set_)
    assert "eval.widths" not in flatten(omitted) and flatten(set_)["eval.widths"] == "[1.0, 0.5, 0.25]"
    for bad, why in (([1.0, 0.2], r"\[0\.25, 1\.0\]"), ([0.5, 0.5], "distinct"), ([], "at least 1")):
        with pytest.raises(SpecError, match=r"eval\.widths") as caught:
            validate_spec({**minimal(), "eval": {"widths": bad}})
        assert caught.match(why)


def test_plan_key_is_the_same_for_an_explicit_and_an_omitted_default(synthetic_url: str) -> None:
    from orchestrator.plan.planner import build_plan

    base = {**minimal(), "data": {"url": synthetic_url}, "lines": {"method": ["simclr", "byol"], "strategy": ["joint"]}}
    omitted = build_plan(validate_spec(base))
    explicit = build_plan(validate_spec({**base, "methods": {"byol": {"base_momentum": 0.99, "final_momentum": 1},
                                                             "simclr": {"temperature": 0.1}}}))
    changed = build_plan(validate_spec({**base, "methods": {"byol": {"base_momentum": 0.996}}}))
    assert omitted.key == explicit.key != changed.key
    assert [j.key for j in omitted.jobs] == [j.key for j in explicit.jobs]
    assert not {j.key for j in omitted.jobs} & {j.key for j in changed.jobs}


def test_lump_lines_validate_their_options_and_compose_with_sequential_only() -> None:
    spec = validate_spec({**minimal(), "lines": {"method": ["simclr", "supervised"],
                                                 "strategy": ["sequential+lump", ["sequential", "replay", "lump"]]},
                          "strategy": {"lump": {"size": 300, "alpha": 0.4}}})
    assert spec.lines.strategy == ["sequential+lump", "sequential+replay+lump"]
    assert spec.strategy_options("sequential+lump") == {
        "lump": {"size": 300, "alpha": 0.4, "policy": "reservoir", "seed": 0}}
    assert flatten(spec)["strategy.lump.alpha"] == "0.4"
    with pytest.raises(SpecError, match=r"lines\.strategy\[0\]: lump needs the base sequential, not joint"):
        validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["joint+lump"]}})
    for options, path in [({"lump": {"alpha": 0}}, r"strategy\.lump\.alpha"),
                          ({"lump": {"size": 0}}, r"strategy\.lump\.size"),
                          ({"lump": {"mixup": 1}}, r"strategy\.lump\.mixup")]:
        with pytest.raises(SpecError, match=path):
            validate_spec({**minimal(), "strategy": options})


def test_a_buffer_larger_than_the_rows_before_the_last_chunk_is_refused(synthetic_url: str) -> None:
    from orchestrator.plan.planner import build_plan
    from orchestrator.train.runner import loop_config

    base = {**minimal(), "data": {"url": synthetic_url}}  # 1200 rows in two chunks of 600
    for name in ("replay", "lump"):
        lines = {"method": ["simclr"], "strategy": [f"sequential+{name}"]}
        with pytest.raises(SpecError, match=rf"strategy\.{name}\.size: 601 rows, .* only 600 rows"):
            build_plan(validate_spec({**base, "lines": lines, "strategy": {name: {"size": 601}}}))
        plan = build_plan(validate_spec({**base, "lines": lines, "strategy": {name: {"size": 600}}}))
        assert loop_config(plan.spec, plan.lines[0], False, plan).strategy_options[name]["size"] == 600


def test_backbone_section_is_discriminated_on_name() -> None:
    assert validate_spec(minimal()).backbone.name == "resnet18"
    spec = validate_spec({**minimal(), "backbone": {"name": "resnet50", "width": 8}})
    assert (spec.backbone.name, spec.backbone.width, spec.backbone.cifar_stem) == ("resnet50", 8, None)
    assert validate_spec({**minimal(), "backbone": {"width": 16}}).backbone.name == "resnet18"
    with pytest.raises(Exception):
        spec.backbone.width = 4  # frozen like every section
    cases = [
        ({"name": "vit"}, "  backbone: unknown backbone; known: resnet18, resnet34, resnet50, mobilenet_v2, vit_tiny"),
        ({"name": "vit_tiny", "width": 8}, "  backbone.width: unknown field; allowed: patch_size, name"),
        ({"widht": 8}, "  backbone.widht: unknown field; allowed: width, cifar_stem, name"),
        ({"name": "resnet50", "width": "8"}, "  backbone.width: Input should be a valid integer (got '8')"),
        ({"width": 2}, "  backbone.width: Input should be greater than or equal to 4"),
    ]
    for section, line in cases:
        with pytest.raises(SpecError) as err:
            validate_spec({**minimal(), "backbone": section})
        assert any(l.startswith(line) for l in str(err.value).splitlines()), str(err.value)


def test_backbone_options_reach_the_workers_and_flatten_with_defaults() -> None:
    from orchestrator.plan.planner import Line
    from orchestrator.train.runner import loop_config
    from trainers.backbones import build_backbone

    spec = validate_spec({**minimal(), "backbone": {"name": "mobilenet_v2", "width_mult": 0.5}})
    assert {k: v for k, v in flatten(spec).items() if k.startswith("backbone.")} == {
        "backbone.name": "mobilenet_v2", "backbone.width_mult": "0.5", "backbone.cifar_stem": "None",
    }
    line = Line(method="simclr", strategy="sequential")
    config = loop_config(spec, line, use_gpu=False)
    assert (config.backbone, config.resolved_backbone_options()) == (
        "mobilenet_v2", {"width_mult": 0.5, "cifar_stem": None},
    )
    vit = validate_spec({**minimal(), "backbone": {"name": "vit_tiny", "patch_size": 8}})
    config = loop_config(vit, line, use_gpu=False)
    assert build_backbone(config.backbone, config.image_size, **config.resolved_backbone_options()).patch_size == 8


def test_a_vit_patch_that_does_not_divide_the_images_is_a_spec_error_naming_it() -> None:
    assert validate_spec({**minimal(), "backbone": {"name": "vit_tiny"}}).backbone.patch_size is None  # 4 at 32 px
    cases = [
        ({"name": "vit_tiny", "patch_size": 12}, {}, {},
         "  backbone.patch_size: 12 does not divide the image side 32 px (data.image_size 32, views.global.size 32)"),
        ({"name": "vit_tiny", "patch_size": 8}, {}, {"global": {"size": 36}},
         "  backbone.patch_size: 8 does not divide the image side 36 px (data.image_size 32, views.global.size 36)"),
        ({"name": "vit_tiny"}, {"image_size": 30}, {},
         "  backbone.patch_size: 4 does not divide the image side 30 px; 4 is the default at 30 px"),
    ]
    for backbone, data, views, line in cases:
        raw = {**minimal(), "backbone": backbone, "views": views}
        raw["data"] = {**raw["data"], **data}
        with pytest.raises(SpecError) as err:
            validate_spec(raw)
        assert any(l.startswith(line) for l in str(err.value).splitlines()), str(err.value)
    # A ResNet takes any size; an explicit patch that divides both sizes passes.
    validate_spec({**minimal(), "backbone": {"name": "resnet34"}, "views": {"global": {"size": 36}}})
    validate_spec({**minimal(), "backbone": {"name": "vit_tiny", "patch_size": 8}, "views": {"global": {"size": 48}}})


def test_strategy_options_come_from_the_strategy_records() -> None:
    from trainers.strategies import JointConfig

    spec = validate_spec(minimal())
    assert spec.strategy.joint == JointConfig() and spec.strategy.joint.model_dump() == {"from_scratch": True}
    assert "strategy.joint.from_scratch" not in flatten(spec)  # minimal() trains no joint line
    joint = validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["sequential", "joint"]}})
    assert flatten(joint)["strategy.joint.from_scratch"] == "True"
    with pytest.raises(SpecError, match=r"strategy\.joint\.from_scrach: unknown field; allowed: from_scratch"):
        validate_spec({**minimal(), "strategy": {"joint": {"from_scrach": False}}})
    with pytest.raises(SpecError, match=r"strategy\.joint\.from_scratch: Input should be a valid boolean"):
        validate_spec({**minimal(), "strategy": {"joint": {"from_scratch": "no"}}})


def test_optim_section_offers_lars_the_scaling_rule_and_a_line_schedule() -> None:
    optim = validate_spec(minimal()).optim
    assert (optim.name, optim.lr_scaling, optim.schedule, optim.eeta) == ("sgd", "none", "cosine", 0.001)
    spec = validate_spec({**minimal(), "optim": {"name": "lars", "lr_scaling": "linear", "schedule": "cosine_line",
                                                 "eeta": 0.02}})
    assert (spec.optim.name, spec.optim.lr_scaling, spec.optim.schedule, spec.optim.eeta) == (
        "lars", "linear", "cosine_line", 0.02)
    assert flatten(spec)["optim.eeta"] == "0.02" and flatten(spec)["optim.lr_scaling"] == "linear"
    for field, value in [("name", "adam"), ("lr_scaling", "sqrt"), ("schedule", "step"), ("eeta", 0)]:
        with pytest.raises(SpecError, match=rf"optim\.{field}"):
            validate_spec({**minimal(), "optim": {field: value}})
    joint = {**minimal(), "lines": {"method": ["simclr"], "strategy": ["joint"]}, "optim": {"schedule": "cosine_line"}}
    with pytest.raises(SpecError, match="cosine_line"):
        validate_spec(joint)
    assert validate_spec({**joint, "strategy": {"joint": {"from_scratch": False}}}).optim.schedule == "cosine_line"


def test_loop_config_carries_the_optimiser_and_the_lines_length(synthetic_url: str) -> None:
    from orchestrator.plan.planner import build_plan
    from orchestrator.train.runner import loop_config

    raw = {**minimal(), "data": {"url": synthetic_url},
           "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "schedule": "cosine_line", "eeta": 0.01,
                     "batch_size": 64, "epochs_per_chunk": 3, "warmup_epochs": 0.5},
           "resources": {"workers": 2}}
    plan = build_plan(validate_spec(raw))
    line = plan.lines[0]
    cfg = loop_config(plan.spec, line, False, plan)
    assert (cfg.optimizer, cfg.lr, cfg.lr_scaling, cfg.eeta, cfg.schedule) == ("lars", 0.2, "linear", 0.01,
                                                                                "cosine_line")
    assert (cfg.batch_size, cfg.global_batch) == (32, 64)
    per_epoch = [sum(plan.stream.chunks[c].rows for c in job.training_chunks) // 64 for job in plan.jobs_of(line)]
    assert per_epoch == [9, 9]  # 1200 rows in two chunks of 600, 64 a step
    assert (cfg.line_steps, cfg.line_warmup_steps) == (54, 4)
    assert loop_config(plan.spec, line, False).line_steps == 0  # without the plan (evaluation): not needed


def test_evaluators_and_stream_kinds_come_from_their_records() -> None:
    import typing

    from evaluators.registry import EVALUATOR_REGISTRY
    from orchestrator.plan.streams import STREAM_REGISTRY
    from orchestrator.spec.experiment import StreamSpec

    assert typing.get_args(StreamSpec.model_fields["kind"].annotation) == STREAM_REGISTRY.names
    spec = validate_spec(minimal())
    assert spec.eval.every_chunk == list(EVALUATOR_REGISTRY.names) == ["knn", "linear"]
    params = flatten(spec)
    assert {k: v for k, v in params.items() if k.startswith(("eval.knn.", "eval.linear."))} == {
        "eval.knn.k": "20", "eval.knn.temperature": "0.07", "eval.linear.epochs": "100", "eval.linear.lr": "0.1",
        "eval.linear.weight_decay": "0.0001", "eval.linear.batch_size": "256",
    }
    explicit = validate_spec({**minimal(), "eval": {"knn": {"k": 20}, "linear": None}})
    assert flatten(explicit) == params and identity_digest(explicit) == identity_digest(spec)
    assert validate_spec({**minimal(), "eval": {"knn": {"k": 200}}}).eval.knn.k == 200
    with pytest.raises(SpecError, match=r"eval\.knn\.kk"):
        validate_spec({**minimal(), "eval": {"knn": {"kk": 5}}})
    with pytest.raises(SpecError, match=r"eval\.linear\.epochs: .*got '5'"):
        validate_spec({**minimal(), "eval": {"linear": {"epochs": "5"}}})
    with pytest.raises(SpecError, match=r"eval\.every_chunk\[0\]: Input should be 'knn' or 'linear'"):
        validate_spec({**minimal(), "eval": {"every_chunk": ["fewshot"]}})
    with pytest.raises(SpecError, match=r"stream\.kind: Input should be 'instance', 'random_class'"):
        validate_spec({**minimal(), "stream": {"kind": "online_class", "chunks": 2}})


def test_a_slimmable_method_needs_a_slimmable_backbone_naming_the_field() -> None:
    lines = {"method": ["us3l"], "strategy": ["sequential"]}
    with pytest.raises(SpecError, match=r"backbone\.name: method 'us3l' trains a slimmable network .* got 'resnet18'"):
        validate_spec({**minimal(), "lines": lines})
    spec = validate_spec({**minimal(), "lines": lines, "backbone": {"name": "slimmable_resnet18", "width": 8}})
    assert spec.backbone.name == "slimmable_resnet18" and "us3l" in spec.methods
