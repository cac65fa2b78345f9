"""streamssl's training step against a bare PyTorch loop with the same model, precision, batch and optimizer.

    python -m bench.step_throughput                 # CPU defaults: ResNet-18 width 32 at 64 px, batch 32, fp32
    python -m bench.step_throughput --device cuda   # the issue's matrix: ResNet-18/50 x SimCLR/BYOL x 224/96 px,
                                                    # batch 256, bf16 autocast, channels_last

Variants, all fed the same pre-made uint8 batches already on the device, timed in one process, interleaved:

- ``streamssl``: ``LineTrainer.train_chunk`` (views by ``trainers.views.make_views``: per-sample crops and colour
  parameters, one batched op per transform; cosine LR per step, loss kept per step, an ``on_step`` callback every
  ``log_every`` steps as the Ray Train worker passes one, BYOL's EMA after every step).
- ``bare``: a hand-written loop over the same ``nn.Module`` (backbone + projector [+ predictor] + loss), views
  made the simplest way a user would on a device batch: ``torchvision.transforms.v2.Compose`` applied to the
  whole batch (one random draw per view per batch: same crop box, flip, jitter factors for all images), with
  the same recipe (RandomResizedCrop scale/ratio, flip, jitter, grayscale, blur kernel and sigma, solarize,
  ImageNet normalisation). Constant LR, ``loss.item()`` every ``log_every`` steps, EMA for BYOL.
- ``bare+make_views``: the same bare loop with ``make_views`` instead of v2: isolates the loop's own overhead
  from the cost of per-sample augmentation.

Each repetition times ``--steps`` steps of every variant (after ``--warmup`` untimed steps), the order alternating
(A,B,C then C,B,A) to cancel drift; the ratio of a repetition is streamssl / bare of that repetition, and the
table shows medians. On CPU a repetition's figure is batch / its median step time (a shared machine's bursts of
other work hit single steps); on CUDA it is samples / wall time (steps are queued asynchronously). Both are kept
in the JSON. Results go to ``bench/results/step_throughput-<gpu or hostname>.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

if __package__ in (None, ""):  # `python bench/step_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (add_common_arguments, augmentation_ops, median, print_table, resolve_device, spread,
                          sync, write_results)

VARIANTS = ("streamssl", "bare", "bare+make_views")


@dataclass(frozen=True)
class StepConfig:
    """One model/precision/batch setting, shared by every variant."""

    backbone: str = "resnet18"
    width: int = 64
    cifar_stem: bool | None = None
    method: str = "simclr"
    size: int = 224  # view side (crop output)
    input_size: int | None = None  # side of the uint8 batches (data.image_size); default = size
    batch: int = 256
    views: int = 2
    precision: str = "bf16"
    channels_last: bool = True
    lr: float = 0.05  # small: random-noise batches, and train_chunk raises on a non-finite loss
    momentum: float = 0.9
    weight_decay: float = 1e-4
    log_every: int = 10
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    view_options: dict[str, Any] = field(default_factory=dict)  # AugmentConfig overrides (scale, blur_p, ...)

    @property
    def source_size(self) -> int:
        return self.input_size or self.size

    @property
    def label(self) -> str:
        w = "" if self.width == 64 else f"/w{self.width}"
        return f"{self.backbone}{w} {self.method} {self.size}px b{self.batch} {self.precision}"


# ---------------------------------------------------------------------------------------------- shared pieces


def augment_configs(cfg: StepConfig):
    from trainers.views import AugmentConfig

    return tuple(AugmentConfig(size=cfg.size, **cfg.view_options) for _ in range(cfg.views))


def loop_config(cfg: StepConfig, steps_per_chunk: int = 1):
    """The LoopConfig the orchestrator would build for this setting (sequential: no re-initialisation)."""
    from trainers.loop import LoopConfig

    return LoopConfig(
        method=cfg.method, strategy="sequential", image_size=cfg.size, views=augment_configs(cfg),
        backbone=cfg.backbone, backbone_width=cfg.width, cifar_stem=cfg.cifar_stem,
        method_options=dict(cfg.method_options), optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, epochs_per_chunk=1, batch_size=cfg.batch, schedule="cosine", seed=cfg.seed,
        precision=cfg.precision, channels_last=cfg.channels_last, log_every=cfg.log_every,
    )


def build_model(cfg: StepConfig, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Same construction as LineTrainer._build: seeded backbone, method module, channels_last, SGD."""
    from trainers.backbones import build_backbone
    from trainers.methods import METHODS

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, cfg.size, width=cfg.width, cifar_stem=cfg.cifar_stem)
    method = METHODS[cfg.method](backbone, **cfg.method_options).to(device)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    # torch's SGD over the same two groups the loop uses (no weight decay on biases and norm parameters).
    from trainers.optim import param_groups

    groups = param_groups(method, cfg.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return method, optimizer


def v2_view_transform(aug) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision.transforms.v2 for one AugmentConfig, on a float [B,3,H,W] batch in [0,1] (one draw per call)."""
    from torchvision.transforms import v2

    from trainers.views import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD

    ops = augmentation_ops(aug, v2, SOLARIZE_THRESHOLD) + [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


class BareLoop:
    """A minimal hand-written SSL loop: what a user would write around the same model.

    `views="v2"`: torchvision.transforms.v2 on the device batch; `"make_views"`: trainers.views.make_views;
    `step_views()` takes views already made (end_to_end's DataLoader makes them in its workers).
    """

    def __init__(self, cfg: StepConfig, device: str, views: str = "v2"):
        if views not in ("v2", "make_views"):
            raise ValueError(f"views must be 'v2' or 'make_views', got {views!r}")
        self.cfg, self.device, self.views = cfg, device, views
        self.method, self.optimizer = build_model(cfg, device)
        self.augs = augment_configs(cfg)
        self.transforms = [v2_view_transform(a) for a in self.augs] if views == "v2" else None
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else nullcontext())
        self.step_count = 0
        self.last_loss = float("nan")

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.views == "make_views":
            from trainers.views import make_views

            return make_views(images, self.augs, generator=self.generator)
        with torch.no_grad():
            x = images.float().div_(255.0)
            return [t(x) for t in self.transforms]

    def step_views(self, views: list[torch.Tensor], progress: float = 0.0) -> None:
        if self.cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.autocast:
            loss = self.method(views)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.momentum_update(progress)  # BYOL's EMA target; a no-op for SimCLR
        self.step_count += 1
        if self.step_count % self.cfg.log_every == 0:
            self.last_loss = loss.item()

    def step(self, images: torch.Tensor, progress: float = 0.0) -> None:
        self.step_views(self.make_views(images.to(self.device, non_blocking=True)), progress)

    def run(self, batches: Iterable[torch.Tensor], steps: int) -> int:
        """`steps` steps over `batches` (stops early when it runs dry); returns the samples trained."""
        samples = 0
        for i, images in enumerate(itertools.islice(batches, steps)):
            self.step(images, (i + 1) / steps)
            samples += images.shape[0]
        return samples


class StreamsslLoop:
    """LineTrainer.train_chunk over the given batches: one call = one chunk of `steps` steps."""

    def __init__(self, cfg: StepConfig, device: str):
        from trainers.loop import LineTrainer

        self.cfg = cfg
        self.trainer = LineTrainer(loop_config(cfg), device=device)
        self.trainer.start_chunk(0)  # sequential: builds nothing new at later chunks
        self.chunk = 0
        self.infos: list[Any] = []
        self.reports: list[Any] = []

    def run(self, batches: Iterable[torch.Tensor], steps: int) -> int:
        iterator = iter(batches)
        report = self.trainer.train_chunk(self.chunk, lambda epoch, skip: iterator, steps, on_step=self.infos.append)
        self.chunk += 1
        self.reports.append(report)
        return report.samples


def premade_batches(cfg: StepConfig, device: str, count: int = 4) -> list[torch.Tensor]:
    """`count` distinct uint8 [B,3,S,S] noise batches on the device (content does not change the cost)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    side = cfg.source_size
    return [torch.randint(0, 256, (cfg.batch, 3, side, side), dtype=torch.uint8, generator=g).to(device)
            for _ in range(count)]


def cycle(batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    return itertools.cycle(batches)


# ---------------------------------------------------------------------------------------------- measurement


def make_runner(variant: str, cfg: StepConfig, device: str):
    if variant == "streamssl":
        return StreamsslLoop(cfg, device)
    if variant == "bare":
        return BareLoop(cfg, device, "v2")
    if variant == "bare+make_views":
        return BareLoop(cfg, device, "make_views")
    raise ValueError(f"unknown variant {variant!r}")


class StampedIterator:
    """Wraps a batch iterator and records perf_counter() at every next(): consecutive stamps bracket one step."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches = iter(batches)
        self.stamps: list[float] = []

    def __iter__(self) -> "StampedIterator":
        return self

    def __next__(self) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return next(self.batches)


def measure_config(cfg: StepConfig, device: str, steps: int, warmup: int, reps: int,
                   variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Interleaved repetitions of every variant; samples/s per repetition, ratios paired by repetition.

    Two estimators: `wall` (samples / wall time of the repetition, CUDA-synchronised at both ends) and, on CPU,
    `step` (batch / median time between consecutive steps of the repetition): a shared CPU's bursts of other work
    hit a few steps, which the median ignores. CUDA steps are queued asynchronously, so there only `wall` means
    anything; `estimator` names the one the table and the ratios use.
    """
    cuda = device.startswith("cuda")
    data = premade_batches(cfg, device)
    runners = {v: make_runner(v, cfg, device) for v in variants}
    for runner in runners.values():  # warm-up: kernels, cuDNN plans, allocator
        runner.run(cycle(data), warmup)
    sync(device)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    step_s: dict[str, list[list[float]]] = {v: [] for v in variants}
    by_step: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(reps):
        order = variants if rep % 2 == 0 else tuple(reversed(variants))
        for variant in order:
            batches = StampedIterator(cycle(data))
            sync(device)
            started = time.perf_counter()
            samples = runners[variant].run(batches, steps)
            sync(device)
            ended = time.perf_counter()
            took = ended - started
            stamps = [*batches.stamps[:steps], ended]
            intervals = [b - a for a, b in zip(stamps, stamps[1:])]
            seconds[variant].append(took)
            wall[variant].append(samples / took)
            step_s[variant].append(intervals)
            by_step[variant].append(cfg.batch / median(intervals))
    estimator = "wall" if cuda else "step"
    chosen = wall if cuda else by_step
    out: dict[str, Any] = {"config": asdict(cfg), "label": cfg.label, "steps_per_rep": steps, "warmup_steps": warmup,
                           "reps": reps, "estimator": estimator, "samples_per_s": chosen,
                           "samples_per_s_wall": wall, "samples_per_s_median_step": by_step,
                           "seconds": seconds, "step_seconds": step_s,
                           "median_samples_per_s": {v: median(x) for v, x in chosen.items()},
                           "median_samples_per_s_wall": {v: median(x) for v, x in wall.items()}}
    if "streamssl" in variants:
        for base in [v for v in variants if v != "streamssl"]:
            ratios = [a / b for a, b in zip(chosen["streamssl"], chosen[base])]
            out[f"ratio_vs_{base}"] = ratios
            out[f"median_ratio_vs_{base}"] = median(ratios)
            wall_ratios = [a / b for a, b in zip(wall["streamssl"], wall[base])]
            out[f"wall_ratio_vs_{base}"] = wall_ratios
            out[f"median_wall_ratio_vs_{base}"] = median(wall_ratios)
        reports = runners["streamssl"].reports
        if reports:  # train_chunk's own clock, for comparison with the external one
            out["train_chunk_internal_samples_per_s"] = [r.samples / r.seconds for r in reports[1:]]
    del runners, data
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def configs_for(args: argparse.Namespace, device: str) -> list[StepConfig]:
    full = device.startswith("cuda") and not args.quick
    backbones = args.backbones or (["resnet18", "resnet50"] if full else ["resnet18"])
    methods = args.methods or ["simclr", "byol"]
    sizes = args.sizes or ([224, 96] if full else [64])
    base = StepConfig(
        width=args.width or (64 if full else 32),
        cifar_stem=None if full else (args.cifar_stem if args.cifar_stem is not None else False),
        batch=args.batch or (256 if full else 32),
        precision=args.precision or ("bf16" if device.startswith("cuda") else "fp32"),
        channels_last=args.channels_last if args.channels_last is not None else device.startswith("cuda"),
        seed=args.seed,
    )
    if args.cifar_stem is not None:
        base = replace(base, cifar_stem=args.cifar_stem)
    return [replace(base, backbone=b, method=m, size=s, input_size=args.input_size)
            for b in backbones for m in methods for s in sizes]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="CPU-sized settings even on CUDA")
    parser.add_argument("--backbones", nargs="+", choices=["resnet18", "resnet50"])
    parser.add_argument("--methods", nargs="+", choices=["simclr", "byol"])
    parser.add_argument("--sizes", nargs="+", type=int, help="view sides (default: 224 96 on CUDA, 64 on CPU)")
    parser.add_argument("--input-size", type=int, default=None, help="side of the uint8 batches (default: view side)")
    parser.add_argument("--width", type=int, default=None, help="ResNet base width (default: 64 on CUDA, 32 on CPU)")
    parser.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                        help="3x3 stem (default: the ImageNet stem on CPU at 64 px, as examples/imagenette.yaml; "
                             "the backbone's own rule on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default: 256 on CUDA, 32 on CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for CUDA, off on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repetition (30 CUDA / 6 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (10 CUDA / 2 CPU)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (5 CUDA / 7 CPU)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.backends.cudnn.benchmark for every variant (off: what the runner does)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    steps = args.steps or (30 if cuda and not args.quick else 6)
    warmup = args.warmup if args.warmup is not None else (10 if cuda and not args.quick else 2)
    reps = args.reps or (5 if cuda and not args.quick else 7)
    configs = configs_for(args, device)

    started = time.perf_counter()
    results, rows = [], []
    for cfg in configs:
        print(f"measuring {cfg.label} ...", flush=True)
        res = measure_config(cfg, device, steps, warmup, reps, tuple(args.variants))
        results.append(res)
        row = {"config": cfg.label}
        for v in args.variants:
            row[f"{v} samples/s"] = res["median_samples_per_s"][v]
        for v in args.variants:
            if v != "streamssl" and f"median_ratio_vs_{v}" in res:
                row[f"ratio vs {v}"] = res[f"median_ratio_vs_{v}"]
                row[f"range vs {v}"] = spread(res[f"ratio_vs_{v}"])
        rows.append(row)
    total = time.perf_counter() - started

    columns = ["config", *[f"{v} samples/s" for v in args.variants]]
    for v in args.variants:
        if v != "streamssl" and "streamssl" in args.variants:
            columns += [f"ratio vs {v}", f"range vs {v}"]
    how = "wall time per rep" if cuda else "median step time per rep"
    print_table(f"training step throughput on {device} (median of {reps} interleaved reps x {steps} steps; {how})",
                columns, rows,
                caption="target: streamssl >= 0.95 x bare. bare = torchvision.transforms.v2 on the device batch "
                        "(one draw per batch); bare+make_views = the same loop with streamssl's per-sample views.")
    settings = {"device": device, "steps": steps, "warmup": warmup, "reps": reps, "variants": list(args.variants),
                "cudnn_benchmark": bool(args.cudnn_benchmark), "full_matrix": cuda and not args.quick,
                "wall_s": total}
    path = write_results("step_throughput", device, {"settings": settings, "results": results, "table": rows},
                         args.out_dir)
    print(f"wrote {path} ({total:.0f} s)")
    return {"settings": settings, "results": results}


if __name__ == "__main__":
    main()
