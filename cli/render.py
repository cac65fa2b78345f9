"""Rendering for the terminal: the lineage tree of `streamssl lineage`.

    console.print(lineage_tree(tracker, run_id))   # plan -> chunk runs -> checkpoints -> eval runs, or back up
                                                   # (online: online run -> segment runs -> checkpoints -> scores)
"""

from __future__ import annotations

import json

from rich.tree import Tree

from orchestrator.errors import TrackingError
from orchestrator.lineage import lineage_dict, segment_row
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker


def _metrics(run, keys: tuple[str, ...] = ("knn_top1", "linear_top1", "final_loss")) -> str:
    found = [f"{k}={run.data.metrics[k]:.3f}" for k in keys if k in run.data.metrics]
    return ", ".join(found)


def _chunk_node(tracker: Tracker, node: Tree, run) -> None:
    tags = run.data.tags
    chunk = node.add(f"[bold]chunk run[/] {run.info.run_id} {tags.get(tr.LINE)} chunk {tags.get(tr.CHUNK)} "
                     f"[{run.info.status}] {_metrics(run)}")
    chunk.add(f"data: training chunks {tags.get(tr.TAG + 'training_chunks')} of stream {tags.get(tr.TAG + 'stream_digest', '')[:12]}")
    ckpt = chunk.add(f"checkpoint: {tags.get(tr.CHECKPOINT)}")
    for ev in tracker.evaluation_of(run.info.run_id):
        ckpt.add(f"[bold]eval run[/] {ev.info.run_id} [{ev.info.status}] {_metrics(ev)}")
    if tags.get(tr.TAG + "online") == "true" and tags.get(tr.PARENT):
        for segment in lineage_dict(tracker, run.info.run_id).get("segments", []):
            _segment_node(chunk, segment)


def _segment_node(node: Tree, row: dict) -> None:
    """segment run -> its checkpoint (LoggedModel) -> that checkpoint's evaluation."""
    final = " [bold]final[/]" if row["final"] else ""
    seg = node.add(f"[bold]segment run[/] {row['segment_run']} segment {row['segment']} stream batches "
                   f"{row['batches']} [{row['state']}]{final}")
    extra = ", ".join(f"{k}={row[k]:g}" for k in ("late_batches", "dropped_steps", "skipped_shards")
                      if row.get(k) is not None)
    ckpt = seg.add(f"checkpoint: {row['checkpoint_uri']}" + (f" (model {row['model_id']})" if row["model_id"] else ""))
    scores = ", ".join(f"{k}={row[k]:.3f}" for k in ("knn_top1", "linear_top1") if row.get(k) is not None)
    ckpt.add(f"evaluation: {scores or 'none yet'}" + (f"; {extra}" if extra else ""))


def lineage_tree(tracker: Tracker, run_id: str) -> Tree:
    run = tracker.get_run(run_id)
    kind = run.data.tags.get(tr.RUN_TYPE)
    if kind is None:
        raise TrackingError(f"run {run_id} is not a streamssl run (no {tr.RUN_TYPE} tag)")
    if kind in ("sweep", "trial"):
        from cli.render_sweep import sweep_tree

        return sweep_tree(tracker, run_id)
    chain: list = []  # from the plan down to `run`
    current = run
    while current is not None:
        chain.insert(0, current)
        if current.data.tags.get(tr.RUN_TYPE) == "plan":  # (above it: a sweep's trial, shown on the root)
            break
        parent_id = current.data.tags.get(tr.EVALUATES) or current.data.tags.get(tr.PARENT)
        current = tracker.get_run(parent_id) if parent_id else None
    root = chain[0]
    rt = root.data.tags
    tree = Tree(f"[bold]plan run[/] {root.info.run_id} ({rt.get(tr.TAG + 'spec_name')}) [{root.info.status}]")
    if "streamssl.sweep_run" in rt:
        tree.add(f"trial run {rt.get(tr.PARENT)} ({rt.get('streamssl.trial')}) of sweep run {rt['streamssl.sweep_run']}")
    tree.add(f"data: {rt.get(tr.TAG + 'data_url')} digest {rt.get(tr.TAG + 'data_digest')}")
    tree.add(f"stream: {rt.get(tr.TAG + 'stream_kind')} plan digest {rt.get(tr.TAG + 'stream_digest')}")
    tree.add("versions: " + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(rt.items())
                                     if k.startswith(tr.TAG + "version.")))
    if kind == "plan":
        for chunk_run in sorted(tracker.children(run_id, "chunk"),
                                key=lambda r: (r.data.tags.get(tr.LINE), int(r.data.tags.get(tr.CHUNK, 0)))):
            _chunk_node(tracker, tree, chunk_run)
        return tree
    chunk_run = chain[1] if len(chain) > 1 else run
    if chunk_run.data.tags.get(tr.RUN_TYPE) == "chunk":
        _chunk_node(tracker, tree, chunk_run)
    if kind == "segment":
        _segment_node(tree, segment_row(run))
    if kind == "eval":
        protocol = json.loads(run.data.tags.get(tr.TAG + "eval_protocol", "{}"))
        tree.add(f"evaluated run {run_id} with protocol v{protocol.get('version')}: "
                 f"bank {protocol.get('bank_split')}, queries {protocol.get('query_split')}")
    return tree
