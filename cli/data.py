"""`streamssl data ...`: make, prepare and check the sharded data sets that experiments read.

    streamssl data synth file:///tmp/synth                                   # built-in synthetic set, seconds
    streamssl data prepare ../shared/datasets/imagenette file:///tmp/inette --groups groups.json
    streamssl data prepare ../shared/datasets/imagenette /tmp/inette-heldout --classes n03028079,n03445777
    streamssl data verify file:///tmp/inette
    streamssl data synth-detection /tmp/shapes                               # shapes with boxes and masks: VOC + COCO
    streamssl data prepare-detection /tmp/shapes/voc /tmp/shapes-voc --format voc --classes circle,square,triangle,cross
    streamssl data prepare-detection /tmp/shapes/coco /tmp/shapes-coco --format coco
    streamssl data verify s3://bucket/inette -o client_kwargs.endpoint_url=http://127.0.0.1:9000

S3 credentials come from the usual AWS environment variables or files; `-o/--storage-option` passes fsspec
options (dotted keys nest: ``client_kwargs.endpoint_url=...``). Values are never printed.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from cli.common import console, exits_cleanly
from orchestrator import storage
from orchestrator.data.manifest import Manifest
from orchestrator.data.prepare import prepare_imagefolder
from orchestrator.data.synth import DOMAINS, SHAPES, TEXTURES, generate_synthetic
from orchestrator.data.verify import verify

app = typer.Typer(help="Make, prepare and verify sharded data sets (Parquet shards + manifest.json).",
                  no_args_is_help=True)

STORAGE_OPTION_HELP = (
    "fsspec storage option KEY=VALUE, repeatable; dotted keys nest (client_kwargs.endpoint_url=http://...). "
    "Set it for S3-compatible stores other than AWS (MinIO, moto) or to pass keys not in the environment."
)


class ImageFormat(str, Enum):
    jpeg = "jpeg"
    png = "png"


class OnCorrupt(str, Enum):
    skip = "skip"
    fail = "fail"


def parse_storage_options(pairs: Optional[List[str]]) -> dict[str, Any] | None:
    """``["a.b=1", "key=x"]`` → ``{"a": {"b": 1}, "key": "x"}``; true/false/null and integers are typed."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {key.strip() or pair!r}", param_hint="--storage-option")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.lower() in ("null", "none"):
            value = None
        elif raw.lstrip("-").isdigit():
            value = int(raw)
        node = options
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise typer.BadParameter(f"{key!r} nests below a key that already has a value",
                                         param_hint="--storage-option")
        node[leaf] = value
    return options


