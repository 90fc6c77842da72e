"""The polish job: teacher detections on unlabeled images, polished, streamed to Parquet.

Images are decoded in DataLoader workers and run through the teacher in batches (AMP on
GPU). The polishers reuse the same forward pass's FPN features (no second backbone
pass): teacher boxes kept at the initial threshold are refined by the regression
polisher and re-classified by the classification polisher, in the teacher's transformed
coordinates, then mapped back to the original image. Rows go to a resumable
``PseudoLabelWriter`` one chunk per batch.
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
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes

from dpl_tools import __version__
from dpl_tools.data.image_list import ImageRecord, UnlabeledImages, collate_images
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, rows_to_table
from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    META_POLISHER,
    META_TEACHER,
    META_THRESHOLDS,
    META_VERSION,
)
from dpl_tools.errors import DplError
from dpl_tools.models.detector import set_test_settings
from dpl_tools.runtime import amp_enabled


class Refiner(Protocol):
    """What the job needs of the polishers (``dpl_tools.models.polisher.Polisher``)."""

    def refine(
        self, features: dict, boxes_per_image: list[torch.Tensor], image_sizes: list
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...


@dataclass
class PolishSettings:
    """Test-time teacher settings and the polishing thresholds (DESIGN's defaults)."""

    score_thresh: float = 0.001
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    initial_thresh: float = 0.5
    cls_prob: float = 0.9
    teacher_score: float = 0.9

    def thresholds(self) -> dict[str, float]:
        """The metadata form, ``{"initial": .., "cls_prob": .., "teacher_score": .., ...}``."""
        return {
            "test_score": self.score_thresh,
            "test_nms": self.nms_thresh,
            "test_max_dets": self.detections_per_img,
            "initial": self.initial_thresh,
            "cls_prob": self.cls_prob,
            "teacher_score": self.teacher_score,
        }


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

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def polish_metadata(
    categories: list[dict], settings: PolishSettings, teacher_sha: str, polisher_sha: str | None
) -> dict[str, Any]:
    """The Parquet key-value metadata of a polish run (see ``pseudo_labels``)."""
    return {
        META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in categories],
        META_THRESHOLDS: settings.thresholds(),
        META_TEACHER: teacher_sha,
        META_POLISHER: polisher_sha,
        META_VERSION: __version__,
    }


def _empty_columns() -> dict[str, list]:
    from dpl_tools.data.pseudo_labels import SCHEMA

    return {name: [] for name in SCHEMA.names}


def _append(cols: dict[str, list], row: dict[str, Any]) -> None:
    for name, values in cols.items():
        values.append(row.get(name))


@torch.inference_mode()
def detect_and_polish(
    teacher: FasterRCNN,
    polisher: Refiner | None,
    images: list[torch.Tensor],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """Teacher detections (score >= initial threshold) and their polished view for a batch.

    ``images``: float CHW tensors in 0..1 on the model's device. Per image, CPU tensors
    in original pixels: ``boxes``, ``scores``, ``labels`` (1..C), ``polished_boxes``,
    ``polished_labels``, ``probs`` (best foreground prob), ``use_cls``, ``use_reg``.
    Without a polisher the polished view equals the teacher's (teacher-only timing).
    """
    device = images[0].device
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        proposals, _ = teacher.rpn(batch, features)
        detections, _ = teacher.roi_heads(features, proposals, batch.image_sizes)
        kept = [d["scores"] >= settings.initial_thresh for d in detections]
        boxes = [d["boxes"][k].float() for d, k in zip(detections, kept, strict=True)]
        if polisher is not None:
            refined, probs = polisher.refine(features, boxes, batch.image_sizes)
    out = []
    for i, (det, keep) in enumerate(zip(detections, kept, strict=True)):
        scores, labels = det["scores"][keep].float(), det["labels"][keep]
        if polisher is None:
            polished, best, changed = boxes[i], torch.full_like(scores, float("nan")), None
            use_cls = torch.ones_like(keep[keep])
        else:
            polished = refined[i].float()
            best, cls = probs[i].float()[:, 1:].max(dim=1)
            sure = best >= settings.cls_prob
            changed = sure & (scores < settings.teacher_score)
            use_cls = sure | (scores > settings.teacher_score)
        polished_labels = labels if changed is None else torch.where(changed, cls + 1, labels)
        size_t, size_o = batch.image_sizes[i], original_sizes[i]
        out.append(
            {
                "boxes": resize_boxes(boxes[i], size_t, size_o).cpu(),
                "scores": scores.cpu(),
                "labels": labels.cpu(),
                "polished_boxes": resize_boxes(polished, size_t, size_o).cpu(),
                "polished_labels": polished_labels.cpu(),
                "probs": best.cpu(),
                "use_cls": use_cls.cpu(),
                "use_reg": torch.ones_like(use_cls).cpu(),
            }
        )
    return out


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
    for j, (tb, pb) in enumerate(
        zip(det["boxes"].tolist(), det["polished_boxes"].tolist(), strict=True)
    ):
        prob = probs[j]
        _append(
            cols,
            {
                **base,
                **{f"teacher_{c}": v for c, v in zip(("x1", "y1", "x2", "y2"), tb, strict=True)},
                **{f"polished_{c}": v for c, v in zip(("x1", "y1", "x2", "y2"), pb, strict=True)},
                "teacher_label": label_to_cat[int(det["labels"][j])],
                "teacher_score": float(det["scores"][j]),
                "polished_label": label_to_cat[int(det["polished_labels"][j])],
                "polisher_prob": None if prob != prob else prob,
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
) -> PolishSummary:
    """Polish ``records`` not yet in ``writer``'s output; write one chunk per batch, then
    merge. Bad images become ``status="skipped"`` rows (a DplError with ``strict``)."""
    settings = settings or PolishSettings()
    device = torch.device(device)
    set_test_settings(
        teacher, settings.score_thresh, settings.nms_thresh, settings.detections_per_img
    )
    teacher.to(device).eval()
    if isinstance(polisher, torch.nn.Module):
        polisher.to(device).eval()
    done = writer.open()
    todo = [(i, r) for i, r in enumerate(records) if r["file_name"] not in done]
    summary = PolishSummary(total_images=len(records), already_done=len(records) - len(todo))
    loader = DataLoader(
        UnlabeledImages([r for _, r in todo]),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    start = time.perf_counter()
    position = 0
    with _progress(console, show_progress) as progress:
        task = progress.add_task("polish", total=len(todo), rate=0.0, boxes=0)
        for batch in loader:
            first_index = todo[position][0]
            position += len(batch)
            cols = _empty_columns()
            good = [(r, im) for r, im, reason in batch if reason is None]
            dets = []
            if good:
                images = [im.to(device, non_blocking=True).float().div_(255.0) for _, im in good]
                dets = detect_and_polish(teacher, polisher, images, settings)
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
