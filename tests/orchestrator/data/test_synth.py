"""The synthetic generator: determinism, structure, image content, and colour being a nuisance, not the label.

    cd /work/main && .venv/bin/python -m pytest tests/orchestrator/data/test_synth.py -q
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from orchestrator.data.shards import read_index, read_split
from orchestrator.data.synth import DOMAINS, SHAPES, TEXTURES, generate_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("synth") / "a")
    manifest = generate_synthetic(url, train=960, val=240, image_size=32, groups=6, classes_per_group=2,
                                  domains=2, seed=0, shard_rows=400, progress=False)
    return url, manifest


def _shard_bytes(url: str) -> dict[str, bytes]:
    return {f: open(os.path.join(url, f), "rb").read() for f in sorted(os.listdir(url)) if f.endswith(".parquet")}


def test_same_seed_gives_byte_identical_shards_other_seed_differs(synth, tmp_path):
    url, manifest = synth
    again = generate_synthetic(str(tmp_path / "b"), train=960, val=240, seed=0, shard_rows=400, progress=False)
    assert again.digest == manifest.digest
    assert _shard_bytes(str(tmp_path / "b")) == _shard_bytes(url)
    other = generate_synthetic(str(tmp_path / "c"), train=960, val=240, seed=1, shard_rows=400, progress=False)
    assert other.digest != manifest.digest
    assert [s.rows for s in other.shards] == [s.rows for s in manifest.shards]


def test_manifest_structure(synth):
    _, m = synth
    assert {k: v.rows for k, v in m.splits.items()} == {"train": 960, "val": 240}
    assert [s.path for s in m.shards] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet", "val-00000.parquet"]
    assert [s.rows for s in m.shards] == [400, 400, 160, 240]
    assert m.image_size == 32 and m.skipped.count == 0 and m.name == "synthetic"
    assert m.source == {"kind": "synthetic", "train": 960, "val": 240, "image_size": 32, "groups": 6,
                        "classes_per_group": 2, "domains": 2, "seed": 0, "image_format": "jpeg"}
    assert [g.name for g in m.groups] == list(SHAPES[:6])
    assert [d.name for d in m.domains] == list(DOMAINS[:2])
    assert [c.name for c in m.classes[:4]] == ["disc-solid", "disc-stripes", "square-solid", "square-stripes"]
    assert [c.group for c in m.classes] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(c.wnid is None for c in m.classes)


def test_rows_are_balanced_and_consistent(synth):
    url, m = synth
    for split, n in (("train", 960), ("val", 240)):
        index = read_index(url, split)
        labels = index.column("label").to_numpy()
        domains = index.column("domain").to_numpy()
        assert np.array_equal(index.column("group").to_numpy(), labels // 2)
        # Every (class, domain) pair equally often: 960 / 24 = 40, 240 / 24 = 10.
        pairs = np.bincount(labels * 2 + domains, minlength=24)
        assert pairs.min() == pairs.max() == n // 24
        keys = index.column("key").to_pylist()
        assert keys[0] == f"{split}/0000000" and len(set(keys)) == n


def test_images_decode_to_the_stored_size(synth, tmp_path):
    url, _ = synth
    table = read_split(url, "val")
    for data, h, w in zip(table.column("image").to_pylist()[:20], table.column("height").to_pylist(), table.column("width").to_pylist()):
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32) == (w, h)
    png_url = str(tmp_path / "png")
    m = generate_synthetic(png_url, train=12, val=0, image_size=20, groups=8, classes_per_group=4, domains=4,
                           image_format="png", progress=False)
    assert list(m.splits) == ["train"] and m.num_classes == 32 and len(m.domains) == 4
    table = read_split(png_url, "train")
    images = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    assert all(img.format == "PNG" and img.size == (20, 20) for img in images)
    assert len({np.asarray(img).tobytes() for img in images}) == 12


def _pixels(url: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = read_split(url, split)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])
    return images.astype(np.float32) / 255.0, table.column("label").to_numpy(), table.column("domain").to_numpy()


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[dist.argmin(1)] == test_y).mean())


def test_colour_is_a_nuisance_and_shape_carries_the_label(synth):
    """Mean colour must not predict the class; the figure's silhouette must predict the group."""
    url, m = synth
    tx, ty, td = _pixels(url, "train")
    vx, vy, vd = _pixels(url, "val")
    chance = 1.0 / m.num_classes
    colour = _nearest_centroid_accuracy(tx.mean(axis=(1, 2)), ty, vx.mean(axis=(1, 2)), vy)
    assert colour < 2.0 * chance, f"mean colour predicts the class at {colour:.2f} (chance {chance:.2f})"
    # Shape carries the group: in the photo domain the ground is a flat colour plus a linear gradient, so a
    # plane fitted to the border pixels predicts it; the pixels that differ form the figure's silhouette,
    # which, cropped to its box and resized to 8x8, sorts the groups with a nearest centroid.
    photo_t, photo_v = td == 0, vd == 0
    group = _nearest_centroid_accuracy(_silhouettes(tx[photo_t]), ty[photo_t] // 2,
                                       _silhouettes(vx[photo_v]), vy[photo_v] // 2)
    assert group > 0.7, f"silhouettes sort the groups at only {group:.2f} (chance {1 / len(m.groups):.2f})"


def _silhouettes(x: np.ndarray, threshold: float = 0.3, size: int = 8) -> np.ndarray:
    """Figure masks of photo-domain images [N, H, W, 3] in [0, 1], box-cropped and resized. [N, size*size]."""
    n, h, w, _ = x.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    border = np.zeros((h, w), dtype=bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    design = np.stack([np.ones(border.sum()), xx[border], yy[border]], axis=1)
    coef = np.linalg.lstsq(design, x[:, border].transpose(1, 0, 2).reshape(len(design), -1), rcond=None)[0]
    ground = (np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], axis=1) @ coef).reshape(h, w, n, 3).transpose(2, 0, 1, 3)
    out = []
    for mask in np.abs(x - ground).sum(-1) > threshold:
        rows, cols = np.flatnonzero(mask.sum(1) >= 2), np.flatnonzero(mask.sum(0) >= 2)  # ignore lone noisy pixels
        crop = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1] if len(rows) and len(cols) else mask
        out.append(np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)))
    return np.stack(out).reshape(n, -1).astype(np.float32) / 255.0


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"groups must be in \[1, 8\], got 9"):
        generate_synthetic(str(tmp_path / "x"), groups=9, progress=False)
    with pytest.raises(ValueError, match=r"classes_per_group must be in \[1, 4\]"):
        generate_synthetic(str(tmp_path / "x"), classes_per_group=len(TEXTURES) + 1, progress=False)
    with pytest.raises(ValueError, match="image_format"):
        generate_synthetic(str(tmp_path / "x"), image_format="gif", progress=False)
    assert not (tmp_path / "x").exists()
