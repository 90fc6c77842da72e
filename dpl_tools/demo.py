"""``dpl demo``: the whole method on a built-in synthetic dataset, with its headline figures.

It generates textured-shape images (no download; 6 classes told apart by shape and fill,
with distractors), splits the training pool into labeled and unlabeled images, runs the
pipeline of ``dpl run`` with the ``demo`` preset, trains the full method's two controls
(a student on the raw, unpolished pseudo labels and a labeled-only student with the same
recipe) and reports the AP of the teacher and the three students, and pseudo-label
quality before/after polishing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpl_tools.config import preset_path
from dpl_tools.data.pseudo_labels import pseudo_label_sources
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.pipeline import (
    PipelineData,
    Stage,
    evaluate_model_stage,
    labeled_only_settings,
    pipeline_stages,
    student_stage,
)

DEMO_PRESET = "demo"


@dataclass(frozen=True)
class DemoData:
    """The demo's synthetic data (``dpl_tools.data.synthetic``'s texture style): a training
    pool of which ``labeled_percent`` is labeled, and a test set."""

    train_images: int = 1000
    test_images: int = 300
    labeled_percent: float = 5.0
    image_size: tuple[int, int] = (160, 128)
    max_objects: int = 4
    max_distractors: int = 3
    style: str = "texture"

    def make_set(self, folder: Path, images: int, seed: int) -> Path:
        """One set of this data's images under ``folder`` (generator ``seed``; made once):
        its annotations file."""
        ann = folder / "annotations.json"
        if not ann.is_file():
            make_synthetic_dataset(folder, num_images=images, image_size=self.image_size,
                                   max_objects=self.max_objects, seed=seed, style=self.style,
                                   max_distractors=self.max_distractors)  # fmt: skip
        return ann


DEMO_DATA = DemoData()
TEST_SEED_OFFSET = 1000  # the test set's generator seed is the demo seed + this


def prepare_demo_data(out_dir: Path, seed: int = 0, spec: DemoData = DEMO_DATA) -> PipelineData:
    """Generate the demo's training pool and test set under ``out_dir/data`` (idempotent)."""
    data_dir = out_dir / "data"
    sets = {
        "train": spec.make_set(data_dir / "train", spec.train_images, seed),
        "test": spec.make_set(data_dir / "test", spec.test_images, seed + TEST_SEED_OFFSET),
    }
    return PipelineData(
        ann=sets["train"],
        images=sets["train"].parent / "images",
        percent=spec.labeled_percent,
        fold=1,
        seed=seed,
        test_ann=sets["test"],
        test_images=sets["test"].parent / "images",
    )


def demo_stages(
    data: PipelineData, run_dir: Path, device: str = "auto", config: str | Path = DEMO_PRESET
) -> list[Stage]:
    """The pipeline's stages plus the two controls of the full method's student, each with
    its test evaluation: a student on raw (unpolished) pseudo labels, and the labeled-only
    student (same recipe and iterations, no pseudo label). ``config``: the ``demo`` preset,
    or another preset name / YAML path."""
    config = str(preset_path(config))
    stages = pipeline_stages(data, run_dir, config, rounds=1, device=device)
    labeled, labels = run_dir / "split" / "labeled.json", run_dir / "labels.parquet"
    for row, pseudo, view, extra in (
        ("raw", labels, "raw", None),
        ("labeled-only", None, None, labeled_only_settings(config)),  # no pseudo label
    ):
        student = run_dir / f"student_{row.replace('-', '_')}.pt"
        stages += [
            student_stage(f"train-student-{row}", labeled, data.images, pseudo,
                          run_dir / "teacher.pt", student, data.seed, config, device,
                          pseudo_view=view, extra=extra),
            evaluate_model_stage(f"evaluate-student-{row}", student, data.test_ann,
                                 data.test_images, run_dir / "eval" / f"student-{row}.json",
                                 device),
        ]  # fmt: skip
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
        "student_labeled_only_ap": ap("student-labeled-only"),
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
