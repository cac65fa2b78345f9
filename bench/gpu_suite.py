"""The GPU benchmark suite in one bounded call: every method x backbone step rate and the end-to-end input path.

    python -m bench.gpu_suite --out $OUT                # on a device lease: at most ~8.5 min (budget 500 s)
    python -m bench.gpu_suite --tiny --out /tmp/suite   # CPU smoke version (32 px, batch 4, 1 timed step), ~2 min here

Two phases, one process, each written to JSON after every cell (a command killed at its limit still leaves what
was measured):

1. **steps** (``bench.step_throughput``'s loops): the anchors first (``step_throughput.ANCHORS``: ResNet-18/50
   SimCLR and BYOL, MobileNetV2 and ViT-Tiny SimCLR at 224 px), then every other registered method x registered
   backbone. Each cell times streamssl's engine (``LineTrainer.train_chunk``) and the bare PyTorch loop of the same
   module (``bench.steps.BareLoop``: views, ``training_step``, backward, the method's hooks, SGD, EMA) on the same
   pre-made device batches, interleaved, and reports engine / bare as a ratio measured in the same run. Anchors get
   more repetitions than the rest of the matrix.
2. **end_to_end** (``bench.end_to_end --all --cells cross``): synthetic JPEG shards -> Ray Data ->
   ``train_chunk`` (``streamssl``) against the bare loop on pre-made batches (``bare``), for every method on
   ResNet-18 and SimCLR on every other backbone. Skipped, with the reason in the JSON, where Ray is not importable.

The budget (``--budget-s``) bounds the whole run: before each cell the suite estimates its time from the cells
measured so far and skips it (status ``skipped``, reason ``budget``) when it would end past its phase's share;
the end-to-end phase starts no cell past 90 % of the time left to it, and is skipped when under 10 % of the
budget is left; the total is checked at the end (``within_budget``). Output under ``--out``: ``gpu_suite.json`` (settings, every
cell, the anchor ratios, phase times), ``end_to_end.json``; a compact table is printed last. Exit status 0 only
when every cell ran, none failed and the budget held.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/gpu_suite.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import hardware, median, print_table, resolve_device
from bench.step_throughput import ANCHORS, gpu_suite_cells, measure_config
from bench.steps import StepConfig
from trainers.registry import BACKBONE_REGISTRY, METHOD_REGISTRY

# Settings per profile. "gpu": the performance goal's (224 px, batch 256, bf16, channels_last, paper heads);
# "tiny": the CPU smoke check of the same code paths.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {"size": 224, "batch": 256, "precision": "bf16", "channels_last": True, "small_heads": False,
            "width": None, "backbone_extra": {}, "warmup": 2, "steps": 4, "reps": 2, "anchor_warmup": 3,
            "anchor_steps": 8, "anchor_reps": 3, "budget_s": 500.0, "e2e_share": 0.28,
            "e2e": {"size": 224, "batch": 256, "steps": 8, "reps": 1, "synthetic_train": 2304,
                    "synthetic_size": 128, "shard_rows": 256}},
    "tiny": {"size": 32, "batch": 4, "precision": "fp32", "channels_last": False, "small_heads": True,
             # The slimmable twins at the same CPU size as the plain ones: a full-width slimmable MobileNetV2 on
             # 4-row batches sometimes diverged in the end-to-end cell (non-finite weights at step 2).
             "width": 8, "backbone_extra": {"vit_tiny": {"patch_size": 8}, "mobilenet_v2": {"width_mult": 0.25},
                                            "slimmable_vit_tiny": {"patch_size": 8},
                                            "slimmable_mobilenet_v2": {"width_mult": 0.25}},
             "warmup": 1, "steps": 1, "reps": 1, "anchor_warmup": 1, "anchor_steps": 1,
             "anchor_reps": 1, "budget_s": 240.0, "e2e_share": 0.5,
             "e2e": {"size": 32, "batch": 4, "steps": 2, "reps": 1, "synthetic_train": 16, "synthetic_size": 32,
                     "shard_rows": 8}},
}


def cell_plan(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of the step phase: backbone, method (None: not registered), anchor or not, steps."""
    out = []
    for backbone, method, note in gpu_suite_cells():
        anchor = (backbone, method) in ANCHORS or note == "anchor"
        key = "anchor_" if anchor else ""
        out.append({"backbone": backbone, "method": method, "anchor": anchor, "note": "" if note == "anchor" else note,
                    "warmup": profile[f"{key}warmup"], "steps": profile[f"{key}steps"], "reps": profile[f"{key}reps"]})
    return out


