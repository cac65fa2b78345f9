"""Images per second delivered to the training loop: Ray Data from Parquet shards against a torch DataLoader.

    python -m bench.ingest                          # CPU: imagenette, 300 images per class, 64 px, batch 64
    python -m bench.ingest --device cuda            # all of imagenette at 224 px, batch 256, decode on the GPU
    python -m bench.ingest --synthetic              # the synthetic generator instead of imagenette

Variants (same shards, same rows, same output: uint8 [B, 3, S, S] on the device, shuffled, drop_last):

- ``ray-cpu-decode``: ``orchestrator.data.ingest.chunk_dataset`` as the runner uses it: read tasks verify each shard's
  sha256 and keep the chunk's rows, decode tasks (PIL, JPEG draft mode, resize + centre crop) beside the consumer,
  ``iter_torch_batches`` with the runner's local shuffle buffer (4 batches), NHWC -> NCHW, ``.to(device)``.
- ``ray-device-decode``: ``data.decode: device``: ``chunk_dataset(..., decode="device")``, the same read stage, the
  JPEG bytes themselves go through Ray Data and the consumer decodes each batch as the runner's worker does
  (``orchestrator.data.ingest.DeviceBatchDecoder`` -> ``trainers.views.decode.decode_jpeg_batch``: one batched ``decode_jpeg``,
  nvjpeg on CUDA, libjpeg-turbo in the consumer's process on CPU).
- ``dataloader``: a torch DataLoader (N spawned persistent workers) over the same Parquet shards' rows, PIL decode
  + torchvision ``Resize`` / ``CenterCrop`` / ``PILToTensor`` per sample: the usual alternative.
- ``dataloader+draft``: the same with PIL's JPEG draft mode, the one trick ``decode_image`` has that the usual
  loader does not (decoding a 224 px JPEG for 64 px output costs about half).
- ``dataloader-files``: the DataLoader over the ImageFolder JPEG files the shards were made from (not with
  ``--synthetic``).

Each variant runs one untimed-for-the-median cold pass (worker start-up; reported as "cold"), then ``--reps``
interleaved timed passes over the whole split. A pass's images/s counts from the iterator's creation to its last
batch (what an epoch costs, pipeline start included); "steady" leaves the first batch out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):  # `python bench/ingest.py`
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

VARIANTS = ("ray-cpu-decode", "ray-device-decode", "dataloader", "dataloader+draft", "dataloader-files")
REFERENCE = "dataloader"


def timed_pass(batches: Iterator[torch.Tensor], device: str) -> dict[str, float]:
    """Consume one epoch; the clock starts before the iterator's first batch is asked for."""
    started = time.perf_counter()
    images, first_s, batches_n = 0, float("nan"), 0
    for batch in batches:
        if batches_n == 0:
            sync(device)
            first_s = time.perf_counter() - started
        images += batch.shape[0]
        batches_n += 1
    sync(device)
    total = time.perf_counter() - started
    steady_images = images - (images // batches_n if batches_n else 0)
    return {"images": images, "batches": batches_n, "seconds": total, "first_batch_s": first_s,
            "images_per_s": images / total if total > 0 else float("nan"),
            "steady_images_per_s": (steady_images / (total - first_s)) if batches_n > 1 else float("nan")}


def build_variants(args: argparse.Namespace, data: dict[str, Any], device: str, size: int, batch: int,
                   workers: int) -> dict[str, Callable[[int], Iterator[torch.Tensor]]]:
    """variant -> (epoch -> iterator of uint8 [B,3,S,S] batches on the device)."""
    from bench.loaders import (
        FileImages,
        ShardImages,
        bytes_dataset,
        center_transform,
        dataloader,
        device_decoded_batches,
        loader_batches,
        ray_cpu_batches,
    )
    from orchestrator.data.ingest import chunk_dataset, shard_refs

    manifest, url = data["manifest"], data["url"]
    plan = single_chunk_plan(url, manifest)
    refs = shard_refs(manifest, url, "train")
    shuffle = batch * 4  # as runner._train_fn
    pin = device.startswith("cuda")
    out: dict[str, Callable[[int], Iterator[torch.Tensor]]] = {}
    for variant in args.variants:
        if variant == "ray-cpu-decode":
            ds = chunk_dataset(refs, plan, [0], size, decode_cpus=args.decode_cpus)
            out[variant] = lambda epoch, ds=ds: ray_cpu_batches(ds, batch, device, epoch, shuffle)
        elif variant == "ray-device-decode":
            ds = bytes_dataset(refs, plan, [0], size, read_cpus=args.decode_cpus)
            out[variant] = lambda epoch, ds=ds: device_decoded_batches(ds, batch, size, device, epoch, shuffle)
        elif variant.startswith("dataloader"):
            draft = size if variant == "dataloader+draft" else None
            if variant == "dataloader-files":
                if data["source_root"] is None:
                    continue  # synthetic: there are no source files
                dataset = FileImages(source_files(data["source_root"], args.max_per_class), center_transform(size))
            else:
                dataset = ShardImages([r.url for r in refs], [r.rows for r in refs], center_transform(size), draft)
            loader = dataloader(dataset, batch, workers, pin_memory=pin, seed=args.seed)
            out[variant] = lambda epoch, loader=loader: loader_batches(loader, device)
        else:
            raise ValueError(f"unknown variant {variant!r}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--size", type=int, default=None, help="decoded side (default: 224 on CUDA, 64 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default: 256 on CUDA, 64 on CPU)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: usable cores)")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: max(4, cores), as the driver's init_ray)")
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per Ray read/decode task [0.5]")
    parser.add_argument("--reps", type=int, default=3, help="timed passes per variant [3]")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    size = args.size or (224 if cuda else 64)
    batch = args.batch or (256 if cuda else 64)
    workers = args.workers if args.workers is not None else usable_cores()
    ray_cpus = args.ray_cpus or max(4, usable_cores())
    if args.max_per_class is None and not cuda and not args.synthetic:
        args.max_per_class = 300

    import ray

    started = time.perf_counter()
    with scratch_dir("ingest") as scratch:
        data = prepare_data(args, Path(scratch))
        print(f"shards: {data['url']} ({data['manifest'].splits['train'].rows} train rows, "
              f"{'reused' if data['reused'] else 'prepared'} in {data['prepare_s']:.1f} s)", flush=True)
        owns_ray = init_ray(ray_cpus)
        try:
            variants = build_variants(args, data, device, size, batch, workers)
            passes: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            cold: dict[str, dict[str, float]] = {}
            for name, make in variants.items():
                print(f"cold pass: {name} ...", flush=True)
                cold[name] = timed_pass(make(0), device)
            names = list(variants)
            for rep in range(args.reps):
                for name in (names if rep % 2 == 0 else list(reversed(names))):
                    passes[name].append(timed_pass(variants[name](rep + 1), device))
                print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                    f"{n} {passes[n][-1]['images_per_s']:.0f}/s" for n in names), flush=True)
            del variants  # DataLoader workers stop with their loaders
        finally:
            if owns_ray:
                ray.shutdown()
    total = time.perf_counter() - started

    ref = REFERENCE if REFERENCE in passes else None
    rows, summary = [], {}
    for name, runs in passes.items():
        rates = [p["images_per_s"] for p in runs]
        entry = {"images_per_s": rates, "median_images_per_s": median(rates),
                 "median_steady_images_per_s": median([p["steady_images_per_s"] for p in runs]),
                 "median_first_batch_s": median([p["first_batch_s"] for p in runs]),
                 "cold": cold[name], "passes": runs}
        if ref:
            ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs, passes[ref])]
            entry["ratio_vs_dataloader"] = ratios
            entry["median_ratio_vs_dataloader"] = median(ratios)
        summary[name] = entry
        rows.append({"variant": name, "images/s": entry["median_images_per_s"], "range": spread(rates),
                     "steady images/s": entry["median_steady_images_per_s"],
                     "first batch s": entry["median_first_batch_s"],
                     "cold pass images/s": cold[name]["images_per_s"], "cold first batch s": cold[name]["first_batch_s"],
                     "ratio vs dataloader": entry.get("median_ratio_vs_dataloader")})
    images = next(iter(passes.values()))[0]["images"] if passes else 0
    print_table(f"ingest on {device}: {images} images of {size} px per pass, batch {batch} "
                f"(median of {args.reps} interleaved passes)",
                ["variant", "images/s", "range", "steady images/s", "first batch s", "cold pass images/s",
                 "cold first batch s", "ratio vs dataloader"], rows,
                caption=f"target: Ray Data >= 0.9 x dataloader. DataLoader: {workers} spawned workers; Ray: "
                        f"{ray_cpus} logical CPUs, {args.decode_cpus} CPU per read/decode task.")
    settings = {"device": device, "size": size, "batch": batch, "dataloader_workers": workers, "ray_cpus": ray_cpus,
                "decode_cpus": args.decode_cpus, "reps": args.reps, "data": str(args.data) if not args.synthetic
                else "synthetic", "max_per_class": args.max_per_class, "shard_rows": args.shard_rows,
                "train_rows": data["manifest"].splits["train"].rows, "prepare_s": data["prepare_s"],
                "shuffle_buffer": batch * 4, "wall_s": total}
    path = write_results("ingest", device, {"settings": settings, "results": summary, "table": rows}, args.out_dir)
    print(f"wrote {path} ({total:.0f} s)")
    return {"settings": settings, "results": summary}


if __name__ == "__main__":
    main()
