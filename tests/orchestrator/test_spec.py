"""The spec loader: valid specs load, every invalid one names its field path (and never raises anything else)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SpecError
from orchestrator.spec import Spec, apply_overrides, flatten, identity_digest, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]


def minimal() -> dict:
    return {
        "name": "t",
        "data": {"url": "memory://x"},
        "stream": {"kind": "instance", "chunks": 2},
        "lines": {"method": ["simclr"], "strategy": ["sequential"]},
    }


def documented_kinds(path: Path) -> list[str]:
    """The stream kinds an example's header runs: its `for kind in ...` loop and any `--set stream.kind=...`."""
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    kinds = [k for loop in re.findall(r"for kind in ([a-z_ ]+);", header) for k in loop.split()]
    kinds += re.findall(r"stream\.kind=([a-z_]+)", header)
    return list(dict.fromkeys(kinds))


def stand_in_data(spec: Spec, folder: Path) -> str:
    """Data for planning an example whose own data is not here: the synthetic set it makes itself, or a
    metadata-only set of its data set's shape (Imagenette: 9,469 rows, 10 classes in 4 groups; ImageNet-like
    otherwise: 1,000 classes in 67 groups, 4 domains, rows enough for its replay buffer)."""
    if spec.data.synthetic is not None:
        return str(folder / "synthetic")
    from bench.index_fixture import write_index_dataset

    if "imagenette" in spec.data.url:
        url, shape = folder / "imagenette-index", dict(rows=9469, classes=10, groups=4, domains=1)
    else:
        url, shape = folder / "imagenet-index", dict(rows=20000, classes=1000, groups=67, domains=4)
    if not (url / "manifest.json").is_file():
        write_index_dataset(str(url), **shape)
    return str(url)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_and_plan(path: Path, tmp_path_factory) -> None:
    """Every example loads, and plans (build_plan, as `streamssl run --dry-run`) for its own stream kind and every
    kind its header says to run, on its own synthetic data or a stand-in of its data set's shape."""
    from orchestrator.planner import build_plan

    spec = load_spec(path)
    assert spec.name
    assert spec.optim.batch_size % spec.resources.workers == 0
    folder = tmp_path_factory.mktemp(path.stem)
    url = stand_in_data(spec, folder)
    for kind in dict.fromkeys([spec.stream.kind, *documented_kinds(path)]):
        plan = build_plan(load_spec(path, [f"data.url={url}", f"stream.kind={kind}",
                                           f"storage.workdir={folder / 'work'}"]), progress=False)
        rows = plan.manifest.splits[spec.data.train_split].rows
        assert plan.stream.kind == kind and plan.stream.num_chunks == spec.stream.chunks
        assert sum(c.rows for c in plan.stream.chunks) == rows and min(c.rows for c in plan.stream.chunks) > 0
        assert len(plan.jobs) == len(spec.lines.method) * len(spec.lines.strategy) * spec.stream.chunks
        for job in plan.jobs:
            base = job.line.strategy.split("+")[0]
            assert job.training_chunks == (tuple(range(job.chunk + 1)) if base == "joint" else (job.chunk,))


def test_the_streaming_examples_run_the_full_protocol() -> None:
    """The study's examples: 4 chunks, MoCo-v2 and SL, ST / JT / +replay / +MAS / +MAS+, and every stream kind
    they can feed (Imagenette has one domain, so no domain stream)."""
    expected = {"streaming_imagenet": {"instance", "random_class", "distant_class", "domain"},
                "streaming_synthetic": {"instance", "random_class", "distant_class", "domain"},
                "streaming_imagenette": {"instance", "random_class", "distant_class"}}
    for name, kinds in expected.items():
        path = ROOT / "examples" / f"{name}.yaml"
        spec = load_spec(path)
        assert spec.stream.chunks == 4 and spec.lines.method == ["moco_v2", "supervised"]
        assert spec.lines.strategy == ["sequential", "joint", "sequential+replay", "sequential+mas",
                                       "sequential+replay+mas"]
        assert set(documented_kinds(path)) == kinds
    imagenet = load_spec(ROOT / "examples" / "streaming_imagenet.yaml")
    assert imagenet.data.image_size == 224 and imagenet.backbone.name == "resnet18"
    assert imagenet.data.url.startswith("s3://YOUR-BUCKET/")  # the placeholder the header says to fill
    for name in ("streaming_imagenette", "streaming_synthetic"):
        spec = load_spec(ROOT / "examples" / f"{name}.yaml")
        assert spec.data.image_size <= 64 and spec.resources.gpus_per_worker == 0


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

    from orchestrator.spec import LinesSpec
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