def estimate_s(cell: dict[str, Any], done: list[dict[str, Any]]) -> float:
    """Seconds the cell should take: the median measured seconds per loop step (set-up included) of the cells on the
    same backbone (else of all cells) times the cell's loop steps; 0 before anything was measured. The median, not
    the first cell's figure: that one holds the CUDA context's and cuDNN's start-up."""
    ok = [c for c in done if c.get("status") == "ok"]
    if not ok:
        return 0.0
    same = [c for c in ok if c["backbone"] == cell["backbone"]] or ok
    per_step = median([c["cell_seconds"] / c["loop_steps"] for c in same])
    return per_step * 2 * (cell["warmup"] + cell["steps"] * cell["reps"])


def step_phase(profile: dict[str, Any], device: str, deadline: float, out: Path,
               doc: dict[str, Any]) -> list[dict[str, Any]]:
    base = StepConfig(size=profile["size"], batch=profile["batch"], precision=profile["precision"],
                      channels_last=profile["channels_last"], small_heads=profile["small_heads"],
                      width=profile["width"], backbone_extra=profile["backbone_extra"])
    done: list[dict[str, Any]] = []
    doc["steps"] = done
    for cell in cell_plan(profile):
        row: dict[str, Any] = {"backbone": cell["backbone"], "method": cell["method"], "anchor": cell["anchor"]}
        if cell["method"] is None:
            done.append({**row, "status": "skipped", "note": cell["note"]})
            continue
        guess = estimate_s(cell, done)
        if time.perf_counter() + guess > deadline:
            done.append({**row, "status": "skipped", "note": f"budget: ~{guess:.0f} s would end past the phase's "
                                                             "share of --budget-s"})
            continue
        cfg = replace(base, backbone=cell["backbone"], method=cell["method"],
                      log_every=min(base.log_every, cell["steps"]))
        print(f"steps: {cfg.label}{' (anchor)' if cell['anchor'] else ''} ...", flush=True)
        started = time.perf_counter()
        try:
            res = measure_config(cfg, device, cell["steps"], cell["warmup"], cell["reps"])
            res = {**row, **res, "status": "ok"}
        except Exception as exc:  # memory, a method that cannot run on a backbone: record it, go on
            res = {**row, "status": "error", "error": f"{type(exc).__name__}: {exc}", "config": asdict(cfg)}
            print(f"  failed: {res['error']}", flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        res["cell_seconds"] = time.perf_counter() - started
        res["loop_steps"] = 2 * (cell["warmup"] + cell["steps"] * cell["reps"])
        res["estimated_seconds"] = guess
        done.append(res)
        write_suite(out, doc)
    return done


def e2e_phase(profile: dict[str, Any], device: str, seconds: float, out: Path, seed: int) -> dict[str, Any]:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped", "note": f"ray is not importable ({exc}); see bench/README.md for the wheels"}
    from bench import end_to_end

    e = profile["e2e"]
    argv = ["--device", device, "--all", "--cells", "cross", "--synthetic", "--synthetic-train",
            str(e["synthetic_train"]), "--synthetic-size", str(e["synthetic_size"]), "--shard-rows",
            str(e["shard_rows"]), "--size", str(e["size"]), "--batch", str(e["batch"]), "--steps", str(e["steps"]),
            "--reps", str(e["reps"]), "--variants", "streamssl", "bare", "--seed", str(seed),
            "--deadline-s", f"{max(0.0, seconds):.1f}", "--json", str(out / "end_to_end.json")]
    if profile["small_heads"]:
        argv.append("--small-heads")
    if profile["width"]:
        argv += ["--width", str(profile["width"])]
    for backbone, options in profile["backbone_extra"].items():
        argv += [f"--backbone-option={backbone}.{k}={json.dumps(v)}" for k, v in options.items()]
    if device == "cpu":
        argv += ["--ray-cpus", "2", "--decode-cpus", "0.5"]
    result = end_to_end.main(argv)
    return {"status": "ok", "argv": argv, "settings": result["settings"], "cells": result["cells"]}


def write_suite(out: Path, doc: dict[str, Any]) -> None:
    path = out / "gpu_suite.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def grid(cells: list[dict[str, Any]], value) -> list[dict[str, Any]]:
    """method rows x backbone columns of value(cell) for the printed summary."""
    by = {(c["backbone"], c["method"]): c for c in cells}
    rows = []
    for m in METHOD_REGISTRY.names:
        row: dict[str, Any] = {"method": m}
        for b in BACKBONE_REGISTRY.names:
            c = by.get((b, m))
            row[b] = value(c) if c and c.get("status") == "ok" else (c or {}).get("status", "-")[:7]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke size: 32 px, batch 4, 1 timed step, small heads")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto [cuda; --tiny: cpu]")
    parser.add_argument("--out", type=Path, default=None, help="output folder [$OUT, else bench/results/gpu_suite]")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole suite's time [500; --tiny 240]")
    parser.add_argument("--no-e2e", action="store_true", help="the step phase only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    launched = time.perf_counter()
    profile = PROFILES["tiny" if args.tiny else "gpu"]
    device = resolve_device(args.device or ("cpu" if args.tiny else "cuda"))
    budget = args.budget_s or profile["budget_s"]
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
                       / "gpu_suite")
    out.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    e2e_share = 0.0 if args.no_e2e else profile["e2e_share"]
    doc: dict[str, Any] = {
        "benchmark": "gpu_suite", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(),
        "settings": {"profile": "tiny" if args.tiny else "gpu", "device": device, "budget_s": budget,
                     "e2e_share": e2e_share, **{k: v for k, v in profile.items() if k != "e2e"},
                     "e2e": profile["e2e"], "anchors": [list(a) for a in ANCHORS],
                     "methods": list(METHOD_REGISTRY.names), "backbones": list(BACKBONE_REGISTRY.names)},
    }
    steps_deadline = launched + budget * (1 - e2e_share)
    t0 = time.perf_counter()
    cells = step_phase(profile, device, steps_deadline, out, doc)
    doc["steps_seconds"] = time.perf_counter() - t0
    doc["anchors"] = {f"{c['backbone']} {c['method']}": c.get("median_ratio") for c in cells if c["anchor"]}
    write_suite(out, doc)

    left = budget - (time.perf_counter() - launched)
    if args.no_e2e:
        doc["end_to_end"] = {"status": "skipped", "note": "--no-e2e"}
    elif left < 0.1 * budget:
        doc["end_to_end"] = {"status": "skipped", "note": f"budget: {left:.0f} s left of {budget:.0f} s"}
    else:
        t0 = time.perf_counter()
        try:  # cells start until 90 % of what is left: the last one may run over by its own time
            doc["end_to_end"] = e2e_phase(profile, device, 0.9 * left, out, args.seed)
        except (Exception, SystemExit) as exc:  # Ray failing to start must not lose the step phase
            doc["end_to_end"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        doc["end_to_end"]["seconds"] = time.perf_counter() - t0
    doc["wall_s"] = time.perf_counter() - launched
    doc["within_budget"] = doc["wall_s"] <= budget
    e2e_cells = doc["end_to_end"].get("cells", [])
    # complete: every step cell ran, and the end-to-end phase ran every cell (or was left out with --no-e2e)
    e2e_done = (doc["end_to_end"]["status"] == "ok" and all(c["status"] == "ok" for c in e2e_cells)) or args.no_e2e
    doc["complete"] = all(c["status"] == "ok" for c in cells) and e2e_done
    write_suite(out, doc)

    fmt = (lambda c: c.get("median_ratio"))
    print_table(f"engine / bare loop, same run ({device}, {profile['size']} px, batch {profile['batch']}, "
                f"{profile['precision']})", ["method", *BACKBONE_REGISTRY.names],
                grid(cells, fmt), caption="target >= 0.95; 'skipped'/'error': see gpu_suite.json")
    print_table("engine img/s", ["method", *BACKBONE_REGISTRY.names],
                grid(cells, lambda c: c["median_samples_per_s"]["engine"]))
    anchor_rows = [{"backbone": c["backbone"], "method": c["method"], "status": c["status"],
                    "engine img/s": (c.get("median_samples_per_s") or {}).get("engine"),
                    "bare img/s": (c.get("median_samples_per_s") or {}).get("bare"), "ratio": c.get("median_ratio"),
                    "same first loss": c.get("same_first_loss")} for c in cells if c["anchor"]]
    print_table("anchors: streamssl vs the bare loop", ["backbone", "method", "status", "engine img/s", "bare img/s",
                                                        "ratio", "same first loss"], anchor_rows)
    if e2e_cells:
        e2e_rows = [{"backbone": c["backbone"], "method": c["method"], "status": c["status"],
                     **({"streamssl img/s": c["results"]["streamssl"]["median_samples_per_s"],
                         "bare img/s": c["results"]["bare"]["median_samples_per_s"],
                         "ratio": c["results"]["streamssl"].get("median_ratio_vs_bare")}
                        if c["status"] == "ok" else {})} for c in e2e_cells]
        print_table("end to end: Ray Data -> train_chunk vs the bare loop on pre-made batches",
                    ["backbone", "method", "status", "streamssl img/s", "bare img/s", "ratio"], e2e_rows)
    else:
        print(f"end to end: {doc['end_to_end']}")
    print(f"suite: {doc['wall_s']:.0f} s of a {budget:.0f} s budget (steps {doc['steps_seconds']:.0f} s); "
          f"complete={doc['complete']} within_budget={doc['within_budget']}; wrote {out / 'gpu_suite.json'}")
    return doc


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["complete"] and outcome["within_budget"] else 1)
