"""Every method learns: kNN top-1 on imagenette's val split after a CPU-sized pre-training, against the random init.

    python -m bench.method_knn --workdir /tmp/streamssl-bench       # all methods, CPU budget (~1-2 min each)
    python -m bench.method_knn --methods simclr,byol --epochs 4 --size 64

Each method trains with the engine (`LineTrainer.train_chunk`, no Ray: this measures the method, not the cluster)
on the training split for `--epochs` epochs, from the same seeded initialisation, on the same batches; the backbone
is then evaluated frozen: kNN (k=20, cosine, temperature 0.07) of val features against a per-class-capped train
bank. Heads are shrunk to CPU sizes (`CPU_OPTIONS`): the papers' 8192-wide Barlow Twins projector or DINO's 65536
outputs would dominate a 32 px ResNet's step on 2 cores. Prints a table, writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    add_common_arguments,
    add_data_arguments,
    hardware,
    prepare_data,
    print_table,
    resolve_device,
    scratch_dir,
    write_results,
)

# Small heads for a CPU budget; everything else is the method's paper default, except where a few hundred CPU steps
# need otherwise (measured: with the paper's settings these runs stay at the random init's kNN): SwAV's prototypes
# frozen for one epoch instead of 313 iterations (most of the run), DINO's sharper teacher and trainable last-layer
# norm (as its learning test: the paper's 0.04 / fixed norm / 1-epoch freeze stays near the uniform collapse).
CPU_OPTIONS: dict[str, dict[str, Any]] = {
    "simclr": {"proj_hidden": 512, "temperature": 0.2},
    "byol": {"proj_hidden": 512, "pred_hidden": 512},
    "moco_v2": {"proj_hidden": 512, "queue_size": 4096},
    "moco_v2_plus": {"proj_hidden": 512, "queue_size": 4096},
    "barlow_twins": {"proj_hidden": 1024, "proj_out": 1024},
    "simsiam": {"proj_hidden": 512, "pred_hidden": 128},
    "swav": {"proj_hidden": 512, "n_prototypes": 100, "queue_length": 0, "freeze_prototypes_iters": 70},
    "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "out_dim": 1024, "warmup_teacher_temp": 0.02,
             "teacher_temp": 0.02, "norm_last_layer": False, "freeze_last_layer": 0},
    "supervised": {"num_classes": 10},
}
LEARNING_RATE = {"simsiam": 0.5, "barlow_twins": 0.1, "dino": 2e-3}
# Optimiser per method where SGD is not what the method trains with (DINO: AdamW, weight decay 0.04).
OPTIMIZER = {"dino": ("adamw", 0.04)}


def _options(name: str, record) -> dict[str, Any]:
    """CPU_OPTIONS[name], checked against the method's Config (a renamed option must not silently fall back to
    the paper's full-size head)."""
    options = CPU_OPTIONS.get(name, {})
    record.options(options)  # a ValueError naming any option the method does not have
    return options


def knn_top1(backbone, bank, queries, device: str) -> float:
    from evaluators.features import extract_features
    from evaluators.knn import knn_predict

    def batches(arrays):
        for i in range(0, len(arrays.labels), 256):
            yield arrays.images[i:i + 256], torch.from_numpy(arrays.labels[i:i + 256])

    bank_f, bank_l = extract_features(backbone, batches(bank), device=device)
    query_f, query_l = extract_features(backbone, batches(queries), device=device)
    return float((knn_predict(bank_f, bank_l, query_f, k=20) == query_l).float().mean())


