"""`data.decode: device`: Ray Data hands the training workers encoded JPEGs and each worker decodes its batch on
its own device. The images must match the CPU path's, a bad row must neither shrink a batch nor pass silently, and a
whole run must train and evaluate that way."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from orchestrator.errors import DataError
from orchestrator.experiment import run_experiment
from orchestrator.ingest import (
    DeviceBatchDecoder,
    chunk_dataset,
    decode_image,
    shard_refs,
    start_corrupt_row_counter,
)
from orchestrator.shards import load_manifest, read_index
from orchestrator.spec import validate_spec
from orchestrator.streams import make_plan
from tests.specs import tiny_spec

pytestmark = pytest.mark.slow


def test_encoded_rows_decode_on_the_worker_like_the_cpu_path(synthetic_url: str, ray_local) -> None:
    manifest = load_manifest(synthetic_url)
    plan = make_plan(read_index(synthetic_url, "train"), manifest, "instance", 2, seed=0)
    ds = chunk_dataset(shard_refs(manifest, synthetic_url, "train"), plan, [0], 24, decode="device")
    decoder = DeviceBatchDecoder(24, "cpu")
    rows = 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy", drop_last=True):
        images = decoder(batch)
        assert images.dtype == torch.uint8 and images.shape == (64, 3, 24, 24)
        for i in range(0, 64, 16):
            reference = decode_image(batch["image"][i], 24, str(batch["key"][i]))  # the Ray Data path's decode
            diff = np.abs(images[i].permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).mean()
            assert diff < 3.0, f"row {batch['key'][i]}: mean abs diff {diff:.2f} against the CPU path"
        rows += 64
    assert rows == (plan.chunks[0].rows // 64) * 64


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_corrupt_row_is_replaced_and_counted_or_fails_by_policy(ray_local) -> None:
    import ray

    batch = {"image": np.array([_jpeg(0), b"\xff\xd8 not really a jpeg", _jpeg(2), _jpeg(3)], dtype=object),
             "key": np.array(["a", "b", "c", "d"], dtype=object),
             "shard": np.array(["s3://bucket/train-00000.parquet"] * 4, dtype=object)}
    counter = start_corrupt_row_counter()
    images = DeviceBatchDecoder(16, "cpu", "skip", counter)(batch)
    assert images.shape == (4, 3, 16, 16)  # the batch keeps its size
    assert torch.equal(images[1], images[0])  # filled with another row of the batch
    assert ray.get(counter.totals.remote()) == {"rows": 1, "per_shard": {"s3://bucket/train-00000.parquet": 1},
                                                "keys": ["b"]}
    with pytest.raises(DataError, match=r"train-00000.parquet, row b: image cannot be decoded"):
        DeviceBatchDecoder(16, "cpu", "fail")(batch)


def test_a_run_with_device_decode_trains_and_evaluates(tmp_path, synthetic_url: str, ray_local) -> None:
    spec = validate_spec(tiny_spec("device-decode", synthetic_url, data={"decode": "device"}, stream={"chunks": 1},
                                   optim={"batch_size": 64}, storage={"workdir": str(tmp_path / "runs")}))
    run_experiment(spec, console=Console(file=io.StringIO()))
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking as tr

    client = MlflowClient(spec.tracking_uri)
    (chunk,) = client.search_runs([client.get_experiment_by_name("device-decode").experiment_id],
                                  f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    assert chunk.info.status == "FINISHED"
    assert chunk.data.metrics["steps"] == 2 * (1200 // 64)  # every step got a full batch
    assert np.isfinite(chunk.data.metrics["final_loss"])
    assert 0 <= chunk.data.metrics["knn_top1"] <= 1 and 0 <= chunk.data.metrics["linear_top1"] <= 1
