"""Export a training-ready dataset: the labeled ground truth plus the pseudo labels.

--format coco writes DIR/train.json (ground truth and pseudo labels, the pseudo annotations
marked "pseudo": true with their "score"; pseudo image and annotation ids numbered above
the ground truth's) and DIR/val.json with --val; file names are relative to DIR (or copies
under DIR/images with --copy-images). --format yolo writes the ultralytics layout:
DIR/images/{train,val} (links to the images, or copies), DIR/labels/{train,val} and
DIR/data.yaml, so that `yolo detect train data=DIR/data.yaml` runs as it is. An image
that is both labeled and pseudo-labeled keeps its ground truth only.

DIR is dpl's own folder: dpl refuses a folder holding files it did not write, or an
input's folder, and never writes or deletes anything outside it.

--format label-studio / cvat write one file of the pseudo labels for human review instead:
Label Studio JSON tasks (pre-annotations in percent, with scores) or CVAT for images 1.1
XML, the images ordered by how much a look is worth (--top N keeps the first N). Read the
corrected labels back with dpl convert --format label-studio / cvat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import AllowOutsideRoot, RunDir, within
from dpl_tools.data.export_dataset import DATASET_FORMATS, SUMMARY_FILE, ExportSummary
from dpl_tools.data.pseudo_labels import dropped_warning
from dpl_tools.data.review import LOCAL_FILES, REVIEW_FORMATS
from dpl_tools.errors import DplError
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input
from dpl_tools.settings import AT_LEAST_1, UNIT
from dpl_tools.tables import ReportTable


def _print_summary(console: Console, summary: ExportSummary) -> None:
    images = summary.images
    title = (
        f"dpl export ({summary.format}, {summary.view} view) -> {summary.out}: "
        f"{images['labeled']} labeled + {images['pseudo']} pseudo-labeled train images, "
        f"{images['val']} val images"
    )
    table = ReportTable(title=title, title_justify="left")
    table.add_column("class", style="bold")
    for name in ("GT boxes", "pseudo boxes", "val boxes"):
        table.add_column(name, justify="right")
    keys = ("gt_boxes", "pseudo_boxes", "val_boxes")
    for c in summary.classes:
        table.add_row(c["name"], *(str(c[k]) for k in keys))
    table.add_row("all", *(str(sum(c[k] for c in summary.classes)) for k in keys), style="bold")
    console.print(table)
    if summary.pseudo_images_in_labeled:
        console.print(
            f"{summary.pseudo_images_in_labeled} pseudo-labeled image(s) are also labeled: "
            "their ground truth is exported, their pseudo labels are not"
        )
    if summary.pseudo_images_in_val:
        console.print(
            f"{summary.pseudo_images_in_val} pseudo-labeled image(s) are in the --val set: "
            "left out of the training set (training on them would leak the validation set)"
        )
    if summary.labeled_images_in_val:
        console.print(
            f"[yellow]warning:[/] {summary.labeled_images_in_val} labeled image(s) are also "
            "in the --val set: they are trained on and validated on",
            highlight=False,
        )
    if summary.dropped_rows:
        warning = dropped_warning(summary.labels, summary.dropped_rows)
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if summary.format == "yolo" and not images["val"]:
        console.print("no --val given: data.yaml's val points at the train images")
    console.print(f"figures in {Path(summary.out) / SUMMARY_FILE}")


OutOption = Annotated[
    Path,
    typer.Option(
        "--out",
        help="Export folder (new, or an earlier export); a file for label-studio (.json) "
        "and cvat (.xml).",
    ),
]
FmtOption = Annotated[
    str,
    typer.Option(
        "--format",
        help="coco or yolo (ultralytics layout): a training set; label-studio (JSON "
        "tasks with pre-annotations) or cvat (CVAT for images 1.1 XML): the pseudo "
        "labels for human review, most uncertain images first.",
    ),
]
LabelsOption = Annotated[
    Path | None,
    typer.Option(
        "--labels", help="Pseudo-label Parquet file or part folder (default <run-dir>/...)."
    ),
]
LabeledOption = Annotated[
    Path | None,
    typer.Option("--labeled", help="Labeled COCO JSON (default <run-dir>/split/labeled.json)."),
]
ViewOption = Annotated[
    str,
    typer.Option(
        "--view",
        help="Pseudo labels exported: polished (default), cls, reg or teacher (unpolished).",
    ),
]
MinScoreOption = Annotated[
    float | None,
    typer.Option(
        "--min-score",
        help="Leave out pseudo boxes whose detector score is below this (0..1).",
        callback=within(UNIT, float),
    ),
]
ValOption = Annotated[
    Path | None, typer.Option("--val", help="Val/test COCO JSON copied into the export.")
]
ImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images", help="Folder --labeled's file names are relative to (default its folder)."
    ),
]
UnlabeledImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--unlabeled-images",
        help="Folder the pseudo labels' file names are relative to (default --images).",
    ),
]
ValImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--val-images", help="Folder --val's file names are relative to (default --images)."
    ),
]
CopyImagesOption = Annotated[
    bool, typer.Option("--copy-images", help="Copy the images instead of linking to them.")
]
TopOption = Annotated[
    int | None,
    typer.Option(
        "--top",
        help="label-studio / cvat: only the N images most worth a human look (uncertain "
        "boxes, teacher and polisher disagreeing); default all, in that order.",
        callback=within(AT_LEAST_1),
    ),
]
ImagePrefixOption = Annotated[
    str,
    typer.Option(
        "--image-prefix",
        help="label-studio: put before each file name to make the task's image URL "
        "(default: Label Studio's local-files URL; e.g. https://host/images/).",
    ),
]


def command(
    out: OutOption,
    fmt: FmtOption,
    labels: LabelsOption = None,
    labeled: LabeledOption = None,
    view: ViewOption = "polished",
    min_score: MinScoreOption = None,
    val: ValOption = None,
    images: ImagesOption = None,
    unlabeled_images: UnlabeledImagesOption = None,
    val_images: ValImagesOption = None,
    copy_images: CopyImagesOption = False,
    top: TopOption = None,
    image_prefix: ImagePrefixOption = LOCAL_FILES,
    allow_outside_root: AllowOutsideRoot = False,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    console = Console()
    if fmt not in (*DATASET_FORMATS, *REVIEW_FORMATS):
        known = ", ".join((*DATASET_FORMATS, *REVIEW_FORMATS))
        raise DplError(f"--format {fmt!r}: choose from {known}")
    if fmt in REVIEW_FORMATS:
        dataset_only = {"--labeled": labeled, "--val": val, "--images": images,
                        "--unlabeled-images": unlabeled_images, "--val-images": val_images,
                        "--copy-images": copy_images or None}  # fmt: skip
    else:
        dataset_only = {
            "--top": top,
            "--image-prefix": None if image_prefix == LOCAL_FILES else image_prefix,
        }
    unused = [name for name, value in dataset_only.items() if value is not None]
    if unused:
        raise DplError(f"{', '.join(unused)}: not used by --format {fmt}")
    if fmt in REVIEW_FORMATS:
        labels = resolve_input(labels, run_dir, "labels", "--labels")
        review = api.export_review(
            labels, out, fmt, view=view, top=top, image_prefix=image_prefix, min_score=min_score
        )
        console.print(
            f"{review.images} image(s), {review.boxes} {view} pseudo boxes, most worth a "
            f"review first, written to {review.path} ({fmt})"
        )
        if fmt == "label-studio":
            console.print("Label Studio labeling config for these tasks:", highlight=False)
            console.print(review.label_config, highlight=False, markup=False)
        return
    summary = api.export(
        resolve_input(labels, run_dir, "labels", "--labels"),
        resolve_input(labeled, run_dir, "labeled", "--labeled"), out, fmt, view=view,
        images=images, unlabeled_images=unlabeled_images, val=val, val_images=val_images,
        min_score=min_score, copy_images=copy_images, allow_outside_root=allow_outside_root,
        console=console,
    )  # fmt: skip
    _print_summary(console, summary)
