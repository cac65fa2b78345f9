"""Detection transfer smoke run: Faster R-CNN AP on the synthetic shapes set in VOC format, within a CPU budget.

    python -m bench.detection_smoke                                  # random-init resnet18 (width 16), ~2-3 min CPU
    python -m bench.detection_smoke --checkpoint CKPT_DIR            # also a pre-trained backbone (load_backbone)
    python -m bench.detection_smoke --norm frozen,train --steps 300 --device cuda

The set: `generate_detection_set` (`--train` / `--val` images of `--size` px, 1-3 shapes each, 4 classes) written
as a VOC tree and read through the real data path (`prepare_detection_set(format="voc")` -> shards ->
`DetectionShards`). Each variant builds `evaluators.detection.build_detector` around a backbone (random init from
`--seed`, or the checkpoint's through `trainers.engine.checkpoint.load_backbone`), trains it with `train_detector`
for `--steps` steps and scores the val split with `evaluate_detector` (COCO AP, AP50, AP75 by pycocotools).
Heads are shrunk to CPU sizes (`--fpn-channels`, `--box-head-dim`, `--rois`); the images stay at their size (min_size =
`--size`). Prints a table, writes JSON to bench/results/detection_smoke-<host or GPU>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import add_common_arguments, print_table, resolve_device, scratch_dir, write_results


def _backbone(source: str, args: argparse.Namespace) -> torch.nn.Module:
    from trainers.backbones import build_backbone
    from trainers.engine.checkpoint import load_backbone, load_state

    if source == "random":
        torch.manual_seed(args.seed)
        return build_backbone(args.backbone, args.size, width=args.width)
    return load_backbone(load_state(args.checkpoint))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--train", type=int, default=96, help="training images [96]")
    parser.add_argument("--val", type=int, default=32, help="validation images [32]")
    parser.add_argument("--size", type=int, default=64, help="image side in px [64]")
    parser.add_argument("--backbone", default="resnet18", help="random-init backbone [resnet18]")
    parser.add_argument("--width", type=int, default=16, help="its first-stage width [16]")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a training checkpoint folder: adds a "
                                                                      "pre-trained row")
    parser.add_argument("--norm", default="frozen", help="comma-separated DetectorConfig.norm values [frozen]")
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant [300]")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step [4]")
    parser.add_argument("--lr", type=float, default=0.02, help="peak SGD LR [0.02]")
    parser.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps [50]")
    parser.add_argument("--fpn-channels", type=int, default=64, help="FPN / head input channels [64; paper 256]")
    parser.add_argument("--box-head-dim", type=int, default=256, help="box head width [256; paper 1024]")
    parser.add_argument("--rois", type=int, default=128, help="RoIs sampled per training image [128; paper 512]")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU [2]")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)

    from evaluators.detection import DetectorConfig, build_detector, evaluate_detector, train_detector
    from orchestrator.data.detection_shards import DetectionShards, prepare_detection_set
    from orchestrator.data.synth_detection import generate_detection_set

    sources = ["random"] + (["pretrained"] if args.checkpoint else [])
    norms = [n.strip() for n in args.norm.split(",") if n.strip()]
    rows = []
    with scratch_dir("detection-smoke-") as scratch:
        made = generate_detection_set(Path(scratch) / "shapes", train=args.train, val=args.val,
                                      image_size=args.size, seed=args.seed)
        url = f"file://{scratch}/shards"
        prepare_detection_set(made.voc_root, url, format="voc", classes=made.classes)
        train_set, val_set = DetectionShards(url, "train"), DetectionShards(url, "val")
        train_set = [train_set[i] for i in range(len(train_set))]  # decoded once: the loop times the model
        val_set = [val_set[i] for i in range(len(val_set))]
        for source in sources:
            for norm in norms:
                config = DetectorConfig(norm=norm, min_size=args.size, max_size=args.size,
                                        fpn_channels=args.fpn_channels, box_head_dim=args.box_head_dim,
                                        box_batch_size_per_image=args.rois)
                model = build_detector(_backbone(source, args), len(made.classes), config, seed=args.seed)
                start = time.perf_counter()
                result = train_detector(model, train_set, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                        warmup_steps=args.warmup_steps, seed=args.seed, device=device)
                train_s = time.perf_counter() - start
                start = time.perf_counter()
                scores = evaluate_detector(model, val_set, device=device)
                rows.append({"backbone": source, "norm": norm, "steps": result.steps, "epochs": result.epochs,
                             "first_loss": result.first_loss, "final_loss": result.final_loss, **scores,
                             "train_s": train_s, "eval_s": time.perf_counter() - start})
                print_table("detection smoke (so far)", list(rows[-1]), rows[-1:])
    columns = ["backbone", "norm", "steps", "epochs", "first_loss", "final_loss", "ap50", "ap", "ap75", "train_s",
               "eval_s"]
    print_table(f"Faster R-CNN on shapes VOC ({args.train} train / {args.val} val, {args.size} px), {device}",
                columns, rows)
    payload = {"settings": vars(args) | {"device": device}, "classes": list(made.classes), "rows": rows}
    path = write_results("detection_smoke", device, payload, args.out_dir)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
