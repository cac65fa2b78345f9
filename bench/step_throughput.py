"""The engine's training step against a bare PyTorch loop, for every registered method x every backbone.

    python -m bench.step_throughput --quick               # CPU, ~2-4 min: 32 px, batch 32, 5 steps, small heads,
                                                          # ResNet-18/w16 and ResNet-50/w16, every registered method
    python -m bench.step_throughput                       # every method x every backbone (CPU: 32 px, batch 32, fp32)
    python -m bench.step_throughput --device cuda         # the same matrix at 224 px, batch 256, bf16, channels_last
    python -m bench.step_throughput --device cuda --gpu-suite      # anchors, then every method x backbone
    python -m bench.step_throughput --device cpu --gpu-suite --size 32 --batch 8 --steps 2   # its CPU smoke check

Methods come from `trainers.registry.METHOD_REGISTRY` and backbones from `BACKBONE_REGISTRY`, so a method
registered later is measured without touching this file. Two loops per cell, built from one `bench.steps.StepConfig`
(same seeded weights, same views generator, same batches, precision, memory format, SGD over the method's param
groups), fed the same 4 pre-made uint8 batches already on the device (labels where the record needs them):

- ``engine``: ``trainers.engine.loop.LineTrainer.train_chunk``: the view plan (global + local views where the record
  needs them), ``train_step`` (hooks, EMA of ``momentum_pairs`` by ``torch._foreach_lerp_``), cosine LR per step, a
  loss kept per step, an ``on_step`` callback and NaN check every ``log_every`` steps and at the chunk's end.
- ``bare``: ``bench.steps.BareLoop``, what a researcher would hand-roll: ``trainers.views.augment.make_views``, the method's
  ``training_step`` called directly, backward, the method's own hooks, ``optimizer.step()``, a per-parameter EMA
  for methods with ``momentum_pairs``, ``loss.item()`` every ``log_every`` steps, constant LR.
- ``bare-v2`` (only with ``--variants``): the bare loop with ``torchvision.transforms.v2`` views (one draw per batch).

Both loops' first step sees the same weights and views, so their first losses must agree (``same first loss`` in
the table: a check that the bare loop does the engine's work). Per cell: ``--warmup`` untimed steps per loop, then
``--reps`` repetitions of ``--steps`` steps, the order alternating (engine, bare / bare, engine) so drift cancels;
a repetition's ratio is engine / bare of that repetition and the table shows medians. On CPU a repetition's
figure is batch / its median step time (a shared machine's bursts hit single steps); on CUDA samples / wall time
(steps are queued asynchronously), CUDA-synchronised at both ends. Both are in the JSON, which goes to
``bench/results/step_throughput[-quick|-gpu-suite]-<gpu or hostname>.json`` (``--json`` to choose).
Target: engine >= 0.95 x bare.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable

if __package__ in (None, ""):  # `python bench/step_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (
    add_common_arguments,
    median,
    print_table,
    resolve_device,
    result_path,
    spread,
    sync,
    write_results,
)

# StreamsslLoop, augment_configs, loop_config: re-exported for bench.end_to_end and bench.overheads.
from bench.steps import (  # noqa: F401
    BareLoop,
    EngineLoop,
    StepConfig,
    StreamsslLoop,
    augment_configs,
    backbone_options,
    cycle,
    loop_config,
    method_options,
    premade_batches,
    view_plan_for,
)
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY, backbone_suits

VARIANTS = ("engine", "bare", "bare-v2")
# The performance goal's bare-loop anchors (224 px, bf16, channels_last, batch 256 on an H100): the cells whose
# engine / bare ratio the goal states. MobileNetV2 and ViT-Tiny are named without a method: SimCLR, the reference
# method of the other rows. --gpu-suite measures these first (bench.gpu_suite with more repetitions), then every
# other registered method x registered backbone.
ANCHORS: tuple[tuple[str, str], ...] = (
    ("resnet18", "simclr"), ("resnet18", "byol"), ("resnet50", "simclr"), ("resnet50", "byol"),
    ("mobilenet_v2", "simclr"), ("vit_tiny", "simclr"),
)


def gpu_suite_cells() -> list[tuple[str, str | None, str]]:
    """(backbone, method or None, note): the anchors first, then every registered method x backbone not yet listed.

    An anchor whose backbone or method is not registered in this checkout is listed with method None and a note
    (reported as skipped); everything else comes from the registries, so a method registered later is measured."""
    out, seen = [], set()
    for backbone, method in ANCHORS:
        missing = [n for n, reg in ((backbone, BACKBONE_REGISTRY), (method, METHOD_REGISTRY)) if n not in reg]
        out.append((backbone, None if missing else method,
                    f"{'/'.join(missing)} not registered in this checkout" if missing else "anchor"))
        seen.add((backbone, method))
    out += [(b, m, "") for b in BACKBONE_REGISTRY.names for m in METHOD_REGISTRY.names
            if (b, m) not in seen and backbone_suits(m, b)]  # a slimmable method only on slimmable backbones
    return out


QUICK_BACKBONES = ("resnet18", "resnet50")  # at width 16: a BasicBlock and a Bottleneck network


def make_runner(variant: str, cfg: StepConfig, device: str):
    if variant == "engine":
        return EngineLoop(cfg, device)
    if variant == "bare":
        return BareLoop(cfg, device, "make_views")
    if variant == "bare-v2":
        return BareLoop(cfg, device, "v2")
    raise ValueError(f"unknown variant {variant!r}")


class StampedIterator:
    """Wraps a batch iterator and records perf_counter() at every next(): consecutive stamps bracket one step."""

    def __init__(self, batches: Iterable[Any]):
        self.batches = iter(batches)
        self.stamps: list[float] = []

    def __iter__(self) -> "StampedIterator":
        return self

    def __next__(self) -> Any:
        self.stamps.append(time.perf_counter())
        return next(self.batches)


def measure_config(cfg: StepConfig, device: str, steps: int, warmup: int, reps: int,
                   variants: tuple[str, ...] = ("engine", "bare")) -> dict[str, Any]:
    """Interleaved repetitions of every variant; samples/s per repetition, ratios paired by repetition."""
    cuda = device.startswith("cuda")
    data = premade_batches(cfg, device)
    runners = {v: make_runner(v, cfg, device) for v in variants}
    first_loss = {}
    for v, runner in runners.items():  # warm-up: kernels, cuDNN plans, allocator; the first step's loss
        runner.run(cycle(data), max(1, warmup))
        first_loss[v] = runner.first_loss
    sync(device)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    by_step: dict[str, list[float]] = {v: [] for v in variants}
    step_s: dict[str, list[list[float]]] = {v: [] for v in variants}
    for rep in range(reps):
        for variant in (variants if rep % 2 == 0 else tuple(reversed(variants))):
            batches = StampedIterator(cycle(data))
            sync(device)
            started = time.perf_counter()
            samples = runners[variant].run(batches, steps)
            sync(device)
            ended = time.perf_counter()
            stamps = [*batches.stamps[:steps], ended]
            intervals = [b - a for a, b in zip(stamps, stamps[1:])]
            wall[variant].append(samples / (ended - started))
            by_step[variant].append(cfg.batch / median(intervals))
            step_s[variant].append(intervals)
    chosen = wall if cuda else by_step
    plan = view_plan_for(cfg)
    module = runners["bare"].method if "bare" in runners else runners["engine"].trainer.method
    out: dict[str, Any] = {
        "method": cfg.method, "backbone": cfg.backbone, "label": cfg.label, "status": "ok", "config": asdict(cfg),
        "method_options": method_options(cfg), "backbone_options": backbone_options(cfg),
        "needs_labels": cfg.record.needs_labels, "momentum_pairs": len(module.momentum_pairs()),
        "views": {"global": len(plan.global_), "global_size": plan.global_size, "local": len(plan.local),
                  "local_size": plan.local_size},
        "parameters_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "steps_per_rep": steps, "warmup_steps": warmup, "reps": reps, "estimator": "wall" if cuda else "step",
        "samples_per_s": chosen, "samples_per_s_wall": wall, "samples_per_s_median_step": by_step,
        "step_seconds": step_s, "median_samples_per_s": {v: median(x) for v, x in chosen.items()},
        "median_samples_per_s_wall": {v: median(x) for v, x in wall.items()}, "first_loss": first_loss,
    }
    if "engine" in variants:
        for base in [v for v in variants if v != "engine"]:
            suffix = "" if base == "bare" else f"_vs_{base}"
            ratios = [a / b for a, b in zip(chosen["engine"], chosen[base])]
            out[f"ratio{suffix}"], out[f"median_ratio{suffix}"] = ratios, median(ratios)
            wall_ratios = [a / b for a, b in zip(wall["engine"], wall[base])]
            out[f"wall_ratio{suffix}"], out[f"median_wall_ratio{suffix}"] = wall_ratios, median(wall_ratios)
        if "bare" in variants and first_loss.get("engine") is not None and first_loss.get("bare") is not None:
            out["same_first_loss"] = abs(first_loss["engine"] - first_loss["bare"]) <= 1e-4 * max(
                1.0, abs(first_loss["bare"]))
        out["train_chunk_internal_samples_per_s"] = [r.samples / r.seconds for r in runners["engine"].reports[1:]]
    del runners, data
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- what to run


def cells_for(args: argparse.Namespace) -> list[tuple[str, str | None, str]]:
    """(backbone, method or None when skipped, note) for every cell to measure."""
    if args.gpu_suite:
        return gpu_suite_cells()
    methods = args.methods or list(METHOD_REGISTRY.names)
    backbones = args.backbones or (list(QUICK_BACKBONES) if args.quick else list(BACKBONE_REGISTRY.names))
    return [(b, m, "") for b in backbones for m in methods if backbone_suits(m, b)]


def base_config(args: argparse.Namespace, device: str) -> tuple[StepConfig, dict[str, dict[str, Any]]]:
    """The settings every cell shares, and the --set method options by method."""
    cuda = device.startswith("cuda")
    gpu_like = (cuda or args.gpu_suite) and not args.quick  # the GPU settings
    options: dict[str, dict[str, Any]] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        method, _, option = key.partition(".")
        if not option or not value:
            raise SystemExit(f"--set {item!r}: expected METHOD.OPTION=VALUE")
        try:
            options.setdefault(method, {})[option] = json.loads(value)
        except json.JSONDecodeError:
            options.setdefault(method, {})[option] = value
    cfg = StepConfig(
        size=args.size or (224 if gpu_like else 32),
        input_size=args.input_size,
        batch=args.batch or (256 if gpu_like else 32),
        precision=args.precision or ("bf16" if gpu_like else "fp32"),
        channels_last=args.channels_last if args.channels_last is not None else gpu_like,
        small_heads=args.small_heads or args.quick,
        width=args.width or (16 if args.quick else None),
        cifar_stem=args.cifar_stem, local_views=args.local_views, seed=args.seed,
    )
    return cfg, options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 32 px, batch 32, 5 steps x 3 reps, small "
                        "heads, ResNet-18 and ResNet-50 at width 16")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="the anchors (ANCHORS) then every method x backbone at 224 px, bf16, "
                        "channels_last, batch 256 (flags override); bench.gpu_suite runs it within a time budget")
    parser.add_argument("--methods", nargs="+", choices=METHOD_REGISTRY.names, help="default: every registered")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONE_REGISTRY.names,
                        help="default: every registered (--quick: resnet18 resnet50)")
    parser.add_argument("--size", type=int, default=None, help="global view side (224 GPU suite / CUDA, 32 CPU)")
    parser.add_argument("--input-size", type=int, default=None, help="side of the uint8 batches (default: --size)")
    parser.add_argument("--batch", type=int, default=None, help="batch (256 GPU suite / CUDA, 32 CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 for the GPU suite / CUDA, fp32 on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for the GPU suite / CUDA, off on CPU")
    parser.add_argument("--small-heads", action="store_true",
                        help="head widths of 64 instead of the papers' (implied by --quick)")
    parser.add_argument("--width", type=int, default=None,
                        help="width of backbones with that option (ResNets; default theirs, 64; --quick 16)")
    parser.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                        help="stem of backbones with that option (default: their rule from the image size)")
    parser.add_argument("--local-views", type=int, default=None,
                        help="multi-crop views for methods that need them (default 6; others get none)")
    parser.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                        help="a method option (JSON value), over the defaults; repeatable")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repetition (30 CUDA / 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per loop (10 CUDA / 2 CPU / 1 --quick)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (5 CUDA / 3 CPU)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["engine", "bare"])
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.backends.cudnn.benchmark for every loop (off: what the runner does)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, the cores; 1 helps on an overloaded machine)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where the JSON goes [bench/results/step_throughput-<gpu or hostname>.json]")
    args = parser.parse_args(argv)
    if "engine" not in args.variants:
        parser.error("--variants must include engine")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    long = cuda and not args.quick
    steps = args.steps or (30 if long else 5)
    warmup = args.warmup if args.warmup is not None else (10 if long else 1 if args.quick else 2)
    reps = args.reps or (5 if long else 3)
    base, options = base_config(args, device)
    unknown = sorted(set(options) - set(METHOD_REGISTRY.names))
    if unknown:
        raise SystemExit(f"--set: unknown method(s) {unknown}; known: {', '.join(METHOD_REGISTRY.names)}")

    started = time.perf_counter()
    results, rows = [], []
    for backbone, method, note in cells_for(args):
        row: dict[str, Any] = {"backbone": backbone, "method": method or "-", "note": note}
        if method is None:
            results.append({"backbone": backbone, "method": None, "status": "skipped", "note": note})
            rows.append(row)
            continue
        cfg = replace(base, backbone=backbone, method=method, method_options=options.get(method, {}))
        print(f"measuring {cfg.label} ...", flush=True)
        cell_started = time.perf_counter()
        try:
            res = measure_config(cfg, device, steps, warmup, reps, tuple(args.variants))
        except Exception as exc:  # one failing cell (a method that cannot run on a backbone) must not stop the rest
            message = f"{type(exc).__name__}: {exc}"
            print(f"  failed: {message}", flush=True)
            results.append({"backbone": backbone, "method": method, "label": cfg.label, "status": "error",
                            "error": message, "config": asdict(cfg)})
            rows.append({**row, "note": message[:100]})
            continue
        res["cell_seconds"] = time.perf_counter() - cell_started
        results.append(res)
        for v in args.variants:
            row[f"{v} img/s"] = res["median_samples_per_s"][v]
        row.update({"ratio": res.get("median_ratio"), "ratio range": spread(res.get("ratio", [])),
                    "same first loss": res.get("same_first_loss"),
                    "views": f"{res['views']['global']}x{res['views']['global_size']}"
                             + (f"+{res['views']['local']}x{res['views']['local_size']}" if res["views"]["local"]
                                else "")})
        if "bare-v2" in args.variants:
            row["ratio vs bare-v2"] = res.get("median_ratio_vs_bare-v2")
        rows.append(row)
    total = time.perf_counter() - started

    columns = ["backbone", "method", "views", *[f"{v} img/s" for v in args.variants], "ratio", "ratio range",
               *(["ratio vs bare-v2"] if "bare-v2" in args.variants else []), "same first loss", "note"]
    how = "wall time per rep" if cuda else "median step time per rep"
    heads = "small heads" if base.small_heads else "paper-default heads"
    print_table(f"engine (LineTrainer.train_chunk) vs bare loop on {device}: {base.size} px, batch {base.batch}, "
                f"{base.precision}, {'channels_last' if base.channels_last else 'contiguous'}, {heads} "
                f"(median of {reps} interleaved reps x {steps} steps; {how})", columns, rows,
                caption="target: engine >= 0.95 x bare. bare = make_views + training_step + backward + the method's "
                        "hooks + SGD step + hand-written EMA. same first loss: both loops' first step gave the same "
                        "loss (same weights, views and batch).")
    settings = {"device": device, "size": base.size, "batch": base.batch, "precision": base.precision,
                "channels_last": base.channels_last, "small_heads": base.small_heads, "width": base.width,
                "steps": steps, "warmup": warmup, "reps": reps, "variants": list(args.variants),
                "quick": args.quick, "gpu_suite": args.gpu_suite, "cudnn_benchmark": bool(args.cudnn_benchmark),
                "registered_methods": list(METHOD_REGISTRY.names), "torch_threads": torch.get_num_threads(),
                "wall_s": total}
    # --quick and --gpu-suite results get their own file so they never replace a full matrix's.
    name = "step_throughput" + ("-quick" if args.quick else "") + ("-gpu-suite" if args.gpu_suite else "")
    path = write_results("step_throughput", device, {"settings": settings, "results": results, "table": rows},
                         path=args.json or result_path(name, device, args.out_dir))
    print(f"wrote {path} ({total:.0f} s)")
    return {"settings": settings, "results": results, "path": str(path)}


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if any(r["status"] == "error" for r in outcome["results"]) else 0)
