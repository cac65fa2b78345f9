"""The runnable examples: each loads and plans every stream kind its header runs; the study's examples hold the
full protocol."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.spec.experiment import Spec, load_spec

ROOT = Path(__file__).resolve().parents[2]


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
    from orchestrator.data.materialise import materialise
    from orchestrator.plan.planner import build_plan

    spec = load_spec(path)
    assert spec.name
    assert spec.optim.batch_size % spec.resources.workers == 0
    folder = tmp_path_factory.mktemp(path.stem)
    url = stand_in_data(spec, folder)
    for kind in dict.fromkeys([spec.stream.kind, *documented_kinds(path)]):
        spec_of_kind = load_spec(path, [f"data.url={url}", f"stream.kind={kind}", f"storage.workdir={folder / 'work'}"])
        materialise(spec_of_kind, progress=False)  # `streamssl run`'s data step (the synthetic examples' own set)
        plan = build_plan(spec_of_kind)
        rows = plan.manifest.splits[spec.data.train_split].rows
        assert plan.stream.kind == kind and plan.stream.num_chunks == spec.stream.chunks
        assert sum(c.rows for c in plan.stream.chunks) == rows and min(c.rows for c in plan.stream.chunks) > 0
        lines = len(spec.lines.method) * len(spec.lines.strategy)
        if kind == "online":  # one job a line: the whole stream, every task
            assert [j.training_chunks for j in plan.jobs] == [tuple(range(spec.stream.chunks))] * lines
            continue
        assert len(plan.jobs) == lines * spec.stream.chunks
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


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_sweep_examples_have_a_valid_space(path: Path) -> None:
    """A sweep example's space passes the same checks `streamssl sweep` makes before its first trial."""
    from orchestrator.spec.experiment import read_raw
    from orchestrator.sweep.space import check_space, sample_points

    raw = read_raw(path)
    spec = load_spec(path)
    assert spec.sweep is not None
    check_space(raw, spec.sweep, str(path))
    if spec.sweep.search != "optuna":
        assert len(sample_points(spec.sweep)) == spec.sweep.trial_count


def test_the_view_recipe_examples_hold_the_low_compute_study() -> None:
    """The low-compute study's view settings (Tan et al., ICLR 2023, SSLight): the CNN recipe against the usual
    baseline, and the ViT-Tiny baseline, each for MoCo-v2 (symmetric, so it takes the local views), SwAV and DINO;
    the MobileNetV2 runs their headers give load too."""
    expected = {"views_lowcompute_cnn": ((0.3, 1.0), (0.05, 0.3), 0.6, "resnet18"),
                "views_baseline_cnn": ((0.14, 1.0), (0.05, 0.14), None, "resnet18"),
                "views_baseline_vit": ((0.25, 1.0), (0.05, 0.25), None, "vit_tiny")}
    for name, (global_scale, local_scale, weight, backbone) in expected.items():
        path = ROOT / "examples" / f"{name}.yaml"
        spec = load_spec(path)
        assert spec.lines.method == ["moco_v2", "swav", "dino"] and spec.methods["moco_v2"]["symmetric"]
        assert (spec.views.global_.count, spec.views.local.count) == (2, 6)
        assert spec.views.global_.scale == global_scale and spec.views.local.scale == local_scale
        assert spec.views.local.loss_weight == weight and spec.backbone.name == backbone
        assert spec.data.image_size <= 64 and spec.resources.gpus_per_worker == 0
        for override in re.findall(r"--set '(backbone=\{[^']*\})'", path.read_text()):
            assert load_spec(path, [override]).backbone.name == "mobilenet_v2"
    # The local sides keep the papers' ratio to the global side: 128 / 224 (recipe) and 96 / 224 (baselines).
    for name, ratio in (("views_lowcompute_cnn", 128 / 224), ("views_baseline_cnn", 96 / 224)):
        spec = load_spec(ROOT / "examples" / f"{name}.yaml")
        assert abs(spec.local_view_size - spec.view_size * ratio) <= 1


STUDIES = {"study_streaming_imagenette": "streaming (Hu et al. 2022)",
           "study_online_imagenette": "online (Mokhtarzadeh Azar & Timofte)",
           "study_views_imagenette": "low-compute views (Tan et al. 2023)"}


def header_runs(path: Path) -> list[tuple[Path, list[str]]]:
    """(spec, --set overrides) of every `streamssl run` its header gives, the shell loops expanded ($s, $kind, $net,
    and variables set in the header such as $USUAL)."""
    import shlex

    header = [line.lstrip("# ").rstrip() for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    loops = {name: shlex.split(values) for name, values in re.findall(r"for (\w+) in (.+?); do", text)}
    variables = dict(re.findall(r"^(\w+)=\"([^\"]*)\"$", text, flags=re.M))
    runs = []
    for line in header:
        if not line.startswith("streamssl run "):
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        expansions = [{}]
        for name, values in loops.items():
            if f"${name}" in line:
                expansions = [{**e, name: v} for e in expansions for v in values]
        for expansion in expansions:
            words = line
            for name, value in expansion.items():
                words = words.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
            args = shlex.split(words)
            sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
            runs.append((ROOT / args[2], sets))
    return runs


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_a_study_spec_runs_every_arm_of_its_claims_over_3_seeds(name: str) -> None:
    """Every line its findings compare (orchestrator.report.claims) is made by a run its header gives, for seeds 0, 1
    and 2 (a seed loop), except the claims that need an evaluation streamssl lacks."""
    from orchestrator.report.claims import CLAIMS
    from orchestrator.spec.experiment import flatten

    path = ROOT / "examples" / f"{name}.yaml"
    assert re.search(r"for s in 0 1 2; do", path.read_text()) and "--set seed=$s" in path.read_text()
    made = []  # (stream kind, line ids, params) of each run the header gives
    for spec_path, sets in header_runs(path):
        spec = load_spec(spec_path, sets)
        assert spec.name == load_spec(path).name, (spec_path, sets)  # one experiment for the whole study
        lines = {"-".join([m, *s.split("+")]) for m in spec.lines.method for s in spec.lines.strategy}
        made.append((spec.stream.kind, lines, flatten(spec)))
    claims = [c for c in CLAIMS if c.study == STUDIES[name] and not c.needs]
    assert claims
    for claim in claims:
        for arm in claim.arms:
            assert any(kind == arm.stream and arm.line in lines and all(params.get(k) == v for k, v in arm.params)
                       for kind, lines, params in made), (claim.id, arm.describe())
