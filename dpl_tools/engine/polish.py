"""The polish job: teacher detections on unlabeled images, polished, streamed to Parquet.

Images are decoded in DataLoader workers and run through the teacher in batches (AMP on
GPU). The polishers reuse the same forward pass's FPN features (no second backbone
pass): teacher boxes kept at the initial threshold are refined by the regression
polisher and re-classified by the classification polisher, in the teacher's transformed
coordinates, then mapped back to the original image. Two steps: ``detect`` (the teacher)
and ``polish_boxes`` (any detector's boxes on the teacher's features; the keep rule is
``keep_rule.select_pseudo_labels``). Options: ``tta`` (teacher passes on the flipped and
rescaled images, fused by weighted box fusion: ``engine.tta``) and ``reg_steps`` (the
regression polisher applied as a cascade). Rows go to a resumable ``PseudoLabelWriter`` one
chunk per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes

from dpl_tools import __version__
from dpl_tools.data.detections import ExternalDetections, ImageDetections
from dpl_tools.data.image_list import ImageRecord, UnlabeledImages, collate_images, stable_ids
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, rows_to_table, sibling_max_id
from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    META_FITTED,
    META_POLISHER,
    META_REGRESSION,
    META_TEACHER,
    META_THRESHOLDS,
    META_VERSION,
)
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.defaults import DEFAULTS
from dpl_tools.engine.inference import image_loader, worker_batches
from dpl_tools.engine.keep_rule import PAPER_CLS_PROB, PAPER_TEACHER_SCORE, select_pseudo_labels
from dpl_tools.engine.tta import augmented_detections, fuse_passes, tta_augmentations
from dpl_tools.errors import DplError
from dpl_tools.models.detector import set_test_settings
from dpl_tools.progress import Progress
from dpl_tools.runtime import amp_enabled
from dpl_tools.settings import settings_from_section


class Refiner(Protocol):
    """What the job needs of the polishers (``dpl_tools.models.polisher.Polisher``)."""

    def refine(
        self, features: dict, boxes_per_image: list[torch.Tensor], image_sizes: list
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def regress(
        self, features: dict, boxes_per_image: list[torch.Tensor], image_sizes: list
    ) -> list[torch.Tensor]: ...


_RESOLVED = ("cls_prob", "teacher_score", "reg_steps")  # null: resolved from the polisher


@dataclass
class PolishSettings:
    """Test-time teacher settings and the polishing thresholds (defaults: the ``polish``
    section of ``dpl_tools.defaults``, DESIGN's values)."""

    score_thresh: float = DEFAULTS["polish"]["score_thresh"]
    nms_thresh: float = DEFAULTS["polish"]["nms_thresh"]
    detections_per_img: int = DEFAULTS["polish"]["detections_per_img"]
    initial_thresh: float = DEFAULTS["polish"]["initial_thresh"]
    cls_prob: float = PAPER_CLS_PROB  # the config's null: see ``keep_thresholds.resolve``
    teacher_score: float = PAPER_TEACHER_SCORE
    reg_steps: int = 1  # the config's null: the polisher's regression check decides
    tta: bool = DEFAULTS["polish"]["tta"]
    tta_scales: list[float] = field(default_factory=lambda: list(DEFAULTS["polish"]["tta_scales"]))
    tta_fusion_iou: float = DEFAULTS["polish"]["tta_fusion_iou"]

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> PolishSettings:
        """The settings of a ``polish`` config section (other keys ignored; a null
        cls_prob / teacher_score, "from the polisher", gives the paper's value here:
        ``dpl polish`` resolves them with ``keep_thresholds.resolve_keep_thresholds``)."""
        given = {k: v for k, v in section.items() if v is not None or k not in _RESOLVED}
        return settings_from_section(cls, given)

    def thresholds(self) -> dict[str, float]:
        """The metadata form, ``{"initial": .., "cls_prob": .., "teacher_score": .., ...}``."""
        return {
            "test_score": self.score_thresh,
            "test_nms": self.nms_thresh,
            "test_max_dets": self.detections_per_img,
            "initial": self.initial_thresh,
            "cls_prob": self.cls_prob,
            "teacher_score": self.teacher_score,
            "reg_steps": self.reg_steps,
            "tta": int(self.tta),  # 0/1: metadata thresholds are numbers
            **self._tta_thresholds(),
        }

    def _tta_thresholds(self) -> dict[str, float]:
        """With ``tta``: the fusion IoU and each extra scale (``tta_scale_1``, ...)."""
        if not self.tta:
            return {}
        scales = {f"tta_scale_{i}": s for i, s in enumerate(self.tta_scales, 1)}
        return {"tta_fusion_iou": self.tta_fusion_iou, **scales}


@dataclass
class PolishSummary:
    """What a polish run did (this run's counts, plus the output's skipped images)."""

    total_images: int = 0
    already_done: int = 0
    processed: int = 0
    boxes: int = 0
    use_cls: int = 0
    label_changed: int = 0
    seconds: float = 0.0
    wrote: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    retried: int = 0  # images skipped as unreadable by an earlier run, tried again now
    retried_ok: int = 0  # ... of which could be read this time
    size_mismatch: int = 0  # COCO list width/height differing from the decoded image

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def kept_fraction(self) -> float | None:
        """Share of this run's boxes kept as classification pseudo labels (None: no box)."""
        return self.use_cls / self.boxes if self.boxes else None


# Below this share of the teacher's boxes kept for classification, polish warns.
LOW_KEPT_FRACTION = 0.1


def kept_warning(summary: PolishSummary) -> str:
    """One line when the keep rule kept less than 10% of the boxes, or none; else ''."""
    kept = summary.kept_fraction
    if kept is None or kept >= LOW_KEPT_FRACTION:
        return ""
    return (
        f"the keep rule kept {summary.use_cls} of {summary.boxes} boxes ({kept:.1%}) as "
        "classification pseudo labels: the student's pseudo-labeled images will teach little "
        "classification (check the keep thresholds; --keep-rule paper or --cls-prob to override)"
    )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s,
                "kept_fraction": self.kept_fraction}  # fmt: skip


