"""What every benchmark shares: hardware and version records, timing, tables, JSON results, data preparation."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_IMAGENETTE = REPO_ROOT.parent / "shared" / "datasets" / "imagenette"
IMAGENETTE_GROUPS = REPO_ROOT / "examples" / "imagenette-groups.json"


# ---------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def hardware() -> dict[str, Any]:
    """Where the figures were measured: CPU, cores, memory, GPU, and the versions that matter."""
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "gpu": gpu_name(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for dist in ("torch", "torchvision", "ray", "mlflow", "pyarrow", "pillow", "numpy", "streamssl"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: CUDA is not available on this machine")
    return requested


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_path(name: str, device: str, out_dir: Path | None = None) -> Path:
    """bench/results/<name>-<gpu name or hostname>.json."""
    tag = gpu_name() if device.startswith("cuda") else None
    return (out_dir or RESULTS_DIR) / f"{name}-{_slug(tag or socket.gethostname())}.json"


def write_results(name: str, device: str, payload: dict[str, Any], out_dir: Path | None = None,
                  path: Path | None = None) -> Path:
    """The JSON document at `path`, by default `result_path(name, device, out_dir)`."""
    path = Path(path) if path is not None else result_path(name, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": _command(),
           "hardware": hardware(), **payload}
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return path


def _command() -> str:
    """How this process was started, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.parent == BENCH_DIR and script.suffix == ".py":
        head = f"python -m bench.{script.stem}"
    else:
        head = " ".join(sys.argv[:1])
    return " ".join([head, *sys.argv[1:]])


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """'min-max' of the repetitions, for tables."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    return f"{_fmt(float(min(values)))}-{_fmt(float(max(values)))}"


@contextmanager
def stopwatch(device: str = "cpu") -> Iterator[dict[str, float]]:
    """`with stopwatch(dev) as t: ...` then `t["s"]`; synchronises CUDA on both ends."""
    out: dict[str, float] = {}
    sync(device)
    start = time.perf_counter()
    try:
        yield out
    finally:
        sync(device)
        out["s"] = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- output


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    Console(width=max(160, 16 * len(columns) + 24)).print(table)


_TEXT_COLUMNS = {"variant", "config", "model", "line", "what", "backbone", "method", "case", "target", "where", "how", "note", "figure"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


# ---------------------------------------------------------------------------------------------- arguments


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available) [auto]")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where the JSON goes [{RESULTS_DIR}]")
    parser.add_argument("--seed", type=int, default=0)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_IMAGENETTE,
                        help=f"ImageFolder tree to prepare shards from [{DEFAULT_IMAGENETTE}]")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic generator instead of --data")
    parser.add_argument("--max-per-class", type=int, default=None,
                        help="cap on images per class and split taken from --data (keeps runs small)")
    parser.add_argument("--synthetic-train", type=int, default=2000, help="synthetic training images [2000]")
    parser.add_argument("--synthetic-size", type=int, default=128, help="side of the synthetic images [128]")
    parser.add_argument("--shard-rows", type=int, default=500, help="rows per Parquet shard [500]")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep prepared shards here and reuse them on the next run (default: a temp folder)")


# ---------------------------------------------------------------------------------------------- data


def prepare_data(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Shards for the benchmark: imagenette (or --data) through prepare_imagefolder, or the synthetic set.

    Returns {"url", "manifest", "source_root" (the ImageFolder split folder or None), "prepare_s", "reused"}.
    Shards go to --workdir when given (and are reused when the same source and settings made them), else to
    `scratch`. The source tree is read in place, never copied.
    """
    from orchestrator.data.manifest import load_manifest

    root = Path(args.workdir) if args.workdir else scratch
    if args.synthetic:
        name = f"synthetic-{args.synthetic_train}-{args.synthetic_size}-{args.shard_rows}"
    else:
        name = f"{Path(args.data).name}-{args.max_per_class or 'all'}-{args.shard_rows}"
    url = str((root / name).resolve())
    started = time.perf_counter()
    reused = False
    if (Path(url) / "manifest.json").is_file():
        manifest = load_manifest(url)
        reused = True
    elif args.synthetic:
        from orchestrator.data.synth import generate_synthetic

        manifest = generate_synthetic(url, train=args.synthetic_train, val=max(10, args.synthetic_train // 10),
                                      image_size=args.synthetic_size, seed=args.seed, shard_rows=args.shard_rows,
                                      progress=False)
    else:
        from orchestrator.data.prepare import prepare_imagefolder

        if not Path(args.data).is_dir():
            raise SystemExit(f"--data {args.data}: no such folder (or pass --synthetic)")
        groups = IMAGENETTE_GROUPS if Path(args.data).name == "imagenette" and IMAGENETTE_GROUPS.is_file() else None
        manifest = prepare_imagefolder(args.data, url, groups_file=groups, max_per_class=args.max_per_class,
                                       shard_rows=args.shard_rows, progress=False)
    source_root = None
    if not args.synthetic:
        train = Path(args.data) / "train"
        source_root = train if train.is_dir() else Path(args.data)
    return {"url": url, "manifest": manifest, "source_root": source_root, "reused": reused,
            "prepare_s": time.perf_counter() - started}


def single_chunk_plan(url: str, manifest, split: str = "train"):
    """A one-chunk instance stream over the whole split: chunk 0 = every row (what a joint pass reads)."""
    from orchestrator.data.shards import read_index
    from orchestrator.plan.streams import make_plan

    return make_plan(read_index(url, split), manifest, "instance", 1, 0)


def source_files(source_root: Path, max_per_class: int | None) -> list[tuple[str, int]]:
    """(path, label) of the ImageFolder files the shards were made from (same cap per class, same order rule)."""
    from orchestrator.data.prepare import IMAGE_EXTENSIONS

    classes = sorted(d.name for d in source_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    out = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (source_root / cls).rglob("*")
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        out.extend((str(p), label) for p in files[: max_per_class or None])
    return out


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"streamssl-bench-{prefix}-")


def init_ray(num_cpus: int) -> bool:
    """One local Ray per benchmark, as the driver starts it (no dashboard, quiet workers). Returns whether it started
    one: a benchmark shuts down only a Ray it started (a test's session Ray stays up for the tests after it)."""
    import ray

    from orchestrator.train.ray_init import local_ray_env

    if ray.is_initialized():
        return False
    # address="local": always a fresh instance of our own, never a Ray someone else started on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": local_ray_env()})
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per executed dataset otherwise
    try:  # Ray Data's progress bars would interleave with the tables
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:
        pass
    return True


def augmentation_ops(aug: Any, T: Any, solarize_threshold: float) -> list[Any]:
    """The SimCLR recipe of one AugmentConfig as torchvision transforms, from module `T` (`torchvision.transforms`
    for per-sample PIL pipelines, `torchvision.transforms.v2` for batches), without tensor conversion or
    normalisation; `solarize_threshold` is in the input's units (128 for PIL uint8, 0.5 for float tensors)."""
    from trainers.views.augment import BLUR_SIGMA, _blur_kernel_size

    ops: list[Any] = [T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio, antialias=True)]
    if aug.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(aug.flip_p))
    if aug.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)],
                                 p=aug.jitter_p))
    if aug.gray_p > 0:
        ops.append(T.RandomGrayscale(aug.gray_p))
    if aug.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(_blur_kernel_size(aug.size), sigma=BLUR_SIGMA)], p=aug.blur_p))
    if aug.solarize_p > 0:
        ops.append(T.RandomSolarize(solarize_threshold, p=aug.solarize_p))
    return ops