def run_method(name: str, args, train, bank, queries, device: str) -> dict[str, Any]:
    from trainers.engine.loop import LineTrainer, LoopConfig
    from trainers.engine.types import Batch
    from trainers.registry import METHOD_REGISTRY
    from trainers.views.plan import view_plan

    record = METHOD_REGISTRY[name]
    local = args.local_views if record.needs_local_views else 0
    plan = view_plan(global_count=max(2, record.min_global_views), global_size=args.size, global_scale=(0.2, 1.0),
                     local_count=local, local_size=max(8, args.size // 2), local_scale=(0.05, 0.2))
    steps_per_epoch = len(train.labels) // args.batch
    cfg = LoopConfig(method=name, strategy="sequential", image_size=args.size, views=plan, backbone="resnet18",
                     backbone_width=args.width, cifar_stem=args.cifar_stem, lr=LEARNING_RATE.get(name, args.lr),
                     epochs_per_chunk=args.epochs, batch_size=args.batch, seed=args.seed,
                     optimizer=OPTIMIZER.get(name, ("sgd", 1e-4))[0], weight_decay=OPTIMIZER.get(name, ("sgd", 1e-4))[1],
                     method_options=_options(name, record), line_steps=args.epochs * steps_per_epoch,
                     warmup_epochs=min(1.0, args.epochs / 4), precision="fp32")
    trainer = LineTrainer(cfg, device=device)
    labels = torch.from_numpy(train.labels).long()

    def batches(epoch: int, skip: int):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for i in range(skip * args.batch, len(order) - args.batch + 1, args.batch):
            rows = order[i:i + args.batch]
            yield Batch.from_images(train.images[rows], labels=labels[rows], index=rows)

    started = time.perf_counter()
    report = trainer.train_chunk(0, batches, steps_per_epoch)
    seconds = time.perf_counter() - started
    return {"method": name, "knn_top1": knn_top1(trainer.backbone, bank, queries, device), "train_s": seconds,
            "steps": report.steps, "first_loss": report.losses[0], "last_loss": report.final_loss,
            "options": cfg.method_options, "lr": cfg.lr, "local_views": local}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--methods", default="", help="comma-separated; default every registered method")
    parser.add_argument("--size", type=int, default=32, help="image side for training and evaluation [32]")
    parser.add_argument("--width", type=int, default=32, help="ResNet-18 base width [32]")
    parser.add_argument("--cifar-stem", action="store_true",
                        help="CIFAR stem (3x3, no max-pool); default the ImageNet stem, ~15x cheaper at 32 px")
    parser.add_argument("--epochs", type=int, default=2, help="pre-training epochs over the train split [2]")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.3, help="SGD peak LR (cosine; per-method overrides)")
    parser.add_argument("--local-views", type=int, default=2, help="local views for methods that need them [2]")
    parser.add_argument("--bank-per-class", type=int, default=300, help="kNN bank: train images per class [300]")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    from orchestrator.data.ingest import load_split_arrays
    from trainers.engine.loop import LoopConfig, initial_backbone
    from trainers.registry import METHOD_REGISTRY
    from trainers.views.plan import view_plan

    names = [n for n in args.methods.split(",") if n] or list(METHOD_REGISTRY.names)
    with scratch_dir("method-knn") as scratch:
        data = prepare_data(args, Path(scratch))
        url, manifest = data["url"], data["manifest"]
        train = load_split_arrays(manifest, url, "train", args.size)
        bank = load_split_arrays(manifest, url, "train", args.size, max_per_class=args.bank_per_class)
        queries = load_split_arrays(manifest, url, "val", args.size)
        # Every method starts from this backbone (same seed, same builder): its kNN is the floor.
        random_cfg = LoopConfig(method="simclr", strategy="sequential", image_size=args.size,
                                views=view_plan(global_count=2, global_size=args.size), backbone_width=args.width,
                                cifar_stem=args.cifar_stem, seed=args.seed)
        random_init = knn_top1(initial_backbone(random_cfg), bank, queries, device)
        rows = []
        for name in names:
            result = run_method(name, args, train, bank, queries, device)
            result["gain_over_random"] = result["knn_top1"] - random_init
            rows.append(result)
            print(f"{name}: kNN {result['knn_top1']:.3f} (random init {random_init:.3f}), {result['train_s']:.0f} s",
                  flush=True)
    print_table(f"kNN top-1 on {Path(args.data).name if not args.synthetic else 'synthetic'} val after "
                f"{args.epochs} epochs ({args.size} px, ResNet-18 width {args.width}, {device})",
                ["method", "knn_top1", "gain_over_random", "train_s", "steps", "first_loss", "last_loss"], rows,
                caption=f"random initialisation: kNN {random_init:.3f}")
    path = write_results("method_knn", device, {"settings": vars(args) | {"data": str(args.data)},
                                                "hardware": hardware(), "random_init_knn_top1": random_init,
                                                "methods": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
