"""A short pre-training on the synthetic set and the kNN accuracy before and after it (CPU, ~30 s a method).

    random_init, trained, report = short_pretraining(tmp_path, "simclr", {"proj_hidden": 512}, lr=0.5)
    assert trained > random_init + 0.08

12 classes: chance is 0.083. Fixed seeds, so the numbers are reproducible on a machine.
"""

from __future__ import annotations

from typing import Any

import torch

from evaluators.features import extract_features
from evaluators.knn import knn_predict
from orchestrator.data.ingest import load_split_arrays
from orchestrator.data.manifest import load_manifest
from orchestrator.data.synth import generate_synthetic
from trainers.engine.loop import ChunkReport, LineTrainer, LoopConfig
from trainers.engine.types import Batch
from trainers.views.plan import view_plan


def knn_top1(backbone, bank, queries) -> float:
    def batches(arrays):
        for i in range(0, len(arrays.labels), 256):
            yield arrays.images[i : i + 256], torch.from_numpy(arrays.labels[i : i + 256])

    bank_feats, bank_labels = extract_features(backbone, batches(bank))
    query_feats, query_labels = extract_features(backbone, batches(queries))
    return float((knn_predict(bank_feats, bank_labels, query_feats, k=20) == query_labels).float().mean())


def short_pretraining(tmp_path, method: str, method_options: dict[str, Any], *, lr: float = 0.5,
                      epochs: int = 20, optimizer: str = "sgd", weight_decay: float = 1e-4, local_count: int = 0,
                      global_count: int = 2, preset: str = "symmetric", batch_size: int = 128, threads: int = 2,
                      **loop: Any) -> tuple[float, float, ChunkReport]:
    """(kNN top-1 at the random initialisation, after `epochs` epochs on 1000 synthetic images, the report).

    `threads` torch threads while it runs (the suite's default is one): these runs are the only work in the suite
    when they run (after the integration tests, on an idle Ray), and one thread left the second core idle for the
    ~15 min they took together (issue 23)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generate_synthetic(str(tmp_path), train=1000, val=400, image_size=32, seed=0, progress=False)
        manifest = load_manifest(str(tmp_path))
        bank = load_split_arrays(manifest, str(tmp_path), "train", 32)
        queries = load_split_arrays(manifest, str(tmp_path), "val", 32)
        views = view_plan(global_count=global_count, global_size=32, global_scale=(0.3, 1.0), local_count=local_count,
                          local_size=16, preset=preset, global_options={"blur_p": 0.0} if preset == "symmetric" else {})
        steps_per_epoch = len(bank.labels) // batch_size
        cfg = LoopConfig(method=method, strategy="sequential", image_size=32, views=views, backbone_width=32,
                         cifar_stem=False, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                         epochs_per_chunk=epochs, batch_size=batch_size, seed=0, method_options=method_options,
                         line_steps=epochs * steps_per_epoch, **loop)
        trainer = LineTrainer(cfg)
        random_init = knn_top1(trainer.backbone, bank, queries)
        labels = torch.from_numpy(bank.labels).long()

        def batches(epoch: int, skip: int):
            order = torch.randperm(len(bank.labels), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                rows = order[i : i + batch_size]
                yield Batch.from_images(bank.images[rows], labels=labels[rows], index=rows)

        report = trainer.train_chunk(0, batches, steps_per_epoch=steps_per_epoch)
        return random_init, knn_top1(trainer.backbone, bank, queries), report
    finally:
        torch.set_num_threads(before)
