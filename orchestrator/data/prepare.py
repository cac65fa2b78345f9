"""`streamssl data prepare`: an ImageFolder tree (ImageNet layout) on local disk turned into Parquet shards.

    streamssl data prepare ../shared/datasets/imagenette file:///tmp/imagenette-shards --groups groups.json

    from orchestrator.data.prepare import prepare_imagefolder
    manifest = prepare_imagefolder("../shared/datasets/imagenette", "file:///tmp/inette")

Every image is decoded once; unreadable files are skipped and listed in the manifest, or stop the run.
The built-in synthetic set is written by :mod:`orchestrator.data.synth`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import pyarrow as pa
from PIL import Image, ImageFile

from orchestrator.data.manifest import ClassEntry, DomainEntry, GroupEntry, Manifest, SkippedFile
from orchestrator.data.shards import SHARD_SCHEMA, write_shards
from orchestrator.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class _Source:
    split: str
    label: int
    class_name: str
    rel: str  # path relative to the class folder
    path: str  # absolute path on disk
    shown: str  # path relative to the source folder, for messages and the manifest


def _image_files(folder: str) -> list[str]:
    """Image files below `folder` (recursive, sorted), relative to it; hidden files and folders ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, fn), folder))
    return sorted(found)


def _class_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _keep_classes(src: str, found: list[str], wanted: Sequence[str] | None) -> list[str]:
    """The class folders to prepare: all, or the named ones (in sorted order); a DataError naming unknown ones."""
    if wanted is None:
        return found
    unknown = [c for c in wanted if c not in found]
    if unknown or not wanted:
        raise DataError(f"--classes {','.join(wanted) or '(empty)'}: {unknown or 'no class'} not a class folder of "
                        f"{src}; its classes: {', '.join(found)}")
    return sorted(set(wanted))


def _scan(src: str, val_fraction: float, max_per_class: int | None,
          wanted: Sequence[str] | None = None) -> tuple[list[str], list[str], list[_Source], dict[str, Any]]:
    """Every class folder, the classes prepared (`wanted`, or all) and every candidate image of those with its
    split and label, in a deterministic order."""
    split_root = {s: os.path.join(src, s) for s in ("train", "val")}
    from_folders = all(os.path.isdir(p) for p in split_root.values())
    if from_folders:
        classes = _class_folders(split_root["train"])
        extra = sorted(set(_class_folders(split_root["val"])) - set(classes))
        if extra:
            raise DataError(f"{split_root['val']}: class folders {extra} have no counterpart in {split_root['train']}")
        roots = [("train", split_root["train"]), ("val", split_root["val"])]
        layout = {"layout": "train/val folders", "val_fraction": None}
    else:
        classes = _class_folders(src)
        roots = [(None, src)]
        layout = {"layout": "class folders", "val_fraction": val_fraction}
    if not classes:
        raise DataError(f"no images found under {src}: expected class folders (ImageNet layout: CLASS/IMAGE.JPEG, "
                        "optionally inside train/ and val/)")
    folders, classes = classes, _keep_classes(src, classes, wanted)
    label_of = {c: i for i, c in enumerate(classes)}
    items: list[_Source] = []
    for split, root in roots:
        for cls in (c for c in _class_folders(root) if c in label_of):
            folder = os.path.join(root, cls)
            files = _image_files(folder)
            if not files:
                raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            per_split: dict[str, int] = {}
            for rel in files:
                s = split or ("val" if _hash_fraction(f"{cls}/{rel}") < val_fraction else "train")
                if max_per_class is not None and per_split.get(s, 0) >= max_per_class:
                    continue
                per_split[s] = per_split.get(s, 0) + 1
                path = os.path.join(folder, rel)
                items.append(_Source(s, label_of[cls], cls, rel, path, os.path.relpath(path, src)))
    # Rows go into shards in a fixed pseudo-random order, not class by class: a reader streaming a few shards at a
    # time (Ray Data blocks, a local shuffle buffer) then sees every class in every batch.
    items.sort(key=lambda item: _hash_fraction("order/" + item.shown))
    return folders, classes, items, layout


