"""`data.decode: device`: Ray Data hands the training workers encoded JPEGs and each worker decodes its batch on
its own device. The images must match the CPU path's, a bad row must neither shrink a batch nor pass silently, and a
whole run must train and evaluate that way."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from orchestrator.data.ingest import (
    DeviceBatchDecoder,
    chunk_dataset,
    decode_image,
    shard_refs,
    start_corrupt_row_counter,
)
from orchestrator.data.manifest import load_manifest
from orchestrator.data.shards import read_index
from orchestrator.errors import DataError
from orchestrator.plan.streams import make_plan
from orchestrator.run.launch import run_experiment
from orchestrator.spec.experiment import validate_spec
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


SHARDS = ["s3://bucket/train-00000.parquet", "s3://bucket/train-00001.parquet"]
CORRUPT = b"\xff\xd8 not really a jpeg"  # JPEG magic, then junk: both decoders refuse it


def _batch(bad_rows: set[int], size: int = 6) -> dict[str, np.ndarray]:
    """`size` rows keyed a, b, c, ... over two shards (alternating); the rows in `bad_rows` are corrupt."""
    return {"image": np.array([CORRUPT if i in bad_rows else _jpeg(i) for i in range(size)], dtype=object),
            "key": np.array([chr(ord("a") + i) for i in range(size)], dtype=object),
            "shard": np.array([SHARDS[i % 2] for i in range(size)], dtype=object)}


@pytest.mark.parametrize("bad_rows", [{0, 1}, {4, 5}, {0, 1, 2, 3, 5}], ids=["first two", "last two", "all but one"])
def test_adjacent_corrupt_rows_are_each_replaced_by_a_good_row_and_counted_once(ray_local, caplog, bad_rows) -> None:
    import ray

    batch = _batch(bad_rows)
    good = [i for i in range(6) if i not in bad_rows]
    clean = DeviceBatchDecoder(16, "cpu")(_batch(set()))  # what every row decodes to when none is corrupt
    counter = start_corrupt_row_counter()
    with caplog.at_level("WARNING", logger="orchestrator.data.ingest"):
        images = DeviceBatchDecoder(16, "cpu", "skip", counter)(batch)
    assert images.shape == (6, 3, 16, 16)  # the batch keeps its size
    for i in good:
        assert torch.equal(images[i], clean[i]), f"good row {i} changed"
    for i in bad_rows:
        assert any(torch.equal(images[i], clean[g]) for g in good), f"row {i} is not a copy of a good row"
    keys = [chr(ord("a") + i) for i in sorted(bad_rows)]
    per_shard = {shard: n for shard in SHARDS if (n := sum(SHARDS[i % 2] == shard for i in bad_rows))}
    assert ray.get(counter.totals.remote()) == {"rows": len(bad_rows), "per_shard": per_shard, "keys": keys}
    (record,) = [r for r in caplog.records if r.name == "orchestrator.data.ingest"]  # one warning for the batch
    assert all(f"row {k}" in record.getMessage() for k in keys)


def test_a_batch_with_no_good_row_fails_even_under_skip(ray_local) -> None:
    import ray

    counter = start_corrupt_row_counter()
    with pytest.raises(DataError, match=r"shard s3://bucket/train-00000.parquet, row a: image cannot be decoded.*"
                                        r"no row of its batch of 4 decodes"):
        DeviceBatchDecoder(16, "cpu", "skip", counter)(_batch({0, 1, 2, 3}, size=4))
    assert ray.get(counter.totals.remote())["rows"] == 0  # a failed batch is not tallied as skipped rows
    # under "fail" the first bad row is named, even with good rows left
    with pytest.raises(DataError, match=r"train-00001.parquet, row d: image cannot be decoded"):
        DeviceBatchDecoder(16, "cpu", "fail")(_batch({3, 4}))


def test_a_run_with_device_decode_trains_and_evaluates(tmp_path, synthetic_url: str, ray_local) -> None:
    spec = validate_spec(tiny_spec("device-decode", synthetic_url, data={"decode": "device"}, stream={"chunks": 1},
                                   optim={"batch_size": 64}, storage={"workdir": str(tmp_path / "runs")}))
    run_experiment(spec, console=Console(file=io.StringIO()))
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import tags as tr

    client = MlflowClient(spec.tracking_uri)
    (chunk,) = client.search_runs([client.get_experiment_by_name("device-decode").experiment_id],
                                  f"tags.`{tr.RUN_TYPE}` = 'chunk'")
    assert chunk.info.status == "FINISHED"
    assert chunk.data.metrics["steps"] == 2 * (1200 // 64)  # every step got a full batch
    assert np.isfinite(chunk.data.metrics["final_loss"])
    (evaluation,) = client.search_runs([client.get_experiment_by_name("device-decode").experiment_id],
                                       f"tags.`{tr.RUN_TYPE}` = 'eval'")
    ev = evaluation.data.metrics
    # the whole train split as bank, the whole val split as queries, nothing corrupt in the synthetic set
    assert (ev["bank_size"], ev["query_size"], ev["corrupt_rows_skipped"]) == (1200, 360, 0)
    for name in ("knn", "linear"):
        # the chunk run carries the evaluation's figure; an instance stream's one task is every query row
        assert chunk.data.metrics[f"{name}_top1"] == ev[f"{name}_top1"] == ev[f"{name}_task0"]
        correct = ev[f"{name}_top1"] * 360
        assert 0 <= round(correct) <= 360 and correct == pytest.approx(round(correct), abs=1e-6)
