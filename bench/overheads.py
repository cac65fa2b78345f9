"""Where the time goes around the training steps: start-up, per-chunk orchestration, checkpoints, MLflow logging.

    python -m bench.overheads                  # CPU: one tiny quickstart run (1 line, 3 chunks) + micro-benchmarks
    python -m bench.overheads --no-server      # skip the `mlflow server` part
    python -m bench.overheads --skip-run       # micro-benchmarks only

1. A real `streamssl run` as a subprocess, on examples/quickstart.yaml made tiny with `--set` (one line,
   SimCLR sequential, 3 chunks, 2 epochs per chunk, a shorter linear probe; synthetic data made beforehand so the
   run does not include generating it). It runs through ``bench.instrumented_run``: the real CLI, with the driver's
   steps wrapped to record timestamps (no orchestrator code edited). Figures come from the clock outside the
   process (launch, exit), from the MLflow store the run wrote (plan/chunk/eval run times and the metrics
   log_chunk writes: train_seconds, steps, eval_seconds) and from the wrappers' records (Ray start, worker group
   start and stop, the driver's MLflow calls), and the timing metrics the driver logs on chunk and plan runs
   (first_batch_seconds, data_wait_seconds, checkpoint_save/report_seconds, worker_group_start/stop_seconds,
   time_to_first_step_seconds).
2. Checkpoints: ``trainers.engine.checkpoint.save_state`` / ``load_state`` of a full training state (model, optimizer
   with momentum buffers, strategy, position) on local disk, and persisted to / restored from ``memory://`` the
   way Ray Train and the evaluator do it (pyarrow ``copy_files`` up, ``ray.train.Checkpoint.as_directory`` down).
3. MLflow logging through ``orchestrator.tracking.tracker.Tracker``: N calls logging one step's metrics, and the calls
   ``_Driver.log_chunk`` makes per chunk, against a SQLite store and against a real ``mlflow server`` on
   127.0.0.1 (its own SQLite store); per-call costs are divided by a measured step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/overheads.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.checkpoint_costs import checkpoint_costs
from bench.common import REPO_ROOT, add_common_arguments, median, print_table, resolve_device, write_results
from bench.logging_costs import LocalMlflowServer, logging_costs

QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
EXPERIMENT = "bench-overheads"
# The H100 figure for the bare loop (ResNet-18 SimCLR 224 px, batch 256): ~5,660 samples/s -> 45 ms/step.
H100_STEP_S = 256 / 5660


def tiny_overrides(args: argparse.Namespace, data_url: str, workdir: str) -> list[str]:
    sets = [
        f"name={EXPERIMENT}", f"storage.workdir={workdir}", f"data.url={data_url}",
        f"data.synthetic.train={args.train}", f"data.synthetic.val={args.val}",
        "lines.method=[simclr]", "lines.strategy=[sequential]", f"stream.chunks={args.chunks}",
        f"optim.epochs_per_chunk={args.epochs}", f"eval.linear.epochs={args.linear_epochs}",
    ]
    return sets + list(args.set or [])


# ---------------------------------------------------------------------------------------------- 1. the run


def make_data(args: argparse.Namespace, data_url: str) -> float:
    """The spec's synthetic set, generated before the run (timed on its own: a first run only)."""
    from orchestrator.data.synth import generate_synthetic
    from orchestrator.spec.experiment import load_spec

    spec = load_spec(QUICKSTART, tiny_overrides(args, data_url, "unused"))
    s = spec.data.synthetic
    started = time.perf_counter()
    generate_synthetic(data_url, train=s.train, val=s.val, image_size=s.image_size, groups=s.groups,
                       classes_per_group=s.classes_per_group, domains=s.domains, seed=s.seed, progress=False)
    return time.perf_counter() - started


