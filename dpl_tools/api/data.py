"""The data stages from Python: convert annotations to COCO, split a labeled set, export a
training-ready dataset, write the HTML report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from rich.console import Console

from dpl_tools.data.coco import load_coco, save_coco
from dpl_tools.data.conversion import Conversion
from dpl_tools.data.convert import FORMATS, require_usable
from dpl_tools.data.convert import convert as convert_files
from dpl_tools.data.crossfit_detections import read_crossfit_detections
from dpl_tools.data.export import VIEWS, check_view_categories, pseudo_categories, view_boxes
from dpl_tools.data.export_dataset import (
    DATASET_FORMATS,
    DatasetInputs,
    ExportSummary,
    export_dataset,
)
from dpl_tools.data.pseudo_labels import read_pseudo_labels
from dpl_tools.data.review import (
    LOCAL_FILES,
    REVIEW_FORMATS,
    label_config,
    review_priority,
    review_queue,
    write_review,
)
from dpl_tools.data.split import Split, split_coco, split_paths, write_split
from dpl_tools.errors import DplError
from dpl_tools.evaluation.label_audit import ISSUES, audit_labels, write_audit
from dpl_tools.outputs import check_distinct_outputs
from dpl_tools.report.build import ReportResult, build_report
from dpl_tools.report.online import build_online_report
from dpl_tools.tables import print_report, print_skipped_files


def convert(
    src: str | Path,
    out: str | Path,
    format: str,
    *,
    split: str | None = None,
    classes: list[str] | None = None,
    images: str | Path | None = None,
    skip_difficult: bool = False,
    strict: bool = False,
    allow_outside_root: bool = False,
    console: Console | None = None,
) -> Conversion:
    """Convert Pascal VOC, YOLO or COCO annotations at ``src`` into one validated COCO JSON
    ``out`` (``dpl convert``); with a ``console``, its problems and skipped files are
    printed. Returns the conversion (its ``images_dir`` is the folder to pass as images)."""
    fmt = format.lower()
    if fmt not in FORMATS:
        raise DplError(f"unknown --format '{format}' (choose from {', '.join(FORMATS)})")
    if fmt in ("coco", *REVIEW_FORMATS) and split is not None:
        raise DplError("--split applies to --format voc and yolo only")
    if classes is not None and not classes:
        raise DplError("--classes is empty")
    check_distinct_outputs({"SRC": src, "--images": images}, {"--out": out})
    result = convert_files(
        fmt, src, split, classes, images, skip_difficult, strict=strict,
        allow_outside_root=allow_outside_root,
    )  # fmt: skip
    # the images folder found (e.g. through data.yaml's path) is read too
    check_distinct_outputs({"the images folder": result.images_dir}, {"--out": out})
    if console is not None:
        print_report(console, result.coco.report)
    try:
        require_usable(result, src)
    except DplError:
        if console is not None:
            print_skipped_files(console, result.skipped_files)
        raise
    save_coco(result.coco, out)
    return result


@dataclass
class SplitFiles:
    """A written split: the partition and its files (labeled, unlabeled, unlabeled_gt)."""

    split: Split
    files: dict[str, Path]


def split(
    ann: str | Path,
    out_dir: str | Path,
    *,
    percent: float | None = None,
    labeled_count: int | None = None,
    fold: int = 1,
    seed: int = 0,
    images: str | Path | None = None,
    allow_outside_root: bool = False,
    console: Console | None = None,
) -> SplitFiles:
    """Split a labeled COCO set by the SSOD protocol into labeled.json, unlabeled.json and
    unlabeled_gt.json in ``out_dir`` (``dpl split``): ``percent`` or ``labeled_count``."""
    if percent is not None and labeled_count is not None:
        raise DplError("give --percent or --labeled-count, not both")
    outputs = {f"--out-dir {p.name}": p for p in split_paths(out_dir).values()}
    check_distinct_outputs({"ANN": ann, "--images": images}, outputs)
    coco = load_coco(ann, images, allow_outside_root=allow_outside_root)
    if console is not None:
        print_report(console, coco.report)
    result = split_coco(coco, percent, labeled_count, fold, seed)
    return SplitFiles(result, write_split(result, out_dir))


def export(
    labels: str | Path,
    labeled: str | Path,
    out: str | Path,
    format: str = "yolo",
    *,
    view: str = "polished",
    images: str | Path | None = None,
    unlabeled_images: str | Path | None = None,
    val: str | Path | None = None,
    val_images: str | Path | None = None,
    min_score: float | None = None,
    copy_images: bool = False,
    allow_outside_root: bool = False,
    console: Console | None = None,
) -> ExportSummary:
    """Write a training-ready dataset into the folder ``out`` (``dpl export``): the labeled
    ground truth plus one ``view`` of the pseudo labels, as YOLO or COCO."""
    if format not in DATASET_FORMATS:
        raise DplError(f"--format {format!r}: choose from {', '.join(DATASET_FORMATS)}")
    if view not in VIEWS:
        raise DplError(f"--view {view!r}: choose from {', '.join(VIEWS)}")
    labels, labeled = Path(labels), Path(labeled)
    root = Path(images) if images is not None else labeled.parent
    inputs = DatasetInputs(
        labels=labels,
        labeled=labeled,
        images=root,
        unlabeled_images=Path(unlabeled_images) if unlabeled_images is not None else root,
        val=None if val is None else Path(val),
        val_images=Path(val_images) if val_images is not None else (root if val else None),
        allow_outside_root=allow_outside_root,
    )
    image_folders = {
        "--images" if images is not None else "the folder of --labeled": inputs.images,
        "--unlabeled-images": unlabeled_images,
        "--val-images": val_images,
    }
    check_distinct_outputs(image_folders, {"--out": out}, folders={"--out"})
    summary = export_dataset(inputs, out, format, view, min_score, copy_images)
    if console is not None:
        for report in summary.reports:
            if not report.clean:
                print_report(console, report)
    return summary


@dataclass
class ReviewFile:
    """A review file written for Label Studio or CVAT: its path, the images in it (the
    review queue's first ``top``), boxes exported, and Label Studio's labeling config."""

    path: Path
    images: int
    boxes: int
    label_config: str


def export_review(
    labels: str | Path,
    out: str | Path,
    format: str = "label-studio",
    *,
    view: str = "polished",
    top: int | None = None,
    image_prefix: str = LOCAL_FILES,
    min_score: float | None = None,
) -> ReviewFile:
    """Write the pseudo labels for human review (``dpl export --format label-studio | cvat``):
    the images most worth a look first (``review_priority``), the first ``top`` of them,
    with the ``view`` boxes as pre-annotations carrying their scores."""
    if format not in REVIEW_FORMATS:
        raise DplError(f"--format {format!r}: choose from {', '.join(REVIEW_FORMATS)}")
    if top is not None and top < 1:
        raise DplError(f"--top {top}: give at least 1 image")
    check_distinct_outputs({"--labels": labels}, {"--out": out})
    table, meta = read_pseudo_labels(labels)
    chosen = view_boxes(table, view)
    if min_score is not None:
        keep = chosen["scores"] >= min_score
        chosen = {**chosen, **{k: chosen[k][keep] for k in ("image_id", "boxes", "labels",
                                                             "scores")}}  # fmt: skip
    categories = pseudo_categories(meta)
    check_view_categories(chosen, categories, labels)
    priority = review_priority(table)
    written = write_review(chosen, categories, priority, out, format, top, image_prefix)
    queue = {im[0] for im in review_queue(chosen, priority, top)}
    boxes = int(sum(int(i) in queue for i in chosen["image_id"]))
    names = [str(c["name"]) for c in categories]
    return ReviewFile(Path(out), written, boxes, label_config(names))


@dataclass
class LabelAudit:
    """``dpl audit``'s result: the issues found (most likely first), the files written."""

    issues: pa.Table
    counts: dict[str, int]
    written: list[Path]


def audit(
    ann: str | Path,
    crossfit: str | Path,
    out: str | Path,
    *,
    csv: str | Path | None = None,
    images: str | Path | None = None,
    min_score: float = 0.5,
    overlap_iou: float = 0.1,
) -> LabelAudit:
    """Likely mistakes in the labels of ``ann`` (missing boxes, wrong classes, misplaced
    boxes) from the out-of-fold detections ``crossfit`` (``dpl audit``), written to
    ``out`` (Parquet) and ``csv``."""
    check_distinct_outputs({"--ann": ann, "--crossfit": crossfit, "--images": images},
                           {"--out": out, "--csv": csv})  # fmt: skip
    gt = load_coco(ann, images)
    issues = audit_labels(gt, read_crossfit_detections(crossfit), min_score, overlap_iou)
    write_audit(issues, out, csv)
    kinds = issues["issue"].to_pylist()
    counts = {kind: kinds.count(kind) for kind in ISSUES}
    return LabelAudit(issues, counts, [Path(out)] + ([Path(csv)] if csv else []))


def report(
    labels: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    ann: str | Path | None = None,
    max_images: int = 200,
    page_size: int = 50,
    thumb_size: int = 320,
    allow_outside_root: bool = False,
    console: Console | None = None,
) -> ReportResult:
    """Write the static HTML report of a pseudo-label file into the folder ``out``
    (``dpl report``); ``ann``: the truth of those images, for the quality section."""
    inputs = {"LABELS": labels, "--images": images, "--ann": ann}
    check_distinct_outputs(inputs, {"--out": out}, folders={"--out"})
    return build_report(
        labels, images, out, ann, max_images, page_size, thumb_size, console, allow_outside_root
    )


def online_report(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the HTML report of an online student's in-loop pseudo-label log into the
    folder ``out`` (``dpl report STUDENT.pt``); returns its index.html."""
    check_distinct_outputs({"STUDENT": checkpoint}, {"--out": out}, folders={"--out"})
    return build_online_report(checkpoint, out)