def test_plan_key_is_the_same_for_an_explicit_and_an_omitted_default(synthetic_url: str) -> None:
    from orchestrator.planner import build_plan

    base = {**minimal(), "data": {"url": synthetic_url}, "lines": {"method": ["simclr", "byol"], "strategy": ["joint"]}}
    omitted = build_plan(validate_spec(base), progress=False)
    explicit = build_plan(validate_spec({**base, "methods": {"byol": {"base_momentum": 0.99, "final_momentum": 1},
                                                             "simclr": {"temperature": 0.1}}}), progress=False)
    changed = build_plan(validate_spec({**base, "methods": {"byol": {"base_momentum": 0.996}}}), progress=False)
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
    from orchestrator.planner import build_plan
    from orchestrator.runner import loop_config

    base = {**minimal(), "data": {"url": synthetic_url}}  # 1200 rows in two chunks of 600
    for name in ("replay", "lump"):
        lines = {"method": ["simclr"], "strategy": [f"sequential+{name}"]}
        with pytest.raises(SpecError, match=rf"strategy\.{name}\.size: 601 rows, .* only 600 rows"):
            build_plan(validate_spec({**base, "lines": lines, "strategy": {name: {"size": 601}}}), progress=False)
        plan = build_plan(validate_spec({**base, "lines": lines, "strategy": {name: {"size": 600}}}), progress=False)
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
    from orchestrator.planner import Line
    from orchestrator.runner import loop_config
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
    from orchestrator.planner import build_plan
    from orchestrator.runner import loop_config

    raw = {**minimal(), "data": {"url": synthetic_url},
           "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "schedule": "cosine_line", "eeta": 0.01,
                     "batch_size": 64, "epochs_per_chunk": 3, "warmup_epochs": 0.5},
           "resources": {"workers": 2}}
    plan = build_plan(validate_spec(raw), progress=False)
    line = plan.lines[0]
    cfg = loop_config(plan.spec, line, False, plan)
    assert (cfg.optimizer, cfg.lr, cfg.lr_scaling, cfg.eeta, cfg.schedule) == ("lars", 0.2, "linear", 0.01,
                                                                                "cosine_line")
    assert (cfg.batch_size, cfg.global_batch) == (32, 64)
    per_epoch = [sum(plan.stream.chunks[c].rows for c in job.training_chunks) // 64 for job in plan.jobs_of(line)]
    assert per_epoch == [9, 9]  # 1200 rows in two chunks of 600, 64 a step
    assert (cfg.line_steps, cfg.line_warmup_steps) == (54, 4)
    assert loop_config(plan.spec, line, False).line_steps == 0  # without the plan (evaluation): not needed


def test_view_plan_has_global_and_local_views_with_presets() -> None:
    from orchestrator.runner import spec_view_plan

    raw = {**minimal(), "data": {"url": "memory://x", "image_size": 64},
           "views": {"preset": "byol", "global": {"count": 2, "scale": [0.2, 1.0]},
                     "local": {"count": 4, "size": 24, "scale": [0.05, 0.2]}}}
    plan = spec_view_plan(validate_spec(raw))
    assert [c.size for c in plan.global_] == [64, 64] and [c.size for c in plan.local] == [24] * 4
    assert plan.global_[0].scale == (0.2, 1.0) and plan.local[0].scale == (0.05, 0.2)
    # BYOL's asymmetric pair: the first view always blurred and never solarized, the second rarely blurred.
    assert (plan.global_[0].blur_p, plan.global_[0].solarize_p) == (1.0, 0.0)
    assert (plan.global_[1].blur_p, plan.global_[1].solarize_p) == (0.1, 0.2)
    # An explicit setting overrides the preset for every view of its set.
    raw["views"]["global"]["solarize_p"] = 0.5
    plan = spec_view_plan(validate_spec(raw))
    assert [c.solarize_p for c in plan.global_] == [0.5, 0.5]
    symmetric = spec_view_plan(validate_spec(minimal()))
    first = symmetric.global_[0]
    assert (first.scale, first.flip_p, first.jitter_p, first.brightness, first.contrast, first.saturation, first.hue,
            first.gray_p, first.blur_p, first.solarize_p) == ((0.08, 1.0), 0.5, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.5, 0.2)
    assert symmetric.local == ()
    # Local views default to 3/7 of the global side (96 at 224).
    raw = {**minimal(), "data": {"url": "memory://x", "image_size": 224}, "views": {"local": {"count": 2}}}
    assert spec_view_plan(validate_spec(raw)).local_size == 96


@pytest.mark.parametrize("views, path, says", [
    ({"local": {"count": 2, "size": 64}}, "views.local.size", "must not be larger than the global ones"),
    ({"local": {"count": 2, "scale": [0.5, 0.2]}}, "views.local.scale", "0 < low <= high <= 1"),
    ({"global": {"blur_p": 1.5}}, "views.global.blur_p", "less than or equal to 1"),
    ({"preset": "simclr_v1"}, "views.preset", "symmetric"),
    ({"global": {"count": 1}}, "views.global.count", "simclr compares 2 views"),
])
def test_view_plans_a_method_cannot_consume_are_spec_errors(views: dict, path: str, says: str) -> None:
    raw = {**minimal(), "data": {"url": "memory://x", "image_size": 32}, "views": views}
    with pytest.raises(SpecError) as info:
        validate_spec(raw)
    assert path in str(info.value) and says in str(info.value), str(info.value)


def test_methods_that_need_local_views_or_labels_are_checked_before_ray(synthetic_url: str) -> None:
    from orchestrator.planner import check_labels
    from trainers.registry import METHOD_REGISTRY

    for record in METHOD_REGISTRY.values():
        if record.needs_local_views:
            raw = {**minimal(), "lines": {"method": [record.name], "strategy": ["sequential"]}}
            with pytest.raises(SpecError, match="views.local.count must be >= 1"):
                validate_spec(raw)
        if record.needs_labels:
            spec = validate_spec({**minimal(), "lines": {"method": [record.name], "strategy": ["sequential"]}})
            import numpy as np

            with pytest.raises(SpecError, match=f"lines.method: {record.name} trains on labels, but 2 of 3 rows"):
                check_labels(spec, np.array([3, -1, -1]))


def test_local_views_can_go_to_some_methods_only() -> None:
    from orchestrator.runner import spec_view_plan

    raw = {**minimal(), "lines": {"method": ["simclr", "byol"], "strategy": ["sequential"]},
           "views": {"local": {"count": 3, "size": 16, "methods": ["byol"]}}}
    spec = validate_spec(raw)
    assert len(spec_view_plan(spec, "byol").local) == 3 and spec_view_plan(spec, "simclr").local == ()
    raw["views"]["local"]["methods"] = ["dino"]
    with pytest.raises(SpecError, match=r"views.local.methods: \['dino'\] not among lines.method"):
        validate_spec(raw)


def test_evaluators_and_stream_kinds_come_from_their_records() -> None:
    import typing

    from evaluators.registry import EVALUATOR_REGISTRY
    from orchestrator.spec import StreamSpec
    from orchestrator.streams import STREAM_REGISTRY

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
    assert spec.strategy_options("sequential+cassle") == {"cassle": {"lambd": 0.5, "hidden": 2048}}
    params = flatten(spec)
    assert params["strategy.cassle.lambd"] == "0.5" and params["strategy.cassle.hidden"] == "2048"
    with pytest.raises(SpecError, match=r"lines\.strategy\[1\]: cassle needs the base sequential, not joint"):
        validate_spec({**minimal(), "lines": {"method": ["simclr"], "strategy": ["sequential", "joint+cassle"]}})
    with pytest.raises(SpecError, match=r"strategy\.cassle\.hidden"):
        validate_spec({**minimal(), "strategy": {"cassle": {"hidden": 0}}})