def run_cli(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    data_url = str(scratch / "data")
    workdir = str(scratch / "runs")
    synth_s = make_data(args, data_url)
    events_path = scratch / "events.jsonl"
    log_path = scratch / "run.log"
    cmd = [sys.executable, "-m", "bench.instrumented_run", str(events_path), "run", str(QUICKSTART)]
    for item in tiny_overrides(args, data_url, workdir):
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
    print("running: " + " ".join(cmd[2:]), flush=True)
    launched = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=args.run_timeout)
    exited = time.time()
    log_text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"streamssl run failed with exit code {proc.returncode}:\n{log_text[-4000:]}")
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
    tracking_uri = f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    return {"launched": launched, "exited": exited, "synthetic_data_s": synth_s, "events": events,
            "tracking_uri": tracking_uri, "command": cmd, "log_tail": log_text[-3000:],
            "mlflow": read_mlflow(tracking_uri)}


def read_mlflow(uri: str) -> dict[str, Any]:
    """Plan, chunk and evaluation runs of the experiment, as plain dicts (times in seconds since the epoch)."""
    from orchestrator.tracking import tags as tr
    from orchestrator.tracking.tracker import Tracker

    tracker = Tracker(uri, EXPERIMENT)
    plans = tracker.runs(f"tags.`{tr.RUN_TYPE}` = 'plan'")
    if not plans:
        raise SystemExit(f"no plan run in {uri}")
    plan = sorted(plans, key=lambda r: r.info.start_time)[-1]

    def simple(run) -> dict[str, Any]:
        return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                "start": run.info.start_time / 1000, "end": (run.info.end_time or 0) / 1000 or None,
                "metrics": dict(run.data.metrics),
                "tags": {k: v for k, v in run.data.tags.items() if k.startswith(tr.TAG)}}

    chunks = [simple(r) for r in tracker.children(plan.info.run_id, "chunk")]
    evals = [simple(r) for r in tracker.children(plan.info.run_id, "eval")]
    chunks.sort(key=lambda r: (r["tags"].get(tr.LINE, ""), int(r["tags"].get(tr.CHUNK, 0))))
    return {"plan": simple(plan), "chunks": chunks, "evals": evals}


