"""The whole training input path on real JPEGs, side by side with the usual alternative, against the bare step.

    python -m bench.end_to_end                      # CPU: imagenette 40/class, 64 px, ResNet-18 w32, batch 32
    python -m bench.end_to_end --device cuda        # all of imagenette, 224 px, ResNet-18, batch 256, bf16
    python -m bench.end_to_end --device cuda --all --synthetic --steps 8 --reps 1 --variants streamssl bare
        # every registered method (on the first backbone) and every registered backbone (with the first method)
    python -m bench.end_to_end --method simclr byol --backbone resnet18 vit_tiny --cells product   # 2 x 2 cells

Variants, one process, the same model setting (bench.step_throughput.StepConfig), interleaved passes (epochs):

- ``streamssl``: imagenette shards -> ``orchestrator.data.ingest.chunk_dataset`` (Ray Data, sha256-checked reads, PIL
  decode to ``--size`` in tasks) -> ``iter_torch_batches`` as the runner's worker -> ``LineTrainer.train_chunk``
  (views on the device with ``make_views``).
- ``streamssl+device-decode``: ``data.decode: device``: JPEG bytes travel through Ray Data
  (``chunk_dataset(..., decode="device")``) and the consumer decodes each batch with the runner's
  ``DeviceBatchDecoder`` (``trainers.views.decode.decode_jpeg_batch``) before ``train_chunk``.
- ``dataloader``: the usual alternative: a torch DataLoader (N spawned workers) over the ImageFolder JPEG files
  (the Parquet shards with ``--synthetic``), PIL decode and per-sample torchvision transforms making the 2 views
  (RandomResizedCrop from the full image, flip, jitter, grayscale, blur, solarize, normalise), feeding the same
  model through ``bench.step_throughput.BareLoop``.
- ``streamssl-step``: ``train_chunk`` on pre-made uint8 batches already on the device (no input path at all).
- ``bare``: the bare loop of step_throughput on pre-made batches (the ceiling every ratio is taken against).

The ratio column is each variant's samples/s over the bare loop's, repetition by repetition. Several cells
(method x backbone) share one Ray instance and one prepared data set; a cell that fails (memory, a variant that
cannot serve the method) is recorded with its error and the others go on. The labelled methods (the supervised
baseline) get (images, labels) batches from Ray Data; the device-decode and DataLoader variants deliver no labels
and refuse them. The DataLoader variant makes the global views only (no multi-crop), so for SwAV / DINO it does
less work than the engine; `streamssl` vs `bare` compare the same work for every method.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python bench/end_to_end.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (
    add_common_arguments,
    add_data_arguments,
    init_ray,
    median,
    prepare_data,
    print_table,
    resolve_device,
    scratch_dir,
    single_chunk_plan,
    source_files,
    spread,
    sync,
    usable_cores,
    write_results,
)
from bench.step_throughput import BareLoop, StepConfig, StreamsslLoop, augment_configs, cycle, premade_batches
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY, backbone_suits

VARIANTS = ("streamssl", "streamssl+device-decode", "dataloader", "streamssl-step", "bare")
REFERENCE = "bare"


class FirstStepClock:
    """Wraps a batch iterable; remembers when the first batch arrived (time to the first step)."""

    def __init__(self, batches):
        self.batches = iter(batches)
        self.first: float | None = None

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.batches)
        if self.first is None:
            self.first = time.perf_counter()
        return item


def build_passes(args: argparse.Namespace, cfg: StepConfig, data: dict[str, Any], device: str, workers: int,
                 steps: int) -> dict[str, Callable[[int], tuple[int, float]]]:
    """variant -> (epoch -> (samples trained, seconds until the first batch was in hand))."""
    from bench.loaders import (
        FileImages,
        ShardImages,
        TwoViews,
        bytes_dataset,
        dataloader,
        device_decoded_batches,
        ray_cpu_batches,
    )
    from orchestrator.data.ingest import chunk_dataset, shard_refs

    manifest, url = data["manifest"], data["url"]
    plan = single_chunk_plan(url, manifest)
    refs = shard_refs(manifest, url, "train")
    shuffle = cfg.batch * 4
    labelled = cfg.record.needs_labels  # the supervised baseline: (images, labels) batches, as the runner's worker
    out: dict[str, Callable[[int], tuple[int, float]]] = {}

    def timed(loop_run, batches, started):
        clock = FirstStepClock(batches)
        samples = loop_run(clock, steps)
        return samples, (clock.first or float("nan")) - started

    for variant in args.variants:
        if variant == "streamssl":
            loop = StreamsslLoop(cfg, device)
            ds = chunk_dataset(refs, plan, [0], cfg.source_size, decode_cpus=args.decode_cpus)

            def run(epoch, loop=loop, ds=ds):
                started = time.perf_counter()
                return timed(loop.run, ray_cpu_batches(ds, cfg.batch, device, epoch, shuffle, labels=labelled),
                             started)
        elif variant in ("streamssl+device-decode", "dataloader") and labelled:
            raise ValueError(f"variant {variant} delivers no labels; {cfg.method} needs them (use streamssl, "
                             "streamssl-step, bare)")
        elif variant == "streamssl+device-decode":
            loop = StreamsslLoop(cfg, device)
            ds = bytes_dataset(refs, plan, [0], cfg.source_size, read_cpus=args.decode_cpus)

            def run(epoch, loop=loop, ds=ds):
                started = time.perf_counter()
                return timed(loop.run, device_decoded_batches(ds, cfg.batch, cfg.source_size, device, epoch, shuffle),
                             started)
        elif variant == "dataloader":
            bare = BareLoop(cfg, device, "v2")
            views = TwoViews(augment_configs(cfg)[0], cfg.views)
            if data["source_root"] is not None:
                dataset = FileImages(source_files(data["source_root"], args.max_per_class), views)
            else:
                dataset = ShardImages([r.url for r in refs], [r.rows for r in refs], views)
            loader = dataloader(dataset, cfg.batch, workers, pin_memory=device.startswith("cuda"), seed=args.seed)

            def run(epoch, bare=bare, loader=loader):
                started = time.perf_counter()
                clock = FirstStepClock(loader)
                samples = 0
                for i, (views_, _) in enumerate(clock):
                    if i >= steps:
                        break
                    bare.step_views([v.to(device, non_blocking=True) for v in views_], (i + 1) / steps)
                    samples += views_[0].shape[0]
                return samples, (clock.first or float("nan")) - started
        elif variant == "streamssl-step":
            loop = StreamsslLoop(cfg, device)
            premade = premade_batches(cfg, device)

            def run(epoch, loop=loop, premade=premade):
                started = time.perf_counter()
                return timed(loop.run, cycle(premade), started)
        elif variant == "bare":
            bare = BareLoop(cfg, device, "v2")
            premade = premade_batches(cfg, device)

            def run(epoch, bare=bare, premade=premade):
                started = time.perf_counter()
                return timed(bare.run, cycle(premade), started)
        else:
            raise ValueError(f"unknown variant {variant!r}")
        out[variant] = run
    return out


def cells_for(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(backbone, method) cells: the product of --backbone x --method, or with --cells cross every method on the
    first backbone and the first method on every other backbone (each method and each backbone measured once)."""
    if args.cells == "product":
        return [(b, m) for b in args.backbone for m in args.method if backbone_suits(m, b)]
    first_b, first_m = args.backbone[0], args.method[0]
    # A slimmable method (US3L) runs on the first slimmable backbone given when the first backbone is not one.
    cells = [(first_b if backbone_suits(m, first_b) else next((b for b in args.backbone if backbone_suits(m, b)),
                                                             None), m) for m in args.method]
    return [(b, m) for b, m in cells if b is not None] + [(b, first_m) for b in args.backbone[1:]
                                                           if backbone_suits(first_m, b)]