def summary_table(manifest: Manifest, url: str) -> Table:
    """Rows per split, classes, groups, domains, shards, skipped files and digest of a data set."""
    table = Table(title=f"{manifest.name} at {storage.redact(url)}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for split, entry in manifest.splits.items():
        table.add_row(f"{split} rows", f"{entry.rows:,}")
    table.add_row("classes", str(manifest.num_classes))
    table.add_row("groups", str(len(manifest.groups)) if manifest.groups else "0 (none: no distant_class streams)")
    table.add_row("domains", f"{len(manifest.domains)} ({', '.join(d.name for d in manifest.domains)})")
    total = sum(s.bytes for s in manifest.shards)
    table.add_row("shards", f"{len(manifest.shards)} ({total / 2**20:,.1f} MiB)")
    table.add_row("image size", str(manifest.image_size) if manifest.image_size else "as in the source")
    table.add_row("skipped", str(manifest.skipped.count))
    table.add_row("digest", manifest.digest)
    return table


def _print_skipped(manifest: Manifest, limit: int = 10) -> None:
    for item in manifest.skipped.files[:limit]:
        console.print(f"[yellow]skipped[/] {item.file}: {item.reason}", highlight=False, soft_wrap=True)
    if manifest.skipped.count > limit:
        console.print(f"[yellow]... and {manifest.skipped.count - limit} more (listed in manifest.json)[/]")


@app.command("synth")
@exits_cleanly
def synth_command(
    dst: str = typer.Argument(..., help="Destination URL or folder (file://, s3://, memory://, a local path)."),
    train: int = typer.Option(10000, min=1, help="Training images. Lower it for quick tests; raise it for longer runs."),
    val: int = typer.Option(2000, min=0, help="Validation images (what kNN/linear evaluation scores on)."),
    image_size: int = typer.Option(32, min=8, max=1024, help="Side in pixels. Raise it only to test larger backbones/crops."),
    seed: int = typer.Option(0, help="Data seed. Change it for a different draw of the same design."),
    groups: int = typer.Option(6, min=1, max=len(SHAPES), help="Coarse groups (shapes). distant_class streams need at least one per chunk."),
    classes_per_group: int = typer.Option(2, min=1, max=len(TEXTURES), help="Classes (textures) per group."),
    domains: int = typer.Option(2, min=1, max=len(DOMAINS), help="Domains (styles). domain streams need at least one per chunk."),
    image_format: ImageFormat = typer.Option(ImageFormat.jpeg, "--format", help="Encoding. PNG is lossless but larger and slower to decode."),
    shard_rows: int = typer.Option(2500, min=1, help="Rows per shard. Aim for shards of tens to hundreds of MB on object stores."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a data set already at DST."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", "-o", help=STORAGE_OPTION_HELP),
) -> None:
    """Write the built-in synthetic data set: shapes (groups) x textures (classes) x styles (domains)."""
    manifest = generate_synthetic(
        dst,
        train=train,
        val=val,
        image_size=image_size,
        groups=groups,
        classes_per_group=classes_per_group,
        domains=domains,
        seed=seed,
        shard_rows=shard_rows,
        image_format=image_format.value,
        overwrite=overwrite,
        storage_options=parse_storage_options(storage_option),
        progress=True,
    )
    console.print(summary_table(manifest, dst))


@app.command("prepare")
@exits_cleanly
def prepare_command(
    src: Path = typer.Argument(..., help="ImageFolder tree: SRC/train/CLASS/*, SRC/val/CLASS/* or SRC/CLASS/*."),
    dst: str = typer.Argument(..., help="Destination URL or folder (file://, s3://, memory://, a local path)."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="JSON object {class_folder: group_name}. Needed for distant_class streams."),
    on_corrupt: OnCorrupt = typer.Option(OnCorrupt.skip, help="skip: leave unreadable images out and list them in the manifest; fail: stop at the first one."),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.99, help="Share held out as val when SRC has no train/ and val/ folders."),
    shard_rows: int = typer.Option(2000, min=1, help="Rows per shard. Lower it for many small workers; raise it for large object-store reads."),
    max_per_class: Optional[int] = typer.Option(None, min=1, help="Take only the first N images of each class and split (quick subsets, no copy)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class folders to prepare (labels "
                                          "0..k-1 in sorted order): pre-train on some classes, prepare the others "
                                          "as a held-out transfer set. Default: every class."),
    workers: Optional[int] = typer.Option(None, min=1, help="Decode threads (default: CPU count)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a data set already at DST."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", "-o", help=STORAGE_OPTION_HELP),
) -> None:
    """Turn an ImageFolder tree (ImageNet layout) into verified Parquet shards; every image is decoded once."""
    manifest = prepare_imagefolder(
        src,
        dst,
        groups_file=groups,
        on_corrupt=on_corrupt.value,
        val_fraction=val_fraction,
        shard_rows=shard_rows,
        max_per_class=max_per_class,
        classes=None if classes is None else [c.strip() for c in classes.split(",") if c.strip()],
        overwrite=overwrite,
        workers=workers,
        storage_options=parse_storage_options(storage_option),
        progress=True,
    )
    console.print(summary_table(manifest, dst))
    _print_skipped(manifest)


class AnnotationFormat(str, Enum):
    voc = "voc"
    coco = "coco"


@app.command("synth-detection")
@exits_cleanly
def synth_detection_command(
    dst: Path = typer.Argument(..., help="Local folder to write DST/voc (Pascal VOC layout) and DST/coco (COCO layout) into."),
    train: int = typer.Option(96, min=1, help="Training images."),
    val: int = typer.Option(32, min=0, help="Validation images (what AP is scored on)."),
    image_size: int = typer.Option(64, min=16, max=1024, help="Side in pixels."),
    num_classes: int = typer.Option(4, min=1, max=6, help="Shape classes (disc, square, triangle, cross, diamond, hexagon)."),
    seed: int = typer.Option(0, help="Data seed."),
) -> None:
    """Write the built-in detection set (1-3 shapes an image, boxes and instance masks) as VOC and COCO trees, to
    try `prepare-detection` and the detection and segmentation transfer tasks on."""
    from orchestrator.data.synth_detection import generate_detection_set  # torch-free CLI start: import on use

    try:
        made = generate_detection_set(dst, train=train, val=val, image_size=image_size, num_classes=num_classes,
                                      seed=seed)
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="DST") from None
    console.print(f"[green]wrote[/] {train} train + {val} val images of {image_size} px, classes "
                  f"{','.join(made.classes)}: VOC at {made.voc_root}, COCO at {made.coco_root}", highlight=False)