def analyse_run(run: dict[str, Any], checkpoint_save_s: float | None) -> dict[str, Any]:
    """Start-up stages and per-chunk fractions from the outside clock, MLflow, and the wrappers' records."""
    from orchestrator.tracking import tags as tr

    t0 = run["launched"]
    ev = run["events"]
    ml = run["mlflow"]

    def first(what: str, **match: Any) -> dict[str, Any] | None:
        for e in ev:
            if e["what"] == what and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    def all_of(what: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in ev if e["what"] == what and all(e.get(k) == v for k, v in match.items())]

    chunks = ml["chunks"]
    first_chunk = min(chunks, key=lambda c: c["start"]) if chunks else None
    init_ray = first("init_ray")
    group_call = first("train_group_call")
    group_return = first("train_group_return")
    worker_start = first("event", type="start")
    first_step_event = first("event", type="step")
    stages: list[dict[str, Any]] = []

    def stage(name: str, at: float | None, how: str, note: str = "") -> None:
        stages.append({"what": name, "s since launch": (at - t0) if at else None, "how": how, "note": note})

    imported = first("imports_done")
    stage("interpreter up, orchestrator (torch, pyarrow, rich) imported", imported["t"] if imported else None,
          "shim record after importing orchestrator.run.experiment")
    built = first("build_plan")
    stage("CLI + spec loaded, plan built (manifest, index, stream)",
          built["start"] + built["seconds"] if built else None, "wrapper: build_plan")
    tracker = first("Tracker")
    stage("MLflow tracker ready (mlflow import, store schema)",
          tracker["start"] + tracker["seconds"] if tracker else None, "wrapper: Tracker()")
    stage("MLflow plan run created (then params, spec, stream plan logged)", ml["plan"]["start"],
          "MLflow plan run start_time")
    stage("local Ray started", init_ray["start"] + init_ray["seconds"] if init_ray else None, "wrapper: init_ray")
    stage("worker group requested (eval actor started; the baseline evaluates meanwhile)",
          group_call["t"] if group_call else None, "wrapper: train_group call")
    stage("Ray Train worker group up (train fn entered on rank 0)",
          worker_start.get("worker_time") if worker_start else None, "worker 'start' event time")
    stage("first chunk: train_chunk entered", first_chunk["start"] if first_chunk else None,
          "MLflow chunk run start_time", "= the chunk event's 'started' (worker clock)")
    first_step_s = ml["plan"]["metrics"].get("time_to_first_step_seconds")
    stage("first training step starts (its batch in hand)",
          (first_chunk["start"] + first_chunk["metrics"].get("first_batch_seconds", 0.0)) if first_chunk else None,
          "MLflow: chunk start + first_batch_seconds",
          f"the driver's own figure: time_to_first_step_seconds = {first_step_s:.1f} s from the driver's start "
          "(after imports)" if first_step_s is not None else "")
    stage(f"first step event (step {first_step_event['step']}) received" if first_step_event else "first step event",
          first_step_event["t"] if first_step_event else None, "driver receipt of the worker's step event")
    stage("last chunk ended", max((c["end"] or 0) for c in chunks) if chunks else None, "MLflow chunk run end_time")
    stage("worker group returned", group_return["t"] if group_return else None, "wrapper: train_group return")
    stage("plan run finished (last evals, metrics, plots)", ml["plan"]["end"], "MLflow plan run end_time")
    cli_exit = first("exit")
    stage("CLI returned", cli_exit["t"] if cli_exit else None, "shim record")
    stage("process exited (Ray and interpreter shutdown)", run["exited"], "outside clock")

    # Per chunk, per line: training time and the gap before it (checkpoint + report + persist + next setup).
    per_chunk = []
    by_line: dict[str, list[dict[str, Any]]] = {}
    for c in chunks:
        by_line.setdefault(c["tags"].get(tr.LINE, "?"), []).append(c)
    log_chunk = all_of("driver.log_chunk")
    log_eval = all_of("driver.log_eval")
    evals_by_chunk_run = {e["tags"].get(tr.EVALUATES): e for e in ml["evals"]}
    for line, runs in by_line.items():
        runs.sort(key=lambda c: int(c["tags"].get(tr.CHUNK, 0)))
        for i, c in enumerate(runs):
            m = c["metrics"]
            span = (c["end"] - c["start"]) if c["end"] else None
            gap = (c["start"] - runs[i - 1]["end"]) if i > 0 and runs[i - 1]["end"] else None
            ev_run = evals_by_chunk_run.get(c["run_id"])
            per_chunk.append({
                "line": line, "chunk": int(c["tags"].get(tr.CHUNK, 0)), "steps": m.get("steps"),
                "train_s": m.get("train_seconds"), "chunk_run_span_s": span, "gap_before_s": gap,
                "eval_s": ev_run["metrics"].get("eval_seconds") if ev_run else None,
                "samples_per_s": m.get("samples_per_s"),
            })
    train = [p["train_s"] for p in per_chunk if p["train_s"]]
    gaps = [p["gap_before_s"] for p in per_chunk if p["gap_before_s"] is not None]
    evals_s = [p["eval_s"] for p in per_chunk if p["eval_s"] is not None]
    chunk_s = median(train)
    n_chunks = len(per_chunk)
    group_start = (worker_start["worker_time"] - group_call["t"]) if worker_start and group_call else None
    trainer_build = (first_chunk["start"] - worker_start["worker_time"]) if first_chunk and worker_start else None
    teardown = (group_return["t"] - max(c["end"] for c in chunks)) if group_return and chunks else None
    tail = (ml["plan"]["end"] - max(c["end"] for c in chunks)) if ml["plan"]["end"] and chunks else None
    rows: list[dict[str, Any]] = []

    def row(what: str, seconds: float | None, per_chunk_s: float | None, how: str, note: str = "") -> None:
        frac = per_chunk_s / chunk_s if per_chunk_s is not None and chunk_s == chunk_s and chunk_s else None
        rows.append({"what": what, "seconds": seconds, "per chunk s": per_chunk_s, "fraction of chunk": frac,
                     "how": how, "note": note})

    row("chunk training (train_chunk, median)", chunk_s, chunk_s, "MLflow metric train_seconds",
        "includes the Ray Data pipeline start and first-batch wait")
    row("between chunks: checkpoint save + ray.train.report + persist + next chunk setup", median(gaps),
        median(gaps), "MLflow: chunk k start - chunk k-1 end")
    row("worker group start (TorchTrainer -> train fn on rank 0), once per group", group_start,
        group_start / n_chunks if group_start is not None and n_chunks else None,
        "wrapper: train_group call -> worker 'start' event", f"amortised over {n_chunks} chunks")
    row("line trainer build + restore before the first chunk", trainer_build,
        trainer_build / n_chunks if trainer_build is not None and n_chunks else None,
        "worker 'start' event -> first chunk start", f"amortised over {n_chunks} chunks")
    row("last chunk end -> worker group returned (final report, shutdown)", teardown,
        teardown / n_chunks if teardown is not None and n_chunks else None, "wrapper: train_group return",
        f"amortised over {n_chunks} chunks")
    row("evaluation per chunk (kNN + linear probe, in the eval actor)", median(evals_s), median(evals_s),
        "MLflow metric eval_seconds", "concurrent with training (shares the CPUs), not on its critical path")
    row("driver MLflow logging per chunk (log_chunk)", median([e["seconds"] for e in log_chunk]),
        median([e["seconds"] for e in log_chunk]), "wrapper: _Driver.log_chunk", "driver thread, concurrent")
    row("driver MLflow logging per evaluation (log_eval)", median([e["seconds"] for e in log_eval]),
        median([e["seconds"] for e in log_eval]), "wrapper: _Driver.log_eval", "driver thread, concurrent")
    row("after the last chunk: pending evals + summary + plots", tail,
        tail / n_chunks if tail is not None and n_chunks else None, "MLflow: plan end - last chunk end",
        f"amortised over {n_chunks} chunks; overlaps the worker group teardown")
    row("checkpoint save_state of this model (local disk, micro-benchmark)", checkpoint_save_s, checkpoint_save_s,
        "section 2", "part of the between-chunks gap")
    waits = [c["metrics"].get("data_wait_seconds") for c in chunks if "data_wait_seconds" in c["metrics"]]
    firsts = [c["metrics"].get("first_batch_seconds") for c in chunks if "first_batch_seconds" in c["metrics"]]
    saves = [c["metrics"].get("checkpoint_save_seconds") for c in chunks if "checkpoint_save_seconds" in c["metrics"]]
    reports = [c["metrics"].get("checkpoint_report_seconds") for c in chunks
               if "checkpoint_report_seconds" in c["metrics"]]
    row("first batch of a chunk (Ray Data pipeline start)", median(firsts), median(firsts),
        "MLflow metric first_batch_seconds", "inside chunk training")
    row("data wait inside a chunk (all batches, first included)", median(waits), median(waits),
        "MLflow metric data_wait_seconds", "inside chunk training: the input path's share")
    row("chunk-end checkpoint: save_state on rank 0", median(saves), median(saves),
        "MLflow metric checkpoint_save_seconds", "worker clock")
    row("chunk-end checkpoint: ray.train.report (persist + sync)", median(reports), median(reports),
        "MLflow metric checkpoint_report_seconds", "worker clock")
    plan_m = ml["plan"]["metrics"]
    if "worker_group_stop_seconds" in plan_m:
        row("worker group teardown as the driver logs it", plan_m["worker_group_stop_seconds"],
            plan_m["worker_group_stop_seconds"] / n_chunks if n_chunks else None,
            "MLflow metric worker_group_stop_seconds",
            "over 10 s: Ray Train 2.60's PlacementGroupCleaner stop timed out (its controller log says so)"
            if plan_m["worker_group_stop_seconds"] > 10 else "")
    return {"stages": stages, "per_chunk": per_chunk, "orchestration": rows,
            "run_wall_s": run["exited"] - t0, "synthetic_data_s": run["synthetic_data_s"]}


