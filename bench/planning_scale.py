"""Planning the streaming study at ImageNet scale, and what grows with rows: before anyone rents a cluster.

    python -m bench.planning_scale                          # 1,281,167 rows and 10x that, every stream kind
    python -m bench.planning_scale --scales 1 2.5 5         # when memory is short for 10x
    python -m bench.planning_scale --rows 20000 --scales 1 2 --ray-shards 2   # a small look (a minute)

The data is `bench.index_fixture`: a metadata-only set (1,000 classes in 67 groups, 4 domains, shards of 2,000 rows
in class order as `streamssl data prepare` writes ImageNet, no image bytes). For every stream kind and scale:

- **planning**: `orchestrator.plan.planner.build_plan` of `examples/streaming_imagenet.yaml` (the full protocol: 10 lines,
  4 chunks, 40 jobs) pointed at the set with `--set data.url=... --set stream.kind=...`, in a fresh spawned process
  (`--in-process` to skip that), timed; of which `make_plan` alone (timed again on a fresh index read).
  Peak memory is the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just
  before planning) minus its resident set then: it counts Python, numpy and Arrow's own allocator alike (tracemalloc
  would miss Arrow's buffers and slow the per-key loops). Where clear_refs is refused, ru_maxrss is used and the
  JSON says so.
- **artifacts**: what the driver logs to the plan run: `stream_plan.json` (as `Tracker.log_json` writes it) and the
  key->chunk table `stream_assignment.parquet` (`pq.write_table(plan.stream.assignment_table())` as
  `orchestrator.run.experiment` does), their bytes; and the pickled StreamPlan, which every Ray Dataset's read UDF
  carries (the runner builds one Dataset per (strategy, chunk) of a worker group: 20 here).
- **the read plan of chunk 0**: `orchestrator.data.ingest.chunk_dataset` as the runner builds it (the spec's decode), with
  Ray started in this process on `--ray-cpus` CPUs: built lazily, its logical plan printed, the read tasks (one per
  shard), the bytes a pass reads (every shard in full), the rows it keeps and the shards that hold any of them; the
  read UDF run in this process on one shard (the filter's cost per shard); and the read executed through Ray for the
  first `--ray-shards` shards only, its row count checked against the plan's.

Results: `bench/results/planning_scale-<host>.json` (or `--json PATH`); the fixtures live in a temp folder unless
`--workdir` keeps them for the next run.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import pickle
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python bench/planning_scale.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, init_ray, print_table, scratch_dir, write_results
from bench.index_fixture import IMAGENET_TRAIN_ROWS, write_index_dataset

DEFAULT_SPEC = REPO_ROOT / "examples" / "streaming_imagenet.yaml"
KINDS = ("instance", "random_class", "distant_class", "domain")


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> str:
    """Reset the high-water mark so VmHWM measures from now on; returns the method the peak will be read with."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        if _status_kib("VmHWM") is not None:
            return "VmHWM after clear_refs"
    except OSError:
        pass
    return "ru_maxrss (process lifetime)"


def peak_rss_bytes(method: str) -> int:
    if method.startswith("VmHWM"):
        return int(_status_kib("VmHWM")) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------- planning (child)