def _read_groups(groups_file: str, classes: Sequence[str],
                 folders: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Group id per class and group names from a JSON object {class_folder: group_name}."""
    try:
        with open(groups_file, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"groups file {groups_file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"groups file {groups_file} is not readable JSON: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in doc.items()):
        raise DataError(f"groups file {groups_file} must be a JSON object {{class_folder: group_name}} of strings")
    unknown = sorted(set(doc) - set(folders if folders is not None else classes))
    if unknown:
        raise DataError(f"groups file {groups_file} names classes that are not folders of the source: {unknown}")
    missing = [c for c in classes if c not in doc]
    if missing:
        raise DataError(f"groups file {groups_file} gives no group for classes {missing}")
    names: list[str] = []
    for cls in classes:  # group ids in order of first appearance over the sorted classes
        if doc[cls] not in names:
            names.append(doc[cls])
    return [names.index(doc[c]) for c in classes], names


_KEEP_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}


def _load_image(path: str) -> tuple[bytes, int, int] | str:
    """(encoded bytes, height, width) after one full decode, or the reason the file is unusable.

    JPEG bytes are kept as they are (grayscale and CMYK included: readers convert to RGB); PNG too; other
    formats are re-encoded as PNG so every reader needs only JPEG and PNG decoders.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated file raises here (LOAD_TRUNCATED_IMAGES is False)
            width, height = img.size
            if img.format == "JPEG" or (img.format == "PNG" and img.mode in _KEEP_PNG_MODES):
                return data, height, width
            out = io.BytesIO()
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, format="PNG")
            return out.getvalue(), height, width
    # Decoders raise many types for bad input (OSError, SyntaxError, ValueError, struct.error, ...);
    # every one of them means "this file is not a usable image", which is what on_corrupt decides about.
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def prepare_imagefolder(
    src: str | os.PathLike,
    dst_url: str,
    *,
    groups_file: str | os.PathLike | None = None,
    on_corrupt: Literal["skip", "fail"] = "skip",
    val_fraction: float = 0.1,
    shard_rows: int = 2000,
    max_per_class: int | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Turn an ImageFolder tree (ImageNet layout) on local disk into shards at `dst_url`.

    Layout: ``src/train/<class>/*`` and ``src/val/<class>/*`` give the splits; otherwise ``src/<class>/*``
    with a hash of ``<class>/<file>`` holding out `val_fraction` (stable when files are added). Labels are
    class folders in sorted order; keys are ``{split}/{class}/{file}``. Every image is decoded once, in a
    pool of `workers` threads (default: CPU count); corrupt or truncated files are skipped and listed in the
    manifest (`on_corrupt="skip"`) or stop the run with a DataError naming the file (`"fail"`).
    `max_per_class` takes the first N files of each class and split (sorted by name), without copying.
    `groups_file` is a JSON object {class_folder: group_name}; group ids follow first appearance over the
    sorted classes. `classes` prepares only those class folders (labels 0..k-1 in their sorted order), e.g. the
    classes a pre-training set keeps and, in a second set, the ones held out of it for transfer; a name that is not
    a class folder is a DataError listing the folders.
    """
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process turned it on; truncated files would then pass as valid images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: prepare cannot detect "
                           "truncated files; leave it False")
    src = os.path.abspath(os.fspath(src))
    if not os.path.isdir(src):
        raise DataError(f"source folder {src} does not exist" if not os.path.exists(src) else f"source {src} is not a folder")
    wanted = None if classes is None else list(classes)
    folders, classes, items, layout = _scan(src, val_fraction, max_per_class, wanted)
    if not items:
        raise DataError(f"no images found under {src}")
    if groups_file is not None:
        class_groups, group_names = _read_groups(os.fspath(groups_file), classes, folders)
    else:
        class_groups, group_names = [-1] * len(classes), []
    class_entries = [
        ClassEntry(id=i, name=c, wnid=c if _WNID.match(c) else None, group=class_groups[i]) for i, c in enumerate(classes)
    ]
    skipped: list[SkippedFile] = []
    workers = workers or os.cpu_count() or 1

    def batches(pool: concurrent.futures.Executor, advance) -> Iterator[tuple[str, pa.Table]]:
        window = 256  # bounded memory: decode 256 files, hand their rows on, continue
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            rows: dict[str, dict[str, list]] = {}
            for item, result in zip(chunk, pool.map(_load_image, [i.path for i in chunk])):
                if isinstance(result, str):
                    if on_corrupt == "fail":
                        raise DataError(f"corrupt image {item.path}: {result} (use --on-corrupt skip to leave it out)")
                    skipped.append(SkippedFile(file=item.shown, reason=result))
                    continue
                data, height, width = result
                cols = rows.setdefault(item.split, {n: [] for n in SHARD_SCHEMA.names})
                cols["key"].append(f"{item.split}/{item.class_name}/{item.rel.replace(os.sep, '/')}")
                cols["image"].append(data)
                cols["label"].append(item.label)
                cols["group"].append(class_groups[item.label])
                cols["domain"].append(0)
                cols["height"].append(height)
                cols["width"].append(width)
            advance(len(chunk))
            for split, cols in rows.items():
                yield split, pa.table(cols, schema=SHARD_SCHEMA)
        if len(skipped) == len(items):
            raise DataError(f"no readable images under {src}: all {len(items)} files were skipped "
                            f"(first: {skipped[0].file}: {skipped[0].reason})")

    source = {
        "kind": "imagefolder",
        "path": src,
        **layout,
        "groups_file": os.path.abspath(os.fspath(groups_file)) if groups_file is not None else None,
        "max_per_class": max_per_class,
        "classes": None if wanted is None else classes,  # the prepared subset, sorted
        "on_corrupt": on_corrupt,
    }
    bar = progress_bar() if progress else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, bar or contextlib.nullcontext():
        task = bar.add_task(f"prepare {os.path.basename(src)}", total=len(items)) if bar else None
        return write_shards(
            dst_url,
            batches(pool, lambda n: bar.advance(task, n) if bar else None),
            name=os.path.basename(src),
            source=source,
            image_size=None,
            classes=class_entries,
            groups=[GroupEntry(id=i, name=n) for i, n in enumerate(group_names)],
            domains=[DomainEntry(id=0, name="default")],
            skipped=skipped,
            shard_rows=shard_rows,
            overwrite=overwrite,
            storage_options=storage_options,
        )


def progress_bar():
    """The rich progress bar that prepare and synth show."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