@app.command("prepare-detection")
@exits_cleanly
def prepare_detection_command(
    src: Path = typer.Argument(..., help="VOC tree (Annotations/, JPEGImages/, ImageSets/Main/SPLIT.txt) or COCO tree (annotations/instances_SPLIT.json, images/)."),
    dst: str = typer.Argument(..., help="Destination URL or folder (file://, s3://, memory://, a local path)."),
    annotation_format: AnnotationFormat = typer.Option(..., "--format", help="voc or coco."),
    splits: str = typer.Option("train,val", "--splits", help="Comma-separated splits to prepare."),
    classes: Optional[str] = typer.Option(None, "--classes", help="VOC only: comma-separated class names, labels 1..K in this order. Default: VOC's 20 classes."),
    images: str = typer.Option("images", "--images", help="COCO only: the image folder under SRC; may hold {split} (COCO 2017: '{split}2017')."),
    on_error: OnCorrupt = typer.Option(OnCorrupt.fail, "--on-error", help="fail: stop at the first bad record, naming its file; skip: leave it out and list it in the manifest."),
    shard_rows: int = typer.Option(500, min=1, help="Images per shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a detection set already at DST."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", "-o", help=STORAGE_OPTION_HELP),
) -> None:
    """Turn a Pascal VOC or COCO tree into verified detection shards (boxes, labels, masks) for
    `streamssl eval --task detection|segmentation`."""
    from orchestrator.data.detection_shards import prepare_detection_set  # imports torch: only when used

    names = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    if names is not None and annotation_format is AnnotationFormat.coco:
        raise typer.BadParameter("a COCO file names its own categories; --classes is for VOC", param_hint="--classes")
    manifest = prepare_detection_set(
        str(src), dst, format=annotation_format.value, splits=[p.strip() for p in splits.split(",") if p.strip()],
        classes=names, images=images, on_error="raise" if on_error is OnCorrupt.fail else "skip",
        shard_rows=shard_rows, overwrite=overwrite, storage_options=parse_storage_options(storage_option))
    table = Table(title=f"{manifest.name} ({annotation_format.value}) at {storage.redact(dst)}")
    for column in ("split", "images", "objects", "shards"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, entry in manifest.splits.items():
        table.add_row(split, str(entry.rows), str(manifest.objects[split]), str(len(entry.shards)))
    console.print(table)
    console.print(f"classes (label 1..{len(manifest.classes)}): {', '.join(c.name for c in manifest.classes)}",
                  highlight=False)
    for item in manifest.skipped[:10]:
        console.print(f"[yellow]skipped[/] {item.file}, {item.record}: {item.reason}", highlight=False, soft_wrap=True)
    if len(manifest.skipped) > 10:
        console.print(f"[yellow]... and {len(manifest.skipped) - 10} more (listed in detection_manifest.json)[/]")


@app.command("verify")
@exits_cleanly
def verify_command(
    url: str = typer.Argument(..., help="Data set URL (its folder or manifest.json)."),
    quick: bool = typer.Option(False, "--quick", help="Check presence and sizes only; skip reading every byte (for large remote sets)."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", "-o", help=STORAGE_OPTION_HELP),
) -> None:
    """Check every shard against the manifest (sha256, rows, schema, labels); exit 3 naming each bad shard."""
    report = verify(url, parse_storage_options(storage_option), deep=not quick, raise_on_error=True)
    console.print(summary_table(report.manifest, url))
    what = "present with the recorded sizes" if quick else "match their sha256, rows and schema"
    console.print(f"[green]ok[/]: all {len(report.shards)} shards {what}")
