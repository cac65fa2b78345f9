"""Dataset inputs carry the source MLflow resolves from the data URL (local, s3, http), not always "http"."""

from __future__ import annotations

import pytest

from orchestrator.tracking.tracker import Tracker


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('sources') / 'mlflow.db'}", "dataset-sources")


@pytest.mark.parametrize("url, source_type", [("LOCAL", "local"), ("s3://bucket/data/synth", "s3"),
                                              ("https://example.org/data", "http")])
def test_dataset_input_source_follows_the_url(tracker, tmp_path, url, source_type):
    run_id = tracker.create_run("chunk", {})
    url = str(tmp_path / "data") if url == "LOCAL" else url
    # MLflow keeps one dataset per (name, digest) in an experiment: each case its own name
    tracker.log_dataset(run_id, url, f"train-{source_type}", "d" * 40, "train")
    (dataset_input,) = tracker.get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.source_type == source_type
    assert url in dataset_input.dataset.source