def measured_step_s(spec, reps: int = 5) -> dict[str, Any]:
    """One worker's training step of the tiny run's setting, in this process (per-worker batch, CPU, fp32)."""
    from bench.step_throughput import StepConfig, StreamsslLoop, cycle, premade_batches

    b = spec.optim.batch_size // spec.resources.workers
    cfg = StepConfig(backbone=spec.backbone.name, width=spec.backbone.width, cifar_stem=spec.backbone.cifar_stem,
                     method="simclr", size=spec.view_size, input_size=spec.data.image_size, batch=b, precision="fp32",
                     channels_last=False, view_options={"scale": tuple(spec.views.global_.scale),
                                                        "blur_p": spec.views.global_.blur_p})
    loop = StreamsslLoop(cfg, "cpu")
    data = premade_batches(cfg, "cpu", 2)
    loop.run(cycle(data), 2)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        loop.run(cycle(data), 3)
        times.append((time.perf_counter() - t) / 3)
    return {"config": cfg.label, "step_s": times, "median_step_s": median(times)}


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--train", type=int, default=2400, help="synthetic training images of the tiny run [2400]")
    parser.add_argument("--val", type=int, default=600, help="synthetic held-out images [600]")
    parser.add_argument("--chunks", type=int, default=3, help="stream chunks [3]")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per chunk [2]")
    parser.add_argument("--linear-epochs", type=int, default=20, help="linear probe epochs [20]")
    parser.add_argument("--set", action="append", help="extra --set overrides for the run (repeatable)")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds before the run is given up [600]")
    parser.add_argument("--skip-run", action="store_true", help="micro-benchmarks only")
    parser.add_argument("--no-server", action="store_true", help="do not start an `mlflow server`")
    parser.add_argument("--log-calls", type=int, default=50, help="per-step logging calls timed per store [50]")
    parser.add_argument("--log-chunks", type=int, default=5, help="log_chunk-equivalent sequences per store [5]")
    parser.add_argument("--ckpt-reps", type=int, default=3, help="repetitions per checkpoint case [3]")
    parser.add_argument("--ckpt-models", nargs="+", default=["run", "resnet18-simclr", "resnet50-byol"],
                        choices=["run", "resnet18-simclr", "resnet50-byol"],
                        help="states to checkpoint: the tiny run's model, full-width ResNet-18 SimCLR, ResNet-50 BYOL")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run's folder here (default: a temp folder)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    from bench.step_throughput import StepConfig
    from orchestrator.spec.experiment import load_spec

    started = time.perf_counter()
    spec = load_spec(QUICKSTART, tiny_overrides(args, "unused", "unused"))
    scratch_ctx = tempfile.TemporaryDirectory(prefix="streamssl-bench-overheads-") if args.keep is None else None
    scratch = Path(scratch_ctx.name) if scratch_ctx else args.keep.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        # 2. checkpoints (first: the run's figure uses the save time of its model)
        models = {"run": StepConfig(backbone=spec.backbone.name, width=spec.backbone.width,
                                    cifar_stem=spec.backbone.cifar_stem, method="simclr", size=spec.view_size),
                  "resnet18-simclr": StepConfig(backbone="resnet18", method="simclr", size=224),
                  "resnet50-byol": StepConfig(backbone="resnet50", method="byol", size=224)}
        print("checkpoints ...", flush=True)
        ckpt = checkpoint_costs([(m, models[m]) for m in args.ckpt_models], args.ckpt_reps, scratch)
        results["checkpoints"] = ckpt
        run_save = next((c["median_local_save_s"] for c in ckpt if c["model"] == "run"), None)

        # 3. logging
        step = measured_step_s(spec)
        results["step"] = step
        steps_per_chunk = max(1, args.epochs * (args.train // args.chunks) // spec.optim.batch_size)
        import logging as _logging

        import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)

        _logging.getLogger("mlflow").setLevel(_logging.WARNING)  # "View run ... at" lines on every end_run
        print("MLflow logging: SQLite ...", flush=True)
        logging = [logging_costs(f"sqlite:///{scratch / 'logging' / 'mlflow.db'}", args.log_calls, args.log_chunks,
                                 steps_per_chunk, spec, (scratch / "logging" / "artifacts").as_uri())]
        if not args.no_server:
            print("MLflow logging: mlflow server ...", flush=True)
            try:
                # MLflow prints "View run ... at" to stdout after each end_run on a REST store (after an extra
                # get_run request, which stays in the measured cost: it is what the driver pays today).
                with LocalMlflowServer(scratch / "server") as server, open(os.devnull, "w") as null, \
                        contextlib.redirect_stdout(null):
                    entry = logging_costs(server.uri, args.log_calls, args.log_chunks, steps_per_chunk, spec)
                    entry["server_start_s"] = server.start_s
                    logging.append(entry)
            except RuntimeError as exc:
                print(f"mlflow server part skipped: {exc}", flush=True)
                logging.append({"uri": "mlflow server", "error": str(exc)})
        results["logging"] = logging

        # 1. the run
        if not args.skip_run:
            print("tiny streamssl run (subprocess) ...", flush=True)
            run = run_cli(args, scratch)
            results["run"] = {k: v for k, v in run.items() if k != "events"}
            results["run"]["events"] = run["events"]
            results["run_analysis"] = analyse_run(run, run_save)
    finally:
        if scratch_ctx is not None:
            scratch_ctx.cleanup()
    total = time.perf_counter() - started

    # ------------------------------------------------------------------ tables
    analysis = results.get("run_analysis")
    if analysis:
        print_table(f"launch -> first training step (tiny quickstart run: 1 line, {args.chunks} chunks, "
                    f"{args.epochs} epochs/chunk, run wall {analysis['run_wall_s']:.0f} s)",
                    ["what", "s since launch", "how", "note"], analysis["stages"],
                    caption=f"synthetic data generated before the run: {analysis['synthetic_data_s']:.1f} s "
                            "(a first run of the quickstart spends this too)")
        print_table("per-chunk orchestration (medians over the run's chunks)",
                    ["what", "seconds", "per chunk s", "fraction of chunk", "how", "note"], analysis["orchestration"])
        print_table("the run's chunks", ["line", "chunk", "steps", "train_s", "chunk_run_span_s", "gap_before_s",
                                         "eval_s", "samples_per_s"], analysis["per_chunk"])
    print_table(f"checkpoints: save_state / load_state (median of {args.ckpt_reps})",
                ["model", "model_tensors_M", "file_mb", "median_local_save_s", "median_local_load_s",
                 "median_memory_save_s", "median_memory_load_s"], ckpt,
                caption="memory://: save_state to a temp folder + pyarrow copy_files up; restore with "
                        "ray.train.Checkpoint.as_directory + load_state (as the evaluator and --resume do).")
    chunk_train = median([p["train_s"] for p in analysis["per_chunk"]]) if analysis else None
    log_rows = []
    for entry in logging:
        if "error" in entry:
            log_rows.append({"where": entry["uri"], "note": entry["error"][:80]})
            continue
        per_call = entry["median_per_call_s"]
        log_rows.append({"where": entry["uri"], "ms per step-metrics call": per_call * 1000,
                         "x measured step": per_call / step["median_step_s"],
                         "x H100 step (issue figure)": per_call / H100_STEP_S,
                         "log_chunk calls s": entry["median_log_chunk_s"],
                         "x chunk training": (entry["median_log_chunk_s"] / chunk_train) if chunk_train else None,
                         "server start s": entry.get("server_start_s")})
    print_table(f"MLflow logging through Tracker ({args.log_calls} step-metrics calls, {args.log_chunks} "
                "log_chunk-equivalent sequences)",
                ["where", "ms per step-metrics call", "x measured step", "x H100 step (issue figure)",
                 "log_chunk calls s", "x chunk training", "server start s", "note"], log_rows,
                caption=f"measured step: {step['config']} on CPU, {step['median_step_s'] * 1000:.0f} ms (one worker "
                        f"of the run). H100 step: 256 / 5,660 samples/s = {H100_STEP_S * 1000:.0f} ms, from the issue, "
                        "not measured here. The driver logs the loss curve once per chunk, not per step.")
    settings = {"device": device, "overrides": tiny_overrides(args, "<data>", "<workdir>"), "train": args.train,
                "val": args.val, "chunks": args.chunks, "epochs": args.epochs, "log_calls": args.log_calls,
                "log_chunks": args.log_chunks, "ckpt_reps": args.ckpt_reps, "wall_s": total}
    path = write_results("overheads", device, {"settings": settings, "results": results,
                                               "tables": {"logging": log_rows}}, args.out_dir)
    print(f"wrote {path} ({total:.0f} s)")
    return results


if __name__ == "__main__":
    main()