def plan_one(spec_path: str, overrides: list[str], out_dir: str) -> dict[str, Any]:
    """Plan one stream kind as `streamssl run` does, measure it, write its artifacts and pickled plan to `out_dir`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.shards import read_index
    from orchestrator.plan.planner import build_plan
    from orchestrator.plan.streams import make_plan
    from orchestrator.spec.experiment import load_spec

    spec = load_spec(spec_path, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = reset_peak_rss()
    rss_before, arrow_before = rss_bytes(), pa.total_allocated_bytes()
    started = time.perf_counter()
    plan = build_plan(spec)
    build_s = time.perf_counter() - started
    peak = peak_rss_bytes(method) - rss_before
    arrow_peak = pa.default_memory_pool().max_memory()

    plan_json = out / "stream_plan.json"
    plan_json.write_text(json.dumps(plan.stream.to_dict(), indent=2, sort_keys=True, default=str))
    assignment = out / "stream_assignment.parquet"
    started = time.perf_counter()
    pq.write_table(plan.stream.assignment_table(), assignment)
    assignment_s = time.perf_counter() - started
    pickled = pickle.dumps(plan.stream)
    (out / "plan.pkl").write_bytes(pickled)
    summary = {"kind": plan.stream.kind, "chunks": [c.rows for c in plan.stream.chunks], "jobs": len(plan.jobs),
               "lines": [line.id for line in plan.lines], "stream_digest": plan.stream.digest,
               "datasets_per_worker_group": len({(j.line.strategy, j.chunk) for j in plan.jobs})}
    manifest, stream = plan.manifest, pickle.loads(pickled)  # the rule only, as Ray tasks get it
    del plan  # before the breakdown below, so it does not stack a second plan's memory on the first's
    gc.collect()

    started = time.perf_counter()
    index = read_index(spec.data.url, spec.data.train_split, storage_options=spec.data.storage_options)
    read_index_s = time.perf_counter() - started
    started = time.perf_counter()
    again = make_plan(index, manifest, spec.stream.kind, spec.stream.chunks, spec.stream.seed)
    make_plan_s = time.perf_counter() - started
    same_digest = again.digest == stream.digest
    del again

    # Rows of chunk 0 in each shard: read_index concatenates the shards in manifest order.
    entries = manifest.shard_entries(spec.data.train_split)
    shard_of_row = np.repeat(np.arange(len(entries)), [e.rows for e in entries])
    chunk0 = np.bincount(shard_of_row[stream.chunk_of(index) == 0], minlength=len(entries))
    return {
        **summary, "rows": int(index.num_rows), "same_digest_twice": same_digest,
        "build_plan_s": build_s, "read_index_s": read_index_s, "make_plan_s": make_plan_s,
        "peak_rss_delta_bytes": int(peak), "rss_before_bytes": int(rss_before), "memory_method": method,
        "arrow_pool_peak_bytes": int(arrow_peak), "arrow_allocated_before_bytes": int(arrow_before),
        "stream_plan_json_bytes": plan_json.stat().st_size, "assignment_parquet_bytes": assignment.stat().st_size,
        "assignment_write_s": assignment_s, "plan_pickle_bytes": len(pickled),
        "chunk0_rows_per_shard": chunk0.tolist(),  # summarised by main() before the JSON is written
    }


def _child(queue, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which raises)
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`fn(*args)` in a fresh spawned interpreter (its own peak memory, nothing left over from earlier kinds)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"planning in a child process failed: {value}")
    return value


# ---------------------------------------------------------------------------------------------- read plan (parent)


def read_plan(spec_path: str, overrides: list[str], planned: dict[str, Any], plan_path: Path,
              ray_shards: int) -> dict[str, Any]:
    """The Ray Data read of chunk 0, built lazily as the runner builds it; a few shards of it executed."""
    import numpy as np
    from ray import cloudpickle

    from orchestrator.data.ingest import ReadChunkRows, chunk_dataset, shard_refs
    from orchestrator.data.manifest import load_manifest
    from orchestrator.spec.experiment import load_spec

    spec = load_spec(spec_path, overrides)
    plan = pickle.loads(plan_path.read_bytes())
    manifest = load_manifest(spec.data.url)
    refs = shard_refs(manifest, spec.data.url, spec.data.train_split)
    started = time.perf_counter()
    ds = chunk_dataset(refs, plan, [0], spec.data.image_size, spec.data.storage_options, decode=spec.data.decode,
                       seed=spec.seed * 1009)
    build_s = time.perf_counter() - started
    udf = ReadChunkRows(plan, [0], spec.data.storage_options)
    udf_bytes = len(cloudpickle.dumps(udf))

    one = {"url": np.array([refs[0].url]), "sha256": np.array([refs[0].sha256])}
    started = time.perf_counter()
    kept = sum(block.num_rows for block in udf(one))
    filter_s = time.perf_counter() - started

    k = min(ray_shards, len(refs))
    started = time.perf_counter()
    executed = chunk_dataset(refs[:k], plan, [0], spec.data.image_size, spec.data.storage_options,
                             decode=spec.data.decode, seed=spec.seed * 1009).count()
    executed_s = time.perf_counter() - started
    per_shard = planned["chunk0_rows_per_shard"]
    return {
        "logical_plan": str(ds), "build_s": build_s, "read_tasks": len(refs), "decode": spec.data.decode,
        "pass_reads_bytes": sum(e.bytes for e in manifest.shard_entries(spec.data.train_split)),
        "rows_selected": int(plan.chunks[0].rows), "shards_with_rows": int(sum(1 for n in per_shard if n)),
        "filter": _filter_rule(plan), "read_udf_pickle_bytes": udf_bytes,
        "udf_one_shard_s": filter_s, "udf_one_shard_rows": int(kept), "udf_one_shard_expected": int(per_shard[0]),
        "executed_shards": k, "executed_s": executed_s, "executed_rows": int(executed),
        "executed_expected": int(sum(per_shard[:k])),
    }


def _filter_rule(plan) -> str:
    """What ReadChunkRows keeps, in words (StreamPlan.chunk_of's rule for the kind)."""
    if plan.kind == "instance":
        return (f"blake2b-64 of each row key, binary search in {len(plan._key_hashes):,} sorted hashes "
                "(12 bytes a row)")
    unit = "domain" if plan.kind == "domain" else "label"
    return f"{unit} -> chunk lookup table of {len(plan._unit_chunk)} entries; keep chunk 0 ({plan.chunks[0].rows:,} rows)"


# ---------------------------------------------------------------------------------------------- the whole run


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kind, each scale against the first: rows, time per row and bytes per row as multiples of the first's."""
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in results):
        mine = [r for r in results if r["kind"] == kind]
        base = mine[0]
        for r in mine[1:]:
            def per_row(result, key):
                return result[key] / result["rows"]

            rows.append({
                "kind": kind, "rows": r["rows"], "x rows": r["rows"] / base["rows"],
                "x build_plan s": r["build_plan_s"] / base["build_plan_s"],
                "build_plan us/row": 1e6 * per_row(r, "build_plan_s"),
                "x time/row": per_row(r, "build_plan_s") / per_row(base, "build_plan_s"),
                "peak B/row": per_row(r, "peak_rss_delta_bytes"),
                "x peak/row": per_row(r, "peak_rss_delta_bytes") / max(per_row(base, "peak_rss_delta_bytes"), 1e-12),
                "assignment B/row": per_row(r, "assignment_parquet_bytes"),
                "x assignment/row": per_row(r, "assignment_parquet_bytes") / per_row(base, "assignment_parquet_bytes"),
                "x plan.json": r["stream_plan_json_bytes"] / base["stream_plan_json_bytes"],
            })
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help=f"the protocol to plan [{DEFAULT_SPEC.name}]")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="spec override, as streamssl run's")
    parser.add_argument("--rows", type=int, default=IMAGENET_TRAIN_ROWS, help="training rows at scale 1 [1,281,167]")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0], help="multiples of --rows [1 10]")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=67, help="coarse groups (distant_class) [67]")
    parser.add_argument("--domains", type=int, default=4, help="domains (domain streams need >= chunks) [4]")
    parser.add_argument("--shard-rows", type=int, default=2000, help="rows per shard, as data prepare's default")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs of the in-process Ray [2]")
    parser.add_argument("--ray-shards", type=int, default=4, help="shards of chunk 0 read through Ray [4]")
    parser.add_argument("--in-process", action="store_true", help="plan in this process (no fresh child per kind)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the index sets here and reuse them")
    parser.add_argument("--json", type=Path, default=None, help="result path [bench/results/planning_scale-<host>.json]")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder of the default result path")
    args = parser.parse_args(argv)

    import ray

    started = time.perf_counter()
    results, fixtures = [], []
    with scratch_dir("planning") as scratch:
        root = Path(args.workdir or scratch)
        owns_ray = init_ray(args.ray_cpus)
        try:
            for scale in args.scales:
                rows = round(args.rows * scale)
                url = root / f"index-{rows}-{args.classes}c-{args.groups}g-{args.domains}d-{args.shard_rows}"
                t0 = time.perf_counter()
                reused = (url / "manifest.json").is_file()
                if not reused:
                    write_index_dataset(str(url), rows, args.classes, args.groups, args.domains, args.shard_rows)
                fixtures.append({"rows": rows, "url": str(url), "reused": reused, "write_s": time.perf_counter() - t0,
                                 "bytes": sum(p.stat().st_size for p in url.iterdir())})
                print(f"index: {rows:,} rows at {url} ({'reused' if reused else 'written'} in "
                      f"{fixtures[-1]['write_s']:.1f} s)", flush=True)
                for kind in args.kinds:
                    overrides = [*args.sets, f"data.url={url}", f"stream.kind={kind}",
                                 f"storage.workdir={root / 'work'}"]
                    out = root / f"artifacts-{rows}" / kind
                    run = plan_one if args.in_process else (lambda *a: isolated(plan_one, *a))
                    planned = run(str(args.spec), overrides, str(out))
                    reading = read_plan(str(args.spec), overrides, planned, out / "plan.pkl", args.ray_shards)
                    if not results:  # the first execution also starts Ray's worker processes: measure it again
                        cold = reading["executed_s"]
                        reading = read_plan(str(args.spec), overrides, planned, out / "plan.pkl", args.ray_shards)
                        reading["cold_executed_s"] = cold
                    planned["read_plan"] = reading
                    planned["scale"] = scale
                    per_shard = planned.pop("chunk0_rows_per_shard")
                    planned["chunk0_rows_in_shards"] = {"shards": len(per_shard), "max": max(per_shard),
                                                        "with_rows": sum(1 for n in per_shard if n)}
                    results.append(planned)
                    print(f"  {kind}: build_plan {planned['build_plan_s']:.1f} s, peak "
                          f"+{planned['peak_rss_delta_bytes'] / 2**20:.0f} MB", flush=True)
        finally:
            if owns_ray:
                ray.shutdown()
    total = time.perf_counter() - started

    table = [{
        "kind": r["kind"], "rows": r["rows"], "build_plan s": r["build_plan_s"], "read_index s": r["read_index_s"],
        "make_plan s": r["make_plan_s"], "peak RSS MB": r["peak_rss_delta_bytes"] / 2**20,
        "assignment MB": r["assignment_parquet_bytes"] / 2**20, "plan.json KB": r["stream_plan_json_bytes"] / 1024,
        "plan pickle MB": r["plan_pickle_bytes"] / 2**20, "read tasks": r["read_plan"]["read_tasks"],
        "chunk0 rows": r["read_plan"]["rows_selected"], "shards w/ rows": r["read_plan"]["shards_with_rows"],
        "udf 1 shard s": r["read_plan"]["udf_one_shard_s"],
        f"ray {r['read_plan']['executed_shards']} shards s": r["read_plan"]["executed_s"],
    } for r in results]
    columns = list(dict.fromkeys(c for row in table for c in row))
    print_table(f"planning {args.spec.name} (40 jobs a kind) on a metadata-only index", columns, table,
                caption=f"peak RSS: {results[0]['memory_method'] if results else '-'}, minus RSS before build_plan; "
                        f"{'in-process' if args.in_process else 'a fresh process per kind'}")
    ratios = _ratios(results)
    if ratios:
        print_table("what grows with rows (each scale against the first)", list(ratios[0]), ratios)
    settings = {"spec": str(args.spec), "sets": args.sets, "rows": args.rows, "scales": args.scales,
                "classes": args.classes, "groups": args.groups, "domains": args.domains,
                "shard_rows": args.shard_rows, "kinds": args.kinds, "ray_cpus": args.ray_cpus,
                "ray_shards": args.ray_shards, "in_process": args.in_process, "wall_s": total}
    payload = {"settings": settings, "fixtures": fixtures, "results": results, "table": table, "ratios": ratios}
    path = write_results("planning_scale", "cpu", payload, args.out_dir, args.json)
    print(f"wrote {path} ({total:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
