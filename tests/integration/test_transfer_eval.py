"""`streamssl eval` for real: the smallest run that leaves a chunk checkpoint (1 chunk, 1 epoch, 1 worker; its spec's
`eval.transfer` runs a linear probe on the synthetic set after the last chunk), then the command fine-tunes it on
10% of the synthetic set's labels, runs 5-way 5-shot episodes and a reconstruction probe, each as a Ray task; the
tests read the evaluation runs back from MLflow: nested under the chunk run, tagged, scored on its LoggedModel, with
their artifacts, and invisible to a resume of the plan. Detection (VOC) and segmentation (COCO) on the synthetic
shapes set made and prepared by `streamssl data`, two steps each, and detection's random-init baseline, which
scores no LoggedModel. Bad run ids and URLs exit with their codes and write nothing.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/integration/test_transfer_eval.py -q
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from cli.app import app
from orchestrator.data.manifest import load_manifest
from orchestrator.plan.planner import build_plan
from orchestrator.run.launch import run_experiment
from orchestrator.run.recovery import read_logged
from orchestrator.run.transfer import after_chunk_transfers
from orchestrator.spec.experiment import validate_spec
from orchestrator.tracking import tags as tr
from orchestrator.tracking.tracker import Tracker
from tests.specs import tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chunk_run(tmp_path_factory, synthetic_url, ray_local, migrated_mlflow_store):
    work = tmp_path_factory.mktemp("transfer")
    (work / "runs").mkdir()
    shutil.copyfile(migrated_mlflow_store, work / "runs" / "mlflow.db")  # the session's migrated empty store
    spec = validate_spec(tiny_spec(
        "transfer", synthetic_url, stream={"kind": "instance", "chunks": 1, "seed": 0},
        optim={"epochs_per_chunk": 1, "batch_size": 32},
        eval={"every_chunk": ["knn"], "baseline": False,
              "transfer": [{"task": "linear", "data": {"url": synthetic_url, "name": "synth"},
                            "linear": {"epochs": 20}, "after_chunks": ["last"]}]},
        resources={"workers": 1}, storage={"workdir": str(work / "runs")}))
    run_experiment(spec, console=Console(file=io.StringIO(), width=120))
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    (chunk,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    return {"spec": spec, "client": client, "chunk": chunk, "uri": spec.tracking_uri, "experiment": exp}


def _eval(chunk_run, *args: str):
    return CliRunner().invoke(app, ["eval", chunk_run["chunk"].info.run_id, *args, "--tracking-uri", chunk_run["uri"],
                                    "--json"], env={"COLUMNS": "200"})


def _evals(chunk_run) -> list:
    return chunk_run["client"].search_runs([chunk_run["experiment"].experiment_id],
                                           filter_string=f"tags.`{tr.RUN_TYPE}` = 'eval'")


def test_finetune_fewshot_and_reconstruction_are_logged_under_the_chunk_run(chunk_run, synthetic_url) -> None:
    client, chunk = chunk_run["client"], chunk_run["chunk"]
    chunk_id, model_id = chunk.info.run_id, chunk.data.tags[tr.MODEL_ID]
    digest = load_manifest(synthetic_url).digest
    done = {}
    for task, sets in (("finetune", ["fraction=0.1", "epochs=1"]), ("fewshot", []),
                       ("reconstruction", ["epochs=1", "reconstruction.hidden=16", "reconstruction.samples=4"])):
        result = _eval(chunk_run, "--task", task, "--data", synthetic_url, "--set", "data.name=synth",
                       *[a for s in sets for a in ("--set", s)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        done[task] = json.loads(result.stdout.strip().splitlines()[-1])  # the JSON line (logs go to stderr)

    scores = {k: v for d in done.values() for k, v in d["scores"].items()}
    assert set(scores) == {"synth.finetune_10pct_top1", "synth.finetune_10pct_top5", "synth.fewshot_5way5shot_mean",
                           "synth.fewshot_5way5shot_ci95", "synth.reconstruction_mse",
                           "synth.reconstruction_relative_mse"}
    assert 0 <= scores["synth.finetune_10pct_top1"] <= scores["synth.finetune_10pct_top5"] <= 1
    assert 0.2 < scores["synth.fewshot_5way5shot_mean"] <= 1 and 0 < scores["synth.fewshot_5way5shot_ci95"] < 0.05
    assert 0 < scores["synth.reconstruction_relative_mse"] < 10 and scores["synth.reconstruction_mse"] > 0
    assert done["finetune"]["metrics"]["train_rows"] == 120 and done["finetune"]["metrics"]["val_rows"] == 360

    for task, out in done.items():
        run = client.get_run(out["eval_run"])
        tags = run.data.tags
        assert out["evaluates"] == chunk_id and run.info.status == "FINISHED"
        assert tags[tr.PARENT] == chunk_id and tags[tr.EVALUATES] == chunk_id and tags[tr.RUN_TYPE] == "eval"
        assert tags[tr.TAG + "eval_task"] == task and tags[tr.TAG + "eval_set"] == "synth"
        assert tags[tr.LINE] == chunk.data.tags[tr.LINE] and tags[tr.CHUNK] == "0" and tr.PLAN_KEY not in tags
        assert run.data.params["task"] == task and run.data.params["image_size"] == "16"
        assert all(run.data.metrics[k] == pytest.approx(v) for k, v in out["scores"].items())
        (dataset,) = run.inputs.dataset_inputs
        assert (dataset.dataset.name, dataset.dataset.digest) == ("synth", digest[:36])
    assert client.get_run(done["finetune"]["eval_run"]).data.params["finetune.label_fraction"] == "0.1"

    subset = json.loads(Path(client.download_artifacts(done["finetune"]["eval_run"], "label_subset.json")).read_text())
    assert subset["rows"] == 120 and subset["class_counts"] == {str(c): 10 for c in range(12)}
    assert len(subset["keys"]) == 120 and subset["split"] == "train"
    episodes = json.loads(Path(client.download_artifacts(done["fewshot"]["eval_run"],
                                                         "fewshot_episodes.json")).read_text())
    assert len(episodes["accuracies"]) == 600 and (episodes["way"], episodes["shot"]) == (5, 5)
    png = Path(client.download_artifacts(done["reconstruction"]["eval_run"], "reconstructions.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The scores score the chunk's checkpoint as a LoggedModel, on the downstream set.
    ours = {d["eval_run"] for d in done.values()}
    logged = {m.key: m for m in client.get_logged_model(model_id).metrics if m.run_id in ours}
    assert set(logged) == set(scores)
    assert all(m.dataset_name == "synth" and m.value == pytest.approx(scores[m.key]) for m in logged.values())

    # The lineage walks to them; a resume of the plan still sees only the chunk's own evaluation.
    tracker = Tracker(chunk_run["uri"])
    assert {e.info.run_id for e in tracker.evaluation_of(chunk_id)} >= {d["eval_run"] for d in done.values()}
    record = read_logged(Tracker(chunk_run["uri"], chunk_run["spec"].experiment_name),
                         build_plan(chunk_run["spec"]), ["knn"])
    assert record.unevaluated == [] and record.partial == [] and len(record.results) == 1


def test_the_specs_eval_transfer_ran_after_the_last_chunk_and_a_resume_skips_it(chunk_run) -> None:
    chunk_id = chunk_run["chunk"].info.run_id
    (linear,) = [r for r in _evals(chunk_run) if r.data.tags.get(tr.TAG + "eval_task") == "linear"]
    assert linear.data.tags[tr.PARENT] == chunk_id and linear.data.tags[tr.EVALUATES] == chunk_id
    assert 1 / 12 < linear.data.metrics["synth.linear_top1"] <= linear.data.metrics["synth.linear_top5"] <= 1
    assert linear.data.params["linear.epochs"] == "20" and linear.info.status == "FINISHED"
    spec = chunk_run["spec"]
    tracker = Tracker(chunk_run["uri"], spec.experiment_name)
    plan = build_plan(spec)
    assert after_chunk_transfers(tracker, spec, plan, {plan.jobs[0].key: chunk_id}) == []  # logged already


def test_detection_and_segmentation_and_the_random_init_baseline(chunk_run, tmp_path, synthetic_url) -> None:
    client, chunk = chunk_run["client"], chunk_run["chunk"]
    model_id = chunk.data.tags[tr.MODEL_ID]
    runner = CliRunner()
    trees, voc, coco = tmp_path / "shapes", str(tmp_path / "shapes-voc"), str(tmp_path / "shapes-coco")
    for args in (["synth-detection", str(trees), "--train", "6", "--val", "3", "--image-size", "32",
                  "--num-classes", "2"],
                 ["prepare-detection", str(trees / "voc"), voc, "--format", "voc", "--classes", "disc,square"],
                 ["prepare-detection", str(trees / "coco"), coco, "--format", "coco"]):
        result = runner.invoke(app, ["data", *args])
        assert result.exit_code == 0, result.output
    tiny = ["steps=2", "min_size=32", "max_size=32", "fpn_channels=8", "box_head_dim=16", "mask_head_dim=8",
            "box_batch_size_per_image=16"]
    done = {}
    for name, task, url, extra in (("detection", "detection", voc, []), ("random", "detection", voc, ["init=random"]),
                                   ("segmentation", "segmentation", coco, [])):
        result = _eval(chunk_run, "--task", task, "--data", url, *[a for s in tiny + extra for a in ("--set", s)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        done[name] = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(done["detection"]["scores"]) == {f"shapes-voc.detection_{k}" for k in ("ap", "ap50", "ap75")}
    assert set(done["random"]["scores"]) == set(done["detection"]["scores"])
    assert set(done["segmentation"]["scores"]) == {f"shapes-coco.segmentation_{m}{k}" for m in ("", "mask_")
                                                   for k in ("ap", "ap50", "ap75")}
    for name, out in done.items():
        run = client.get_run(out["eval_run"])
        assert run.info.status == "FINISHED" and run.data.tags[tr.PARENT] == chunk.info.run_id
        assert run.data.metrics["steps"] == 2 and run.data.metrics["train_images"] == 6
        assert run.data.tags[tr.TAG + "eval_init"] == run.data.params["init"] == ("random" if name == "random"
                                                                                    else "checkpoint")
        assert all(0 <= v <= 1 and run.data.metrics[k] == pytest.approx(v) for k, v in out["scores"].items())
        assert f"{run.data.tags[tr.TAG + 'eval_task']}_training.json" in out["artifacts"]
    assert client.get_run(done["random"]["eval_run"]).info.run_name.endswith("shapes-voc.detection.random")
    # The trained backbone's scores score its LoggedModel; the random-init baseline's are not the checkpoint's.
    logged = {(m.run_id, m.key) for m in client.get_logged_model(model_id).metrics}
    assert {(done["detection"]["eval_run"], k) for k in done["detection"]["scores"]} <= logged
    assert not any(run_id == done["random"]["eval_run"] for run_id, _ in logged)
    # A classification set is not a detection set, and the other way round: each error says what to do.
    result = _eval(chunk_run, "--task", "detection", "--data", synthetic_url)
    assert result.exit_code == 2 and "holds a classification set" in result.output and "prepare-detection" in result.output


def test_bad_run_ids_and_urls_exit_with_their_code_and_write_nothing(chunk_run, synthetic_url, tmp_path) -> None:
    before = len(_evals(chunk_run))
    uri = chunk_run["uri"]
    result = CliRunner().invoke(app, ["eval", "0123456789abcdef", "--task", "fewshot", "--data", synthetic_url,
                                      "--tracking-uri", uri])
    assert result.exit_code == 5 and "run 0123456789abcdef not found" in result.output
    plan_run = chunk_run["chunk"].data.tags[tr.PARENT]
    result = CliRunner().invoke(app, ["eval", plan_run, "--task", "fewshot", "--data", synthetic_url,
                                      "--tracking-uri", uri])
    assert result.exit_code == 5 and f"RUN_ID {plan_run} is a plan run" in result.output
    result = _eval(chunk_run, "--task", "fewshot", "--data", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "nowhere' holds neither prepared shards" in result.output
    result = _eval(chunk_run, "--task", "fewshot", "--data", synthetic_url, "--set", "data.eval_split=test")
    assert result.exit_code == 2 and "split 'test' is not in" in result.output
    result = _eval(chunk_run, "--task", "fewshot", "--data", synthetic_url, "--set", "way=13")  # 12 classes
    assert result.exit_code == 4 and "way=13 needs 13 classes" in result.output
    tracker = Tracker(uri, chunk_run["spec"].experiment_name)
    bare = tracker.create_run("no checkpoint", {tr.RUN_TYPE: "chunk"})
    tracker.end_run(bare, "FAILED")
    result = CliRunner().invoke(app, ["eval", bare, "--task", "fewshot", "--data", synthetic_url, "--tracking-uri", uri])
    assert result.exit_code == 5 and f"RUN_ID {bare} (chunk run, FAILED) has no checkpoint" in result.output
    assert len(_evals(chunk_run)) == before