def measure_cell(args: argparse.Namespace, cfg: StepConfig, data: dict[str, Any], device: str, workers: int,
                 steps: int) -> dict[str, Any]:
    """One cold pass per variant, then --reps interleaved timed passes; per variant the medians and the ratio of
    each pass to the bare loop's pass of the same repetition."""
    passes = build_passes(args, cfg, data, device, workers, steps)
    cold: dict[str, dict[str, float]] = {}
    results: dict[str, list[dict[str, float]]] = {v: [] for v in passes}

    def one(name: str, epoch: int) -> dict[str, float]:
        sync(device)
        t0 = time.perf_counter()
        samples, first = passes[name](epoch)
        sync(device)
        took = time.perf_counter() - t0
        return {"samples": samples, "seconds": took, "first_step_s": first,
                "samples_per_s": samples / took if took > 0 else float("nan")}

    for name in passes:  # cold: Ray workers, DataLoader workers, kernels
        print(f"cold pass: {name} ...", flush=True)
        cold[name] = one(name, 0)
    names = list(passes)
    for rep in range(args.reps):
        for name in (names if rep % 2 == 0 else list(reversed(names))):
            results[name].append(one(name, rep + 1))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {results[n][-1]['samples_per_s']:.1f}/s" for n in names), flush=True)
    del passes
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        rates = [r["samples_per_s"] for r in runs]
        entry: dict[str, Any] = {"samples_per_s": rates, "median_samples_per_s": median(rates),
                                 "median_first_step_s": median([r["first_step_s"] for r in runs]),
                                 "cold": cold[name], "passes": runs}
        if REFERENCE in results:
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs, results[REFERENCE])]
            entry["ratio_vs_bare"] = ratios
            entry["median_ratio_vs_bare"] = median(ratios)
        summary[name] = entry
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="CPU-sized settings even on CUDA")
    parser.add_argument("--backbone", nargs="+", choices=BACKBONE_REGISTRY.names, default=["resnet18"],
                        help="registered backbone(s) [resnet18]")
    parser.add_argument("--method", nargs="+", choices=METHOD_REGISTRY.names, default=["simclr"],
                        help="registered method(s) [simclr]")
    parser.add_argument("--all", action="store_true",
                        help="every registered method and backbone (--cells cross unless --cells product)")
    parser.add_argument("--cells", choices=["product", "cross"], default=None,
                        help="product: every --backbone x --method; cross: every method on the first backbone and "
                             "the first method on every other backbone [product; cross with --all]")
    parser.add_argument("--size", type=int, default=None, help="decoded side = view side (224 CUDA / 64 CPU)")
    parser.add_argument("--width", type=int, default=None, help="ResNet base width (64 CUDA / 32 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch (256 CUDA / 32 CPU)")
    parser.add_argument("--small-heads", action="store_true", help="head widths of 64 (bench.steps.SMALL_HEAD)")
    parser.add_argument("--backbone-option", action="append", default=[], metavar="BACKBONE.OPTION=VALUE",
                        help="a backbone option (JSON value), applied to that backbone's cells; repeatable")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: usable cores)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray [max(4, cores)]")
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per Ray read/decode task [0.5]")
    parser.add_argument("--steps", type=int, default=None, help="steps per pass (default: one epoch)")
    parser.add_argument("--reps", type=int, default=3, help="timed passes per variant [3]")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes [bench/results/end_to_end-...]")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no cell after this many seconds from launch; later cells are recorded as "
                             "skipped (bench.gpu_suite's time budget)")
    args = parser.parse_args(argv)
    if args.all:
        args.method, args.backbone = list(METHOD_REGISTRY.names), list(BACKBONE_REGISTRY.names)
    args.cells = args.cells or ("cross" if args.all else "product")
    extra: dict[str, dict[str, Any]] = {}
    for item in args.backbone_option:
        key, _, value = item.partition("=")
        name, _, option = key.partition(".")
        if name not in BACKBONE_REGISTRY or not option or not value:
            parser.error(f"--backbone-option {item!r}: expected BACKBONE.OPTION=VALUE with a registered backbone")
        try:
            extra.setdefault(name, {})[option] = json.loads(value)
        except json.JSONDecodeError:
            extra.setdefault(name, {})[option] = value

    device = resolve_device(args.device)
    full = device.startswith("cuda") and not args.quick
    if args.max_per_class is None and not full and not args.synthetic:
        args.max_per_class = 40
    size = args.size or (224 if full else 64)
    base = StepConfig(size=size, width=args.width or (64 if full else 32), cifar_stem=None if full else False,
                      batch=args.batch or (256 if full else 32),
                      precision="bf16" if device.startswith("cuda") else "fp32",
                      channels_last=device.startswith("cuda"), small_heads=args.small_heads, backbone_extra=extra,
                      seed=args.seed)
    workers = args.workers if args.workers is not None else usable_cores()
    ray_cpus = args.ray_cpus or max(4, usable_cores())
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import ray

    started = time.perf_counter()
    cells, rows = [], []
    with scratch_dir("e2e") as scratch:
        data = prepare_data(args, Path(scratch))
        rows_n = data["manifest"].splits["train"].rows
        steps = args.steps or rows_n // base.batch
        if steps < 1 or steps * base.batch > rows_n:
            raise SystemExit(f"{rows_n} training rows is less than {max(steps, 1)} batches of {base.batch}")
        base = replace(base, log_every=min(base.log_every, steps))
        print(f"shards: {data['url']} ({rows_n} train rows, {steps} steps of {base.batch} per pass)", flush=True)
        owns_ray = init_ray(ray_cpus)  # a Ray the caller started (a test's session Ray) stays up
        try:
            for backbone, method in cells_for(args):
                cfg = replace(base, backbone=backbone, method=method)
                if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
                    note = f"skipped: past the {args.deadline_s:.0f} s deadline"
                    cells.append({"backbone": backbone, "method": method, "label": cfg.label, "status": "skipped",
                                  "note": note})
                    rows.append({"backbone": backbone, "method": method, "note": note})
                    continue
                print(f"cell {cfg.label} ...", flush=True)
                cell_started = time.perf_counter()
                try:
                    summary = measure_cell(args, cfg, data, device, workers, steps)
                except Exception as exc:  # one cell (memory, a variant without labels) must not stop the rest
                    message = f"{type(exc).__name__}: {exc}"
                    print(f"  failed: {message}", flush=True)
                    cells.append({"backbone": backbone, "method": method, "label": cfg.label, "status": "error",
                                  "error": message, "config": asdict(cfg)})
                    rows.append({"backbone": backbone, "method": method, "note": message[:100]})
                    continue
                finally:
                    gc.collect()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                cells.append({"backbone": backbone, "method": method, "label": cfg.label, "status": "ok",
                              "config": asdict(cfg), "results": summary,
                              "cell_seconds": time.perf_counter() - cell_started})
                for name, entry in summary.items():
                    rows.append({"backbone": backbone, "method": method, "variant": name,
                                 "samples/s": entry["median_samples_per_s"], "range": spread(entry["samples_per_s"]),
                                 "first step s": entry["median_first_step_s"],
                                 "cold samples/s": entry["cold"]["samples_per_s"],
                                 "cold first step s": entry["cold"]["first_step_s"],
                                 "ratio vs bare": entry.get("median_ratio_vs_bare")})
        finally:
            if owns_ray:
                ray.shutdown()
    total = time.perf_counter() - started

    print_table(f"end to end on {device}: {base.size} px, batch {base.batch}, {base.precision}, {steps} steps per pass "
                f"(median of {args.reps} interleaved passes)",
                ["backbone", "method", "variant", "samples/s", "range", "first step s", "cold samples/s",
                 "cold first step s", "ratio vs bare", "note"], rows,
                caption=f"bare = bench.step_throughput's bare loop on pre-made device batches. DataLoader: {workers} "
                        f"spawned workers; Ray: {ray_cpus} logical CPUs, {args.decode_cpus} CPU per task.")
    settings = {"device": device, "config": asdict(base), "cells": args.cells, "steps_per_pass": steps,
                "reps": args.reps, "variants": list(args.variants), "dataloader_workers": workers,
                "ray_cpus": ray_cpus, "decode_cpus": args.decode_cpus,
                "data": "synthetic" if args.synthetic else str(args.data), "max_per_class": args.max_per_class,
                "train_rows": rows_n, "prepare_s": data["prepare_s"], "wall_s": total}
    first_ok = next((c for c in cells if c["status"] == "ok"), None)
    payload = {"settings": settings, "cells": cells, "results": first_ok["results"] if first_ok else {},
               "table": rows}
    path = write_results("end_to_end", device, payload, args.out_dir, path=args.json)
    print(f"wrote {path} ({total:.0f} s)")
    return {"settings": settings, "cells": cells, "results": payload["results"], "path": str(path)}


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if any(c["status"] == "error" for c in outcome["cells"]) else 0)
