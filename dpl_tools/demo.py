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
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.pipeline import PipelineData, Stage, pipeline_stages

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
    labeled = run_dir / "split" / "labeled.json"
    stages += [
        Stage(
            "train-student-raw",
            [
                "train-student",
                "--ann",
                labeled,
                "--images",
                data.images,
                "--pseudo",
                run_dir / "labels.parquet",
                "--pseudo-view",
                "raw",
                "--init",
                run_dir / "teacher.pt",
                "--out",
                raw_student,
                "--seed",
                data.seed,
                "--config",
                config,
                "--device",
                device,
            ],
            raw_student,
            [labeled, run_dir / "labels.parquet", run_dir / "teacher.pt"],
        ),
        Stage(
            "evaluate-student-raw",
            [
                "evaluate",
                "--model",
                raw_student,
                "--ann",
                data.test_ann,
                "--images",
                data.test_images,
                "--json",
                run_dir / "eval" / "student-raw.json",
                "--device",
                device,
            ],
            run_dir / "eval" / "student-raw.json",
            [raw_student, data.test_ann],
        ),
    ]
    return stages


def demo_summary(run_dir: Path) -> dict[str, float | None]:
    """The demo's headline figures from the stage outputs (AP as COCO AP in 0..1)."""

    def ap(name: str) -> float:
        return float(json.loads((run_dir / "eval" / f"{name}.json").read_text())["AP"])

    quality = json.loads((run_dir / "pseudo_quality.json").read_text())["box_quality"]
    return {
        "teacher_ap": ap("teacher"),
        "student_raw_ap": ap("student-raw"),
        "student_polished_ap": ap("student"),
        "pseudo_iou_before": quality["mean_iou_before"],
        "pseudo_iou_after": quality["mean_iou_after"],
    }