def polish_metadata(
    categories: list[dict],
    settings: PolishSettings,
    teacher_sha: str,
    polisher_sha: str | None,
    keep_sources: dict[str, str] | None = None,
    fitted: dict[str, Any] | None = None,
    regression: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Parquet key-value metadata of a polish run (see ``pseudo_labels``).

    ``keep_sources``: where the keep thresholds came from, added to the thresholds
    (``keep_rule``, ``cls_prob_source``, ``teacher_score_source``: fitted / paper / user);
    ``fitted``: the polisher's fitted thresholds (``FittedThresholds.to_dict()``), if any;
    ``regression``: its regression check (``regression_check.check_regression``), if any.
    """
    meta = {
        META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in categories],
        META_THRESHOLDS: {**settings.thresholds(), **(keep_sources or {})},
        META_TEACHER: teacher_sha,
        META_POLISHER: polisher_sha,
        META_VERSION: __version__,
    }
    if keep_sources is not None:
        meta[META_FITTED] = fitted
        meta[META_REGRESSION] = regression
    return meta


def _empty_columns() -> dict[str, list]:
    from dpl_tools.data.pseudo_labels import SCHEMA

    return {name: [] for name in SCHEMA.names}


def _append(cols: dict[str, list], row: dict[str, Any]) -> None:
    for name, values in cols.items():
        values.append(row.get(name))


@dataclass
class TeacherDetections:
    """The teacher's pass over a batch: its FPN features and its detections kept at the
    initial threshold, boxes in the teacher's transformed coordinates (as the features)."""

    features: dict[str, torch.Tensor]
    image_sizes: list[tuple[int, int]]  # transformed (the features' coordinates)
    original_sizes: list[tuple[int, int]]  # of the input images
    boxes: list[torch.Tensor]  # float xyxy, one tensor per image
    scores: list[torch.Tensor]
    labels: list[torch.Tensor]  # 1..C


@torch.inference_mode()
def detect(
    teacher: FasterRCNN, images: list[torch.Tensor], settings: PolishSettings
) -> TeacherDetections:
    """Teacher detections with score >= the initial threshold, and the features they came
    from. ``images``: float CHW tensors in 0..1 on the model's device (AMP on GPU)."""
    device = images[0].device
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        proposals, _ = teacher.rpn(batch, features)
        detections, _ = teacher.roi_heads(features, proposals, batch.image_sizes)
        if settings.tta:
            detections = _tta_detections(teacher, images, detections, batch.image_sizes, settings)
        kept = [d["scores"] >= settings.initial_thresh for d in detections]
        boxes = [d["boxes"][k].float() for d, k in zip(detections, kept, strict=True)]
    return TeacherDetections(
        features=features,
        image_sizes=list(batch.image_sizes),
        original_sizes=original_sizes,
        boxes=boxes,
        scores=[d["scores"][k].float() for d, k in zip(detections, kept, strict=True)],
        labels=[d["labels"][k] for d, k in zip(detections, kept, strict=True)],
    )


def _tta_detections(
    teacher: FasterRCNN,
    images: list[torch.Tensor],
    detections: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """The plain pass's ``detections`` (in the transformed ``image_sizes``) fused by WBF
    with the TTA passes (flip, ``tta_scales``), back in the transformed coordinates."""
    originals = [tuple(im.shape[-2:]) for im in images]
    plain = [
        {
            **d,
            "boxes": resize_boxes(d["boxes"].float(), size_t, size_o),
            "scores": d["scores"].float(),
        }
        for d, size_t, size_o in zip(detections, image_sizes, originals, strict=True)
    ]
    passes = [plain]
    passes += [
        augmented_detections(teacher, images, a) for a in tta_augmentations(settings.tta_scales)
    ]
    fused = fuse_passes(passes, settings.tta_fusion_iou, settings.detections_per_img)
    return [
        {**d, "boxes": resize_boxes(d["boxes"], size_o, size_t)}
        for d, size_t, size_o in zip(fused, image_sizes, originals, strict=True)
    ]


@torch.inference_mode()
def polish_boxes(
    features: dict[str, torch.Tensor],
    boxes: list[torch.Tensor],
    scores: list[torch.Tensor],
    labels: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    polisher: Refiner | None,
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """The polished view of boxes from any detector, on the teacher's ``features``.

    ``boxes`` (float xyxy), ``scores`` and ``labels`` (1..C) per image, in the features'
    coordinates (``image_sizes``; map other boxes there with ``resize_boxes`` first).
    Regression pseudo labels: every box, refined; classification pseudo labels: the
    ``select_pseudo_labels`` rule. Per image, CPU tensors in original pixels
    (``original_sizes``): ``boxes``, ``scores``, ``labels``, ``polished_boxes``,
    ``polished_labels`` (the rule's labels), ``polisher_labels`` (the polisher's best
    foreground class) and ``probs`` (its probability), ``use_cls``, ``use_reg``.
    Without a polisher the polished view equals the input (teacher-only timing). With
    ``settings.reg_steps`` N > 1 the regression polisher runs N times, each refined box
    (its RoI features pooled again) the next input; classification uses the input box.
    With 0 the regression pseudo labels are the input boxes (the regression check's
    fallback: ``engine.regression_check``).
    """
    if polisher is not None:
        device = next(iter(features.values())).device
        with torch.autocast(device.type, enabled=amp_enabled(device)):
            if settings.reg_steps == 0:  # the teacher's own boxes as regression labels
                refined = boxes
                probs = polisher.classify(features, boxes, image_sizes)
            else:
                refined, probs = polisher.refine(features, boxes, image_sizes)
            for _ in range(settings.reg_steps - 1):  # a cascade: re-pooled at the new box
                refined = polisher.regress(features, [r.float() for r in refined], image_sizes)
    out = []
    for i, (score, label) in enumerate(zip(scores, labels, strict=True)):
        if polisher is None:
            polished, best = boxes[i], torch.full_like(score, float("nan"))
            polished_labels, use_cls = label, torch.ones_like(score, dtype=torch.bool)
            cls = label - 1  # unused: no polisher, no polisher class (written as null)
        else:
            polished = refined[i].float()
            best, cls = probs[i].float()[:, 1:].max(dim=1)
            choice = select_pseudo_labels(
                label, score, cls + 1, best, settings.cls_prob, settings.teacher_score
            )
            polished_labels, use_cls = choice.labels, choice.use_cls
        size_t, size_o = image_sizes[i], original_sizes[i]
        out.append(
            {
                "boxes": resize_boxes(boxes[i], size_t, size_o).cpu(),
                "scores": score.cpu(),
                "labels": label.cpu(),
                "polished_boxes": resize_boxes(polished, size_t, size_o).cpu(),
                "polished_labels": polished_labels.cpu(),
                "polisher_labels": (cls + 1).cpu(),
                "probs": best.cpu(),
                "use_cls": use_cls.cpu(),
                "use_reg": torch.ones_like(use_cls).cpu(),
            }
        )
    return out


def detect_and_polish(
    teacher: FasterRCNN,
    polisher: Refiner | None,
    images: list[torch.Tensor],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """Teacher detections (score >= initial threshold) and their polished view for a batch:
    ``detect`` then ``polish_boxes`` (see there for the output)."""
    d = detect(teacher, images, settings)
    return polish_boxes(
        d.features, d.boxes, d.scores, d.labels, d.image_sizes, d.original_sizes, polisher,
        settings,
    )  # fmt: skip


@torch.inference_mode()
def polish_detections(
    teacher: FasterRCNN,
    polisher: Refiner | None,
    images: list[torch.Tensor],
    given: list[ImageDetections],
    cat_to_label: dict[int, int],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """Another labeler's detections (``given``, one per image, dpl category ids) polished on
    the teacher's features: one backbone pass, no teacher heads. Boxes are clipped to their
    image and kept at the initial threshold on the labeler's scores; output as ``polish_boxes``.
    """
    device = images[0].device
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
    boxes, scores, labels = [], [], []
    for det, (height, width), size_t in zip(given, original_sizes, batch.image_sizes, strict=True):
        b, s, c = det.pixel_boxes(width, height)
        keep = s >= settings.initial_thresh
        pixels = torch.as_tensor(b[keep], dtype=torch.float32, device=device).reshape(-1, 4)
        boxes.append(resize_boxes(pixels, (height, width), tuple(size_t)))
        scores.append(torch.as_tensor(s[keep], dtype=torch.float32, device=device))
        cls = [cat_to_label[int(cat)] for cat in c[keep]]
        labels.append(torch.as_tensor(cls, dtype=torch.int64, device=device))
    return polish_boxes(
        features, boxes, scores, labels, list(batch.image_sizes), original_sizes, polisher,
        settings,
    )  # fmt: skip


def _image_rows(
    cols: dict[str, list], record: ImageRecord, size: tuple[int, int], det: dict, label_to_cat
) -> None:
    base = {
        "image_id": record["id"],
        "file_name": record["file_name"],
        "width": size[1],
        "height": size[0],
        "status": "ok",
    }
    if len(det["scores"]) == 0:
        _append(cols, base)
        return
    probs = det["probs"].tolist()
    polisher_cat = [label_to_cat.get(int(v)) for v in det["polisher_labels"]]
    for j, (tb, pb) in enumerate(
        zip(det["boxes"].tolist(), det["polished_boxes"].tolist(), strict=True)
    ):
        prob = probs[j]
        _append(
            cols,
            {
                **base,
                **{f"teacher_{c}": v for c, v in zip(BOX_COORDS, tb, strict=True)},
                **{f"polished_{c}": v for c, v in zip(BOX_COORDS, pb, strict=True)},
                "teacher_label": label_to_cat[int(det["labels"][j])],
                "teacher_score": float(det["scores"][j]),
                "polished_label": label_to_cat[int(det["polished_labels"][j])],
                "polisher_prob": None if prob != prob else prob,
                "polisher_label": None if prob != prob else polisher_cat[j],
                "use_cls": bool(det["use_cls"][j]),
                "use_reg": bool(det["use_reg"][j]),
            },
        )


def _progress(console: Console | None, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]polish"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s  boxes kept {task.fields[boxes]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def output_skipped(path) -> list[tuple[str, str]]:
    """(file name, reason) of the rows with status "skipped" in a written pseudo-label file."""
    bad = pq.read_table(path, columns=["file_name", "error"], filters=[("status", "=", "skipped")])
    return list(zip(bad["file_name"].to_pylist(), bad["error"].to_pylist(), strict=True))


def polish_images(
    teacher: FasterRCNN,
    label_to_cat: dict[int, int],
    polisher: Refiner | None,
    records: Sequence[ImageRecord],
    writer: PseudoLabelWriter,
    settings: PolishSettings | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    workers: int = 2,
    strict: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
    detections: ExternalDetections | None = None,
) -> PolishSummary:
    """Polish ``records`` not yet in ``writer``'s output; write one chunk per batch, then
    merge. Bad images become ``status="skipped"`` rows (a DplError with ``strict``).
    ``detections``: another labeler's boxes to polish instead of the teacher's."""
    settings = settings or PolishSettings()
    cat_to_label = {cat: label for label, cat in label_to_cat.items()}
    device = torch.device(device)
    set_test_settings(
        teacher, settings.score_thresh, settings.nms_thresh, settings.detections_per_img
    )
    teacher.to(device).eval()
    if isinstance(polisher, torch.nn.Module):
        polisher.to(device).eval()
    done = writer.open()
    records = stable_ids(records, writer.known_ids, sibling_max_id(writer.dest), str(writer.dest))
    todo = [(i, r) for i, r in enumerate(records) if r["file_name"] not in done]
    summary = PolishSummary(total_images=len(records), already_done=len(records) - len(todo))
    summary.retried = sum(r["file_name"] in writer.retry for _, r in todo)
    loader = image_loader(
        UnlabeledImages([r for _, r in todo]), batch_size, workers, collate_images,
        device.type == "cuda",
    )  # fmt: skip
    start = time.perf_counter()
    position = 0
    with _progress(console, show_progress) as progress:
        task = progress.add_task("polish", total=len(todo), rate=0.0, boxes=0)
        for batch in worker_batches(loader, f"polish of {writer.dest}"):
            first_index = todo[position][0]
            position += len(batch)
            cols = _empty_columns()
            good = [(r, im) for r, im, reason in batch if reason is None]
            dets = []
            if good:
                images = [im.to(device, non_blocking=True).float().div_(255.0) for _, im in good]
                if detections is None:
                    dets = detect_and_polish(teacher, polisher, images, settings)
                else:
                    given = [detections.for_image(r["file_name"]) for r, _ in good]
                    dets = polish_detections(
                        teacher, polisher, images, given, cat_to_label, settings
                    )
            det_of = {id(r): (im, d) for (r, im), d in zip(good, dets, strict=True)}
            for record, _, reason in batch:
                if reason is not None:
                    if strict:
                        raise DplError(f"{record['path']}: {reason} (--strict)")
                    _append(
                        cols,
                        {
                            "image_id": record["id"],
                            "file_name": record["file_name"],
                            "status": "skipped",
                            "error": reason,
                        },
                    )
                    continue
                image, det = det_of[id(record)]
                summary.retried_ok += record["file_name"] in writer.retry
                if record.get("width") and (record["height"], record["width"]) != image.shape[-2:]:
                    summary.size_mismatch += 1  # the decoded size is what the rows hold
                _image_rows(cols, record, tuple(image.shape[-2:]), det, label_to_cat)
                summary.boxes += len(det["scores"])
                summary.use_cls += int(det["use_cls"].sum())
                summary.label_changed += int((det["polished_labels"] != det["labels"]).sum())
            writer.write_chunk(rows_to_table(cols), first_index)
            summary.processed += len(batch)
            summary.seconds = time.perf_counter() - start
            progress.update(
                task, advance=len(batch), rate=summary.images_per_s, boxes=summary.boxes
            )
    summary.seconds = time.perf_counter() - start
    summary.wrote = writer.finish()
    summary.skipped = output_skipped(writer.dest)
    return summary
