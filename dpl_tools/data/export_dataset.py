"""``dpl export``: a training dataset for another trainer, the labeled images' ground truth
plus the unlabeled images' pseudo labels of one view (``dpl_tools.data.export``), as COCO
JSON (train.json, and val.json with ``--val``) or in the ultralytics YOLO layout (images /
labels folders and data.yaml with relative paths). Images are linked, or copied with
``--copy-images``; the folder is dpl-owned (built in a staging folder, moved in at the end)
and ``dpl_export.json`` records what went in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from dpl_tools.data.coco import CocoData, load_coco
from dpl_tools.data.export import (
    VIEWS,
    check_view_categories,
    pseudo_categories,
    view_boxes,
    yolo_line,
)
from dpl_tools.data.images import outside_root
from dpl_tools.data.pseudo_labels import (
    read_pseudo_labels,
)
from dpl_tools.errors import DplError
from dpl_tools.io import write_json
from dpl_tools.outputs import (
    check_distinct_outputs,
    check_owned_folder,
    inside,
    owned_folder,
    same_path,
)

DATASET_KIND = "dataset-export"  # marker kind of a folder written by export_dataset
DATASET_WHAT = "a dpl dataset export"
DATASET_FORMATS = ("coco", "yolo")
SUMMARY_FILE = "dpl_export.json"


@dataclass
class DatasetInputs:
    """What ``export_dataset`` reads: the pseudo labels, the labeled ground truth, an
    optional val/test set, and the folders their file names are relative to."""

    labels: Path
    labeled: Path
    images: Path  # folder of --labeled's file names
    unlabeled_images: Path  # folder of the pseudo labels' file names
    val: Path | None = None
    val_images: Path | None = None
    allow_outside_root: bool = False


@dataclass
class ExportSummary:
    """What an export wrote: image and box counts, per class (also DIR/dpl_export.json)."""

    format: str
    view: str
    min_score: float | None
    out: str
    labels: str  # the pseudo-label file exported
    labeled: str  # the labeled ground truth
    images: dict[str, int]
    classes: list[dict[str, Any]]
    pseudo_images_in_labeled: int = 0  # the ground truth wins; their pseudo labels dropped
    pseudo_images_in_val: int = 0  # held out for validation: not trained on, dropped
    labeled_images_in_val: int = 0  # the user's own choice: kept, and warned about
    dropped_rows: int = 0  # pseudo-label rows left out as unusable (see ``view_boxes``)
    reports: list[Any] = field(default_factory=list)  # ValidationReports of the COCO inputs

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("reports")
        return body


def _dataset_out_check(inputs: DatasetInputs, out: Path) -> None:
    """Refuse an --out that is an input, or the folder an input lives in or reads from."""
    files = {"--labels": inputs.labels, "--labeled": inputs.labeled, "--val": inputs.val}
    check_distinct_outputs(files, {"--out": out}, folders={"--out"})
    folders = {
        "--images": inputs.images,
        "--unlabeled-images": inputs.unlabeled_images,
        "--val-images": inputs.val_images,
        "the folder of --labeled": inputs.labeled.parent,
        "the folder of --labels": inputs.labels if inputs.labels.is_dir() else inputs.labels.parent,
        "the folder of --val": inputs.val.parent if inputs.val else None,
    }
    for name, folder in folders.items():
        if folder is not None and same_path(out, folder):
            raise DplError(
                f"{out}: --out is {name}; an export gets a folder of its own (choose a new one)"
            )


def _image_file(root: Path, name: str, what: str, allow_outside_root: bool) -> Path:
    path = Path(name) if Path(name).is_absolute() else root / name
    if not allow_outside_root and outside_root(name):
        raise DplError(
            f"{name}: {what} file name outside its image folder {root}; dpl reads images only "
            "under it unless --allow-outside-root"
        )
    return path


def _check_categories(gt: CocoData, cats: list[dict], labels: Path) -> None:
    ours = [(c["id"], c["name"]) for c in gt.categories]
    theirs = [(c["id"], c["name"]) for c in cats]
    if sorted(ours) != sorted(theirs):
        raise DplError(
            f"{labels}: the pseudo labels' categories {theirs} differ from those of the labeled "
            f"set {gt.path} {ours}; export labels made by a teacher trained on this set"
        )


def _pseudo_images(
    table: pa.Table, meta: dict, view: str, min_score: float | None, inputs: DatasetInputs
) -> tuple[list[dict], dict[int, list[dict]], int]:
    """The view's processed images (with their file path), boxes (COCO-style dicts) and
    the number of rows left out as unusable."""
    v = view_boxes(table, view)
    check_view_categories(v, pseudo_categories(meta), inputs.labels)
    images, missing, allow = [], [], inputs.allow_outside_root
    for image_id, name, width, height in v["images"]:
        path = _image_file(inputs.unlabeled_images, name, "pseudo-labeled image", allow)
        if not path.is_file():
            missing.append(name)
        images.append(
            {"id": image_id, "file_name": name, "width": width, "height": height, "path": path}
        )
    if missing:
        raise DplError(
            f"{inputs.unlabeled_images}: {len(missing)} pseudo-labeled image(s) not found there "
            f"(e.g. {missing[0]}); give --unlabeled-images, the folder their file names are "
            "relative to (dpl polish's --images / --image-root)"
        )
    boxes: dict[int, list[dict]] = {}
    for image_id, box, label, score in zip(
        v["image_id"], v["boxes"], v["labels"], v["scores"], strict=True
    ):
        if min_score is not None and score < min_score:
            continue
        boxes.setdefault(int(image_id), []).append(
            {"box": [float(c) for c in box], "category_id": int(label), "score": float(score)}
        )
    return images, boxes, v["dropped"]


def _gt_images(data: CocoData, root: Path, allow: bool) -> list[dict]:
    return [
        {**im, "path": _image_file(root, im["file_name"], "image", allow)} for im in data.images
    ]


def _place(staging: Path, rel: str | Path, source: Path, copy: bool, out: Path, what: str) -> None:
    """An image of the export at ``rel`` (inside the export): a copy or an absolute link."""
    inside(out, rel, what)
    target = inside(staging, rel, what)
    if target.exists() or target.is_symlink():
        raise DplError(f"{source}: two images of the export would be {rel}; rename one")
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(source, target)
    else:
        target.symlink_to(source.resolve())


def _counts(cats: list[dict], gt, pseudo, val) -> list[dict[str, Any]]:
    def count(anns) -> dict[int, int]:
        out: dict[int, int] = {}
        for a in anns:
            out[a["category_id"]] = out.get(a["category_id"], 0) + 1
        return out

    g, p, v = count(gt), count(pseudo), count(val)
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "gt_boxes": g.get(c["id"], 0),
            "pseudo_boxes": p.get(c["id"], 0),
            "val_boxes": v.get(c["id"], 0),
        }
        for c in cats
    ]


def _xywh(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


def _coco_dataset(staging, out, gt_images, gt, pseudo_images, pseudo_boxes, val, copy):
    """DIR/train.json (ground truth + pseudo labels, ids kept distinct) and DIR/val.json."""

    def file_name(im: dict, split: str, group: str) -> str:
        if copy:
            rel = Path("images") / split / group / im["file_name"]
            _place(staging, rel, im["path"], True, out, "image file name")
            return rel.as_posix()
        return Path(os.path.relpath(im["path"].resolve(), out.resolve())).as_posix()

    def strip(im: dict, split: str, group: str, **extra) -> dict:
        return {**{k: v for k, v in im.items() if k != "path"}, **extra,
                "file_name": file_name(im, split, group)}  # fmt: skip

    image_id = max((im["id"] for im in gt.images), default=0)
    ann_id = max((a["id"] for a in gt.annotations), default=0)
    images = [strip(im, "train", "labeled") for im in gt_images]
    annotations = list(gt.annotations)
    pseudo_anns = []
    for im in pseudo_images:
        image_id += 1
        images.append(strip(im, "train", "pseudo", id=image_id, pseudo=True))
        for b in pseudo_boxes.get(im["id"], []):
            ann_id += 1
            x, y, w, h = _xywh(b["box"])
            pseudo_anns.append(
                {"id": ann_id, "image_id": image_id, "category_id": b["category_id"],
                 "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0,
                 "score": round(b["score"], 5), "pseudo": True}
            )  # fmt: skip
    train = {**gt.extra, "images": images, "annotations": annotations + pseudo_anns}
    train["categories"] = gt.categories
    write_json(staging / "train.json", train)
    if val is not None:
        data, val_images = val
        body = {**data.to_dict(), "images": [strip(im, "val", "") for im in val_images]}
        write_json(staging / "val.json", body)
    return pseudo_anns


def _yolo_dataset(staging, out, cats, gt_images, gt, pseudo_images, pseudo_boxes, val, copy):
    """images/{train,val}, labels/{train,val} (labeled/ and pseudo/ under train) and
    data.yaml, the ultralytics layout."""
    index_of = {c["id"]: i for i, c in enumerate(cats)}

    def write(im: dict, boxes: list[list[float]], labels: list[int], split: str, group: str):
        rel = Path(split) / group / im["file_name"] if group else Path(split) / im["file_name"]
        try:
            txt = Path("labels") / rel.with_suffix(".txt")
        except ValueError:
            raise DplError(f"{im['file_name']!r}: not a usable image file name") from None
        _place(staging, Path("images") / rel, im["path"], copy, out, "image file name")
        lines = [
            yolo_line(index_of[c], b, im["width"], im["height"]) + "\n"
            for b, c in zip(boxes, labels, strict=True)
        ]
        target = inside(staging, txt, "label file name")
        if target.exists():
            raise DplError(
                f"{im['file_name']}: its YOLO label file {txt} is also another image's (YOLO "
                "pairs labels with images by file stem); rename one of the images"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines))

    def gt_boxes(data: CocoData):
        by_image = data.annotations_by_image()
        for im_boxes in by_image.values():
            im_boxes[:] = [a for a in im_boxes if not a.get("iscrowd")]
        return by_image

    def xyxy(a):
        x, y, w, h = a["bbox"]
        return [x, y, x + w, y + h]

    by_image = gt_boxes(gt)
    for im in gt_images:
        anns = by_image.get(im["id"], [])
        write(im, [xyxy(a) for a in anns], [a["category_id"] for a in anns], "train", "labeled")
    pseudo_anns = []
    for im in pseudo_images:
        boxes = pseudo_boxes.get(im["id"], [])
        pseudo_anns += boxes
        write(im, [b["box"] for b in boxes], [b["category_id"] for b in boxes], "train", "pseudo")
    if val is not None:
        data, val_images = val
        val_by_image = gt_boxes(data)
        for im in val_images:
            anns = val_by_image.get(im["id"], [])
            write(im, [xyxy(a) for a in anns], [a["category_id"] for a in anns], "val", "")
    # no "path": ultralytics then resolves train / val against data.yaml's own folder, so
    # the dataset still loads after a move (an absolute path pointed at the old place)
    yaml_body = {
        "train": "images/train",
        "val": "images/val" if val is not None else "images/train",
        "names": {i: c["name"] for i, c in enumerate(cats)},
    }
    (staging / "data.yaml").write_text(yaml.safe_dump(yaml_body, sort_keys=False))
    return pseudo_anns


def export_dataset(
    inputs: DatasetInputs,
    out: str | Path,
    fmt: str = "yolo",
    view: str = "polished",
    min_score: float | None = None,
    copy_images: bool = False,
    command: str = "dpl export",
) -> ExportSummary:
    """Write a training-ready dataset into ``out`` (a dpl-owned folder, see
    ``outputs.owned_folder``): the labeled ground truth and the ``view`` pseudo labels
    (boxes scored below ``min_score`` left out) in COCO (``train.json``, ``val.json``) or the
    ultralytics YOLO layout, plus ``dpl_export.json``. An image both labeled and
    pseudo-labeled keeps its ground truth only. Nothing outside ``out`` is written."""
    out = Path(out)
    if fmt not in DATASET_FORMATS:
        raise DplError(f"--format {fmt!r}: choose from {', '.join(DATASET_FORMATS)}")
    if view not in VIEWS:
        raise DplError(f"--view {view!r}: choose from {', '.join(VIEWS)}")
    _dataset_out_check(inputs, out)
    check_owned_folder(out, DATASET_KIND, DATASET_WHAT)
    table, meta = read_pseudo_labels(inputs.labels)
    cats = pseudo_categories(meta)
    allow = inputs.allow_outside_root
    gt = load_coco(inputs.labeled, inputs.images, allow_outside_root=allow)
    if not gt.images:
        raise DplError(
            f"{inputs.labeled}: none of its images were found under {inputs.images}; give "
            "--images, the folder its file names are relative to"
        )
    _check_categories(gt, cats, inputs.labels)
    reports = [gt.report]
    gt_images = _gt_images(gt, inputs.images, allow)
    pseudo_images, pseudo_boxes, dropped = _pseudo_images(table, meta, view, min_score, inputs)
    labeled_files = {im["path"].resolve() for im in gt_images}
    both = [im for im in pseudo_images if im["path"].resolve() in labeled_files]
    if both:
        drop = {id(im) for im in both}
        pseudo_images = [im for im in pseudo_images if id(im) not in drop]
    val = None
    if inputs.val is not None:
        root = inputs.val_images or inputs.images
        data = load_coco(inputs.val, root, allow_outside_root=allow)
        _check_categories(data, cats, inputs.labels)
        reports.append(data.report)
        val = (data, _gt_images(data, root, allow))
    val_files = {im["path"].resolve() for im in val[1]} if val else set()
    in_val = [im for im in pseudo_images if im["path"].resolve() in val_files]
    if in_val:  # a validation image's pseudo labels in the training set would leak it
        drop = {id(im) for im in in_val}
        pseudo_images = [im for im in pseudo_images if id(im) not in drop]
    with owned_folder(out, DATASET_KIND, command, DATASET_WHAT) as staging:
        args = (gt_images, gt, pseudo_images, pseudo_boxes, val, copy_images)
        if fmt == "coco":
            pseudo_anns = _coco_dataset(staging, out, *args)
        else:
            pseudo_anns = _yolo_dataset(staging, out, cats, *args)
        summary = ExportSummary(
            format=fmt,
            view=view,
            min_score=min_score,
            out=str(out.resolve()),
            labels=str(inputs.labels.resolve()),
            labeled=str(inputs.labeled.resolve()),
            images={
                "labeled": len(gt_images),
                "pseudo": len(pseudo_images),
                "val": len(val[1]) if val else 0,
            },
            classes=_counts(cats, gt.annotations, pseudo_anns, val[0].annotations if val else []),
            pseudo_images_in_labeled=len(both),
            pseudo_images_in_val=len(in_val),
            labeled_images_in_val=len(labeled_files & val_files),
            dropped_rows=dropped,
            reports=reports,
        )
        write_json(staging / SUMMARY_FILE, summary.to_dict())
    return summary
