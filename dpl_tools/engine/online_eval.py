"""The online pseudo labels on a fixed evaluation slice (``student.online_eval_images``).

The in-loop log (``OnlineLog``) counts the pseudo labels of the training batches: a
different set of images in every window, too few to show a trend. To see whether the
pseudo labels improve as the EMA teacher trains, the same unlabeled images (a seeded sample
of those with hidden truth) are labelled by the EMA teacher and the polishers before
training and at every log line, through ``detect_and_polish`` and into the rows ``dpl
polish`` writes, and scored as ``dpl evaluate --pseudo`` scores a pseudo-label file.
Precision is compared at one recall, by default the kept pseudo labels' recall in the first
evaluation (the teacher's; its boxes' recall where it keeps none): a rise means fewer wrong
labels for as many right ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpl_tools.data.coco import CocoData
from dpl_tools.data.detection import image_tensor, report_skipped
from dpl_tools.data.images import ImageReadError
from dpl_tools.data.pseudo_label_writer import empty_columns, rows_to_table
from dpl_tools.engine.polish import PolishSettings, detect_and_polish
from dpl_tools.engine.polish_job import image_rows
from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality


def precision_at_recall(curve: dict[str, list[float]], recall: float) -> float | None:
    """Interpolated precision of a PR curve at ``recall``: the best precision of any score
    cut that reaches it (None when no cut does)."""
    # the curves' recalls are rounded to 4 decimals: within half a step counts as reached
    reached = [p for p, r in zip(curve["precision"], curve["recall"], strict=True)
               if r >= recall - 5e-5]  # fmt: skip
    return round(max(reached), 4) if reached else None


def slice_records(records: list[dict], truth: CocoData, count: int, seed: int) -> list[dict]:
    """``count`` of the unlabeled image ``records`` that have hidden truth, drawn with
    ``seed`` (the same images on every run with that seed, and on resume)."""
    named = {im["file_name"] for im in truth.images}
    candidates = sorted((r for r in records if r["file_name"] in named),
                        key=lambda r: r["file_name"])  # fmt: skip
    return random.Random(seed).sample(candidates, min(count, len(candidates)))


@dataclass
class EvaluationSlice:
    """A fixed set of unlabeled images and their truth; ``evaluate`` labels and scores them.
    ``recall`` is where precision is compared (None: set by the first evaluation)."""

    records: list[dict]
    truth: CocoData
    settings: PolishSettings
    label_to_cat: dict[int, int]
    recall: float | None = None
    batch_size: int = 8
    warning: str | None = None  # set when the first evaluation cannot use the kept labels

    def _rows(self, model: nn.Module, polisher: Any) -> dict[str, list]:
        cols = empty_columns()
        device = next(model.parameters()).device
        for start in range(0, len(self.records), self.batch_size):
            chunk, images = [], []
            for record in self.records[start : start + self.batch_size]:
                try:
                    images.append(image_tensor(record["path"]).to(device))
                except ImageReadError as e:
                    report_skipped(record["path"], e.reason)
                    continue
                chunk.append(record)
            if not images:
                continue
            dets = detect_and_polish(model, polisher, images, self.settings)
            for record, image, det in zip(chunk, images, dets, strict=True):
                size = (int(image.shape[-2]), int(image.shape[-1]))
                image_rows(cols, record, size, det, self.label_to_cat)
        return cols

    @torch.no_grad()
    def evaluate(self, model: nn.Module, polisher: Any) -> dict[str, Any]:
        """Label the slice with ``model`` (the EMA teacher) and ``polisher``; the teacher
        boxes' AP50, the kept classification pseudo labels' precision and recall (IoU .5,
        class-aware), both views' precision at ``recall``, and the matched boxes' IoU
        before and after polishing."""
        was_training = model.training
        model.eval()
        try:
            quality = pseudo_label_quality(rows_to_table(self._rows(model, polisher)), self.truth)
        finally:
            model.train(was_training)
        teacher, kept = quality["views"]["teacher"], quality["views"]["cls"]
        if self.recall is None:  # where the teacher's pseudo labels stand before training
            self.recall = float(kept["recall50"] or teacher["recall50"] or 0.0)
            if not kept["recall50"]:
                self.warning = (
                    f"the teacher keeps no correct pseudo label on the {len(self.records)} "
                    f"evaluation images: precision is compared at its boxes' recall "
                    f"{self.recall:.4f} instead (set student.online_eval_recall to choose)"
                )
        curves, boxes = quality["pr_curves"], quality["box_quality"]

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(float(value), 4)

        return {
            "slice_images": len(self.records),
            "slice_teacher_ap50": rounded(teacher["AP50"]),
            "slice_kept_precision": rounded(kept["precision50"]),
            "slice_kept_recall": rounded(kept["recall50"]),
            "slice_at_recall": round(self.recall, 4),
            "slice_teacher_precision_at_recall": precision_at_recall(curves["teacher"],
                                                                     self.recall),
            "slice_kept_precision_at_recall": precision_at_recall(curves["cls"], self.recall),
            "slice_iou_before": rounded(boxes["mean_iou_before"]),
            "slice_iou_after": rounded(boxes["mean_iou_after"]),
        }  # fmt: skip
