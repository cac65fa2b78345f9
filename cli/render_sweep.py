"""`streamssl lineage` of a sweep or trial run, as a tree: sweep -> trials -> plan -> chunks -> evaluations."""

from __future__ import annotations

import json

from rich.tree import Tree

from orchestrator.lineage import sweep_lineage

STATE_STYLE = {"finished": "green", "stopped": "yellow", "failed": "red", "interrupted": "magenta"}


def _trial_node(parent: Tree, trial: dict) -> None:
    final = "-" if trial["final"] is None else f"{trial['final']:.4f}"
    style = STATE_STYLE.get(trial["state"], "white")
    node = parent.add(f"[bold]{trial['trial']}[/] {trial['run']} [{style}]{trial['state']}[/] "
                      f"{json.dumps(trial['values'])} -> {final}")
    if trial.get("error"):
        node.add(f"[red]error[/]: {trial['error'].splitlines()[-1][:200]}")
    for plan in trial["plans"]:
        plan_node = node.add(f"plan run {plan['plan']}")
        for chunk in plan["chunks"]:
            chunk_node = plan_node.add(f"{chunk['line']} chunk {chunk['index']}: run {chunk['chunk']} "
                                       f"[{chunk['status']}] checkpoint {chunk['checkpoint_uri']}")
            for eval_run in chunk["evals"]:
                chunk_node.add(f"evaluation run {eval_run}")


def sweep_tree(tracker, run_id: str) -> Tree:
    chain = sweep_lineage(tracker, run_id)
    if chain["run_type"] == "trial":
        tree = Tree(f"[bold]sweep run[/] {chain['sweep']}")
        _trial_node(tree, chain)
        return tree
    tree = Tree(f"[bold]sweep run[/] {chain['sweep']} [{chain['status']}]: {chain['metric']} ({chain['mode']}), "
                f"{len(chain['trials'])} trials")
    if chain.get("best_trial"):
        tree.add(f"best trial run {chain['best_trial']}; its spec: {chain.get('best_spec')}")
    for trial in chain["trials"]:
        _trial_node(tree, trial)
    return tree
