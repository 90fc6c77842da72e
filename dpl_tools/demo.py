"""``dpl demo``: the whole method on a built-in synthetic dataset, with its headline figures.

It generates coloured-shape images (no download), splits the training pool into labeled
and unlabeled images, runs the pipeline of ``dpl run`` with the ``demo`` preset, trains a
second student on the raw (unpolished) pseudo labels for comparison, and reports teacher
AP, both students' AP and pseudo-label box quality before/after polishing.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpl_tools.config import preset_path
from dpl_tools.data.pseudo_labels import pseudo_label_sources
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.pipeline import (
    PipelineData,
    Stage,
    evaluate_model_stage,
    pipeline_stages,
    student_stage,
)

DEMO_PRESET = "demo"
TRAIN_IMAGES = 80
TEST_IMAGES = 30
LABELED_PERCENT = 25.0
IMAGE_SIZE = (160, 128)


def prepare_demo_data(out_dir: Path, seed: int = 0) -> PipelineData:
    """Generate the demo's training pool and test set under ``out_dir/data`` (idempotent)."""
    data_dir = out_dir / "data"
    sets = {}
    for name, count, offset in (("train", TRAIN_IMAGES, 0), ("test", TEST_IMAGES, 1000)):
        ann = data_dir / name / "annotations.json"
        if not ann.is_file():
            make_synthetic_dataset(
                data_dir / name,
                num_images=count,
                image_size=IMAGE_SIZE,
                max_objects=4,
                seed=seed + offset,
            )
        sets[name] = ann
    return PipelineData(
        ann=sets["train"],
        images=sets["train"].parent / "images",
        percent=LABELED_PERCENT,
        fold=1,
        seed=seed,
        test_ann=sets["test"],
        test_images=sets["test"].parent / "images",
    )


def demo_stages(
    data: PipelineData, run_dir: Path, device: str = "auto", config: str | Path = DEMO_PRESET
) -> list[Stage]:
    """The pipeline's stages plus a student on raw pseudo labels and its evaluation
    (``config``: the ``demo`` preset, or another preset name / YAML path)."""
    config = str(preset_path(config))
    stages = pipeline_stages(data, run_dir, config, rounds=1, device=device)
    raw_student = run_dir / "student_raw.pt"
    stages += [
        student_stage(
            "train-student-raw",
            run_dir / "split" / "labeled.json",
            data.images,
            run_dir / "labels.parquet",
            run_dir / "teacher.pt",
            raw_student,
            data.seed,
            config,
            device,
            pseudo_view="raw",
        ),
        evaluate_model_stage(
            "evaluate-student-raw",
            raw_student,
            data.test_ann,
            data.test_images,
            run_dir / "eval" / "student-raw.json",
            device,
        ),
    ]
    return stages


def demo_summary(run_dir: Path) -> dict[str, float | int | None]:
    """The demo's headline figures from the stage outputs (AP as COCO AP in 0..1), with
    the classification pseudo labels' figures (``pseudo_quality``'s keep_rule and
    label_changes: boxes kept of the teacher's score >= 0.5 ones, recall lost, labels
    changed by the polisher and how many of those are right)."""

    def ap(name: str) -> float:
        return float(json.loads((run_dir / "eval" / f"{name}.json").read_text())["AP"])

    figures = json.loads((run_dir / "pseudo_quality.json").read_text())
    quality, kept, changes = figures["box_quality"], figures["keep_rule"], figures["label_changes"]
    return {
        "teacher_ap": ap("teacher"),
        "student_raw_ap": ap("student-raw"),
        "student_polished_ap": ap("student"),
        "pseudo_iou_before": quality["mean_iou_before"],
        "pseudo_iou_after": quality["mean_iou_after"],
        "pseudo_teacher_boxes": kept["teacher_boxes"],
        "pseudo_kept": kept["kept"],
        "pseudo_recall_lost": kept["recall_lost"],
        "labels_changed": changes["changed"],
        "labels_changed_right": changes["right"],
        **pseudo_label_sources(run_dir / "labels.parquet"),
    }
