"""The online case: steps and samples per second learning stream batches with and without RALS, RALS's cost per
step, and the share of a stream batch's time spent outside the training step (memory draws and updates, view
making, selection bookkeeping, the deadline and finiteness checks).

    python -m bench.online                       # CPU: 32 px, width-16 ResNet-18, SimCLR, 10 steps a batch
    python -m bench.online --device cuda --image-size 96 --width 64 --stream-batch 128 --memory-batch 256

Each case is a `trainers.online.OnlineTrainer` (no Ray, no MLflow: the trainer the Ray Train worker drives) on
pre-made uint8 stream batches already on the device, one warm-up batch then `--batches` timed ones, in rounds
that alternate the cases' order; a round's figures come from the trainer's own per-batch report (`seconds` of
the batch; `step_seconds`, the steps themselves: views and `train_step`; `rals_seconds`, scoring and selecting).
Outside-step share = 1 - (step_seconds + rals_seconds) / seconds: what the online loop adds around the work
(memory draws and updates, joining batches, the deadline and finiteness checks).
With RALS the training step itself sees `k` rows instead of stream + memory rows, so samples/s counts trained
rows and candidates/s every row scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/online.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_arguments, median, print_table, resolve_device, spread, write_results


def make_trainer(args: argparse.Namespace, device: str, rals: bool):
    import torch

    from trainers.engine.loop import LineTrainer, LoopConfig
    from trainers.online.config import OnlineConfig
    from trainers.online.loop import OnlineTrainer
    from trainers.views.augment import AugmentConfig

    torch.manual_seed(args.seed)
    views = (AugmentConfig(size=args.image_size, blur_p=0.0), AugmentConfig(size=args.image_size, blur_p=0.0))
    cfg = LoopConfig(method="simclr", strategy="sequential", image_size=args.image_size, views=views,
                     backbone_width=args.width, cifar_stem=False, lr=args.max_lr, batch_size=args.stream_batch,
                     seed=args.seed, method_options={"proj_hidden": 256, "proj_out": 64})
    online = OnlineConfig.parse("online", batch_size=args.stream_batch, steps_per_batch=args.steps,
                                max_lr=args.max_lr, memory_size=args.memory, memory_batch=args.memory_batch,
                                rals=rals, rals_k=args.rals_k)
    return OnlineTrainer(LineTrainer(cfg, device=device), online)


def stream(args: argparse.Namespace, device: str, n: int, seed: int) -> list:
    import torch

    from trainers.engine.types import Batch

    g = torch.Generator().manual_seed(seed)
    return [Batch.from_images(torch.randint(0, 256, (args.stream_batch, 3, args.image_size, args.image_size),
                                            dtype=torch.uint8, generator=g).to(device),
                              index=torch.arange(k * args.stream_batch, (k + 1) * args.stream_batch, device=device))
            for k in range(n)]


def run_case(args: argparse.Namespace, device: str, rals: bool, seed: int) -> dict[str, float]:
    trainer = make_trainer(args, device, rals)
    # Fill the memory first, so every timed batch has its full candidate set.
    warm = max(1, -(-args.memory // args.stream_batch))
    for batch in stream(args, device, warm, seed + 1000):
        trainer.learn(batch)
    reports = [trainer.learn(batch) for batch in stream(args, device, args.batches, seed)]
    seconds = sum(r.seconds for r in reports)
    step_seconds = sum(r.step_seconds for r in reports)
    rals_seconds = sum(r.rals_seconds for r in reports)
    steps = sum(r.steps for r in reports)
    trained = args.rals_k if rals else args.stream_batch + args.memory_batch
    candidates = args.stream_batch + args.memory_batch
    return {"steps_per_s": steps / seconds, "samples_per_s": steps * trained / seconds,
            "candidates_per_s": steps * candidates / seconds, "outside_step_share": 1 - (step_seconds + rals_seconds) / seconds,
            "step_ms": 1000 * seconds / steps, "rals_ms_per_step": 1000 * rals_seconds / steps,
            "new_fraction": median([r.new_fraction for r in reports])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 width")
    parser.add_argument("--stream-batch", type=int, default=64, help="rows per stream batch")
    parser.add_argument("--memory", type=int, default=512, help="replay memory rows")
    parser.add_argument("--memory-batch", type=int, default=128, help="memory rows joined at every step")
    parser.add_argument("--rals-k", type=int, default=128, help="rows RALS trains on per step")
    parser.add_argument("--steps", type=int, default=10, help="steps per stream batch")
    parser.add_argument("--batches", type=int, default=4, help="timed stream batches per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = {"without RALS": False, "with RALS": True}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for r in range(args.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            rounds[name].append(run_case(args, device, cases[name], args.seed + r))
    rows = []
    for name, values in rounds.items():
        row: dict[str, Any] = {"case": name}
        for key in values[0]:
            row[key] = median([v[key] for v in values])
        row["step_ms_range"] = spread([v["step_ms"] for v in values])
        rows.append(row)
    ratios = [w["step_ms"] / wo["step_ms"] for w, wo in zip(rounds["with RALS"], rounds["without RALS"])]
    summary = {"rals_step_time_ratio": median(ratios), "rals_step_time_ratio_range": spread(ratios),
               "outside_step_share_target": 0.05}
    print_table(f"Online learning, {args.steps} steps a stream batch of {args.stream_batch} (+{args.memory_batch} "
                f"memory rows) on {device}", ["case", "steps_per_s", "samples_per_s", "candidates_per_s", "step_ms",
                                              "step_ms_range", "rals_ms_per_step", "outside_step_share",
                                              "new_fraction"], rows,
                caption=f"time per step with RALS / without, per round: median {summary['rals_step_time_ratio']:.2f} "
                        f"({summary['rals_step_time_ratio_range']}); outside-step target <= 5%")
    path = write_results("online", device, {"settings": vars(args), "rounds": rounds, "rows": rows, **summary},
                         out_dir=args.out_dir)
    print(f"wrote {path}")
    return {"rows": rows, **summary}


if __name__ == "__main__":
    main()
