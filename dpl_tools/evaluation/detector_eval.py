"""Evaluate a detector checkpoint on a COCO ground-truth set: batched inference + COCO AP."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import report_skipped
from dpl_tools.engine.inference import predict_detections, to_coco_results
from dpl_tools.errors import DplError
from dpl_tools.evaluation.coco_eval import coco_metrics
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.models.detector import set_test_settings
from dpl_tools.progress import track
from dpl_tools.runtime import resolve_device


@dataclass
class DetectorEvaluation:
    """Metrics, the COCO results they came from, and inference speed."""

    metrics: dict[str, float]
    detections: list[dict[str, Any]]
    num_images: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "images": self.num_images,
            "skipped_images": self.skipped,
            "detections": len(self.detections),
            "inference_s": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
        }


def evaluate_model(
    model_path: str | Path,
    ann: str | Path,
    images_dir: str | Path,
    batch_size: int = 4,
    device: str = "auto",
    workers: int = 2,
    score_thresh: float = 0.001,
    max_dets: int = 100,
    console: Console | None = None,
    allow_outside_root: bool = False,
) -> DetectorEvaluation:
    """Run the detector at ``model_path`` on every image of ``ann`` and score it (COCO AP).

    Unreadable images are skipped (reported) and left out of the ground truth too.
    """
    torch_device = resolve_device(device)
    model, spec = load_detector(model_path, torch_device)
    set_test_settings(model, score_thresh=score_thresh, detections_per_img=max_dets)
    gt = load_coco(ann, images_dir, allow_outside_root=allow_outside_root)
    names = [c["name"] for c in spec.categories]
    gt_cats = {c["name"]: c["id"] for c in gt.categories}
    if sorted(names) != sorted(gt_cats):
        raise DplError(
            f"{ann}: categories {sorted(gt_cats)} differ from the model's {sorted(names)} "
            f"({model_path})"
        )
    # Report in the ground truth's category ids, matched by name.
    label_to_cat = {i + 1: gt_cats[name] for i, name in enumerate(names)}
    skipped: list[int] = []

    def on_error(record: dict, reason: str) -> None:
        skipped.append(record["id"])
        report_skipped(Path(images_dir) / record["file_name"], reason)

    detections: list[dict[str, Any]] = []
    began = time.perf_counter()
    stream = predict_detections(
        model, gt.images, images_dir, batch_size, torch_device, workers, on_error
    )
    for record, boxes, scores, labels in track(
        stream, total=len(gt.images), description="evaluate", console=console
    ):
        detections.extend(to_coco_results(record, boxes, scores, labels, label_to_cat))
    seconds = time.perf_counter() - began
    gt_dict = gt.to_dict()
    if skipped:
        gone = set(skipped)
        gt_dict["images"] = [im for im in gt_dict["images"] if im["id"] not in gone]
        gt_dict["annotations"] = [a for a in gt_dict["annotations"] if a["image_id"] not in gone]
    metrics = coco_metrics(gt_dict, detections)
    return DetectorEvaluation(
        metrics, detections, len(gt.images) - len(skipped), len(skipped), seconds
    )
