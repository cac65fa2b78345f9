"""`streamssl eval RUN_ID --task T --data URL`: transfer a chunk (or online segment) run's checkpoint to a downstream
set and log the evaluation under that run.

    streamssl eval 3f2c... --task finetune --data streamssl-runs/data/synth-downstream --set fraction=0.1 --set epochs=5
    streamssl eval 3f2c... --task fewshot --data streamssl-runs/data/imagenette-heldout --set way=4 --set shot=5
    streamssl eval 3f2c... --task linear --data ../shared/datasets/imagenette          # an ImageFolder tree works too
    streamssl eval 3f2c... --task finetune --data ... --set norm_rescale.mode=constant --set norm_rescale.target_norm=10
    streamssl eval 3f2c... --task detection --data /tmp/shapes-voc --set steps=300 --set min_size=64 --set max_size=64
    streamssl eval 3f2c... --task detection --data /tmp/shapes-voc --set init=random ...     # the from-scratch baseline
    streamssl eval 3f2c... --task segmentation --data /tmp/shapes-coco --set steps=300 --set min_size=64
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import console, exits_cleanly
from cli.options import DEFAULT_WORKDIR, TrackingUri, resolve_tracking_uri

TASK_HELP = ("finetune: the whole network on a class-balanced label fraction (top-1/top-5); linear: a probe on frozen "
             "features; fewshot: N-way K-shot episodes (mean, 95% interval); reconstruction: a decoder on frozen "
             "features (MSE, a PNG of samples); detection: Faster R-CNN on a detection set (box AP, AP50, AP75); "
             "segmentation: Mask R-CNN on a COCO-format set (box and mask AP).")


@exits_cleanly
def eval_command(
    run_id: str = typer.Argument(..., help="The chunk run (or online segment run) whose checkpoint to evaluate."),
    task: str = typer.Option(..., "--task", help=TASK_HELP),
    data: str = typer.Option(..., "--data", help="Downstream set: prepared shards (any fsspec URL or folder) or a "
                             "local ImageFolder tree (prepared once into streamssl-runs/downstream/NAME); for "
                             "detection/segmentation a set made by `streamssl data prepare-detection`."),
    sets: list[str] = typer.Option(
        [], "--set", "-s",
        help="A task option: fraction=0.01, epochs=5, way=10, shot=1, seed=1, finetune.lr=0.02, steps=300, "
             "min_size=64, init=random, norm_rescale.mode=constant, norm_rescale.target_norm=10, "
             "data.eval_split=test, data.name=pets."),
    tracking_uri: Optional[str] = TrackingUri,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to run on (ray://HEAD:10001 or auto). "
                                          "Default: a local Ray for this evaluation."),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation run, scores and metrics as JSON."),
) -> None:
    """Transfer a checkpoint to a downstream set (as a Ray task, on a GPU when there is one) and log it in MLflow,
    nested under the run it evaluates and scoring its LoggedModel."""
    from orchestrator.run.transfer import evaluate_transfer
    from orchestrator.spec.transfer import transfer_spec
    from orchestrator.tracking.tracker import Tracker

    spec = transfer_spec(task, data, list(sets))
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    done = evaluate_transfer(tracker, run_id, spec, prepare_root=Path(DEFAULT_WORKDIR) / "downstream",
                             address=address)
    if as_json:
        typer.echo(json.dumps({"eval_run": done.run_id, "evaluates": done.evaluated, "scores": done.scores,
                               "metrics": done.metrics, "artifacts": done.artifacts, "device": done.device}))
        return
    from evaluators.report import results_table

    rows = [{"score": k, "value": f"{v:.4f}"} for k, v in done.scores.items()]
    console.print(results_table(rows, ["score", "value"], title=f"{spec.task} of {run_id} on {spec.data.set_name}"))
    console.print(f"eval run [bold]{done.run_id}[/] under {run_id} ({done.device}); artifacts: "
                  f"{', '.join(done.artifacts) or 'none'}", highlight=False)
