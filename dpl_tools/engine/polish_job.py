"""The polish job over many images (``dpl polish``): decode in DataLoader workers, detect
and polish each batch (``dpl_tools.engine.polish``), write one chunk of Parquet rows per
batch to a resumable ``PseudoLabelWriter``, count what was done (``PolishSummary``) and
describe it in the file's metadata (``polish_metadata``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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

from dpl_tools import __version__
from dpl_tools.data.detections import ExternalDetections
from dpl_tools.data.image_list import ImageRecord, UnlabeledImages, collate_images, stable_ids
from dpl_tools.data.pseudo_label_writer import (
    PseudoLabelWriter,
    append_row,
    empty_columns,
    rows_to_table,
    sibling_max_id,
)
from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    META_FITTED,
    META_POLISHER,
    META_REGRESSION,
    META_TEACHER,
    META_THRESHOLDS,
    META_VERSION,
    shard_of_part,
)
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.engine.inference import image_loader, worker_batches
from dpl_tools.engine.polish import PolishSettings, Refiner, detect_and_polish, polish_detections
from dpl_tools.errors import DplError
from dpl_tools.progress import Progress


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


def image_rows(
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
        append_row(cols, base)
        return
    probs = det["probs"].tolist()
    polisher_cat = [label_to_cat.get(int(v)) for v in det["polisher_labels"]]
    for j, (tb, pb) in enumerate(
        zip(det["boxes"].tolist(), det["polished_boxes"].tolist(), strict=True)
    ):
        prob = probs[j]
        append_row(
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


def _batch_rows(
    batch: list, det_of: dict, label_to_cat: dict[int, int], summary: PolishSummary,
    retry: set[str], strict: bool,
) -> dict[str, list]:  # fmt: skip
    """One batch's rows: an unreadable image's ``skipped`` row (a DplError with
    ``strict``), else its pseudo labels; ``summary`` counts them."""
    cols = empty_columns()
    for record, _, reason in batch:
        if reason is not None:
            if strict:
                raise DplError(f"{record['path']}: {reason} (--strict)")
            append_row(cols, {"image_id": record["id"], "file_name": record["file_name"],
                           "status": "skipped", "error": reason})  # fmt: skip
            continue
        image, det = det_of[id(record)]
        summary.retried_ok += record["file_name"] in retry
        if record.get("width") and (record["height"], record["width"]) != image.shape[-2:]:
            summary.size_mismatch += 1  # the decoded size is what the rows hold
        image_rows(cols, record, tuple(image.shape[-2:]), det, label_to_cat)
        summary.boxes += len(det["scores"])
        summary.use_cls += int(det["use_cls"].sum())
        summary.label_changed += int((det["polished_labels"] != det["labels"]).sum())
    return cols


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
    teacher.to(device).eval()
    if isinstance(polisher, torch.nn.Module):
        polisher.to(device).eval()
    done = writer.open()
    records = stable_ids(records, writer.known_ids, sibling_max_id(writer.dest),
                         str(writer.dest), shard_of_part(writer.dest))  # fmt: skip
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
            cols = _batch_rows(batch, det_of, label_to_cat, summary, writer.retry, strict)
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
