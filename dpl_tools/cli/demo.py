"""Run the whole method on built-in synthetic data (no download).

Generates textured-shape images (6 classes, told apart by shape and fill,
with unlabeled distractors), labels 5% of the training pool, trains a
teacher and the polishers, polishes the unlabeled images, trains the
full method's student and its two controls (raw pseudo labels; labeled
images only) with the demo preset (small images, CPU) and prints the AP
of the teacher and the three students, and the pseudo labels' quality.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools.cli.options import Device, Jobs, Seed, stage_printer, stage_runner, within
from dpl_tools.config import load_config, merge, preset_path, read_config
from dpl_tools.demo import DEMO_DATA, DEMO_PRESET, demo_stages, demo_summary, prepare_demo_data
from dpl_tools.io import write_json
from dpl_tools.pipeline import run_stages, write_stage_config
from dpl_tools.settings import AT_LEAST_1, Range
from dpl_tools.tables import ReportTable

LABELS = {
    "teacher_ap": "teacher AP (labeled images only)",
    "student_labeled_only_ap": "student AP, labeled images only (same recipe)",
    "student_raw_ap": "student AP, raw pseudo labels",
    "student_polished_ap": "student AP, polished pseudo labels (full method)",
    "pseudo_iou_before": "pseudo-label box IoU to truth, teacher",
    "pseudo_iou_after": "pseudo-label box IoU to truth, polished",
    "pseudo_teacher_boxes": "teacher boxes with score >= 0.5",
    "pseudo_kept": "... kept as classification pseudo labels",
    "pseudo_recall_lost": "recall at IoU .5 lost by the kept set",
    "labels_changed": "labels changed by the polisher",
    "labels_changed_right": "... of which right",
    "pseudo_kept_fraction": "share of teacher boxes kept for classification",
    "keep_rule_source": "keep rule",
    "reg_steps_source": "regression pseudo labels",
}


OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Keep the run directory here (usable as --run-dir by every command); "
        "default: a temporary directory, removed at the end. Rerunning with the same "
        "--out skips finished stages.",
    ),
]
JsonOutOption = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Also write the figures as JSON (teacher_ap, student_labeled_only_ap, "
        "student_raw_ap, student_polished_ap, pseudo_iou_before, pseudo_iou_after, "
        "pseudo_teacher_boxes, "
        "pseudo_kept, pseudo_recall_lost, labels_changed, labels_changed_right).",
    ),
]
ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        help="Settings of every stage: the demo preset (dpl_tools/configs/demo.yaml: 128 px, "
        "a few hundred iterations) or another preset name / YAML path.",
    ),
]
TrainImagesOption = Annotated[
    int,
    typer.Option(
        "--train-images",
        help="Images in the generated training pool (>= 2).",
        callback=within(Range(2)),
    ),
]
TestImagesOption = Annotated[
    int,
    typer.Option(
        "--test-images",
        help="Images in the generated test set (>= 1).",
        callback=within(AT_LEAST_1),
    ),
]
PercentOption = Annotated[
    float,
    typer.Option(
        "--percent",
        help="Percent of the training pool that is labeled, in (0, 100).",
        callback=within(Range(0, 100, low_open=True, high_open=True), float),
    ),
]
BackboneWeightsOption = Annotated[
    str | None,
    typer.Option(
        "--backbone-weights",
        help="ImageNet backbone: imagenet (torchvision's weights, downloaded once), a "
        "checkpoint path (offline, e.g. mobilenet_v2-b0353104.pth), or none (from "
        "scratch: much weaker in the demo's budget). Default: the preset's.",
    ),
]


def command(
    out: OutOption = None,
    json_out: JsonOutOption = None,
    config: ConfigOption = DEMO_PRESET,
    train_images: TrainImagesOption = DEMO_DATA.train_images,
    test_images: TestImagesOption = DEMO_DATA.test_images,
    percent: PercentOption = DEMO_DATA.labeled_percent,
    backbone_weights: BackboneWeightsOption = None,
    device: Device = "auto",
    seed: Seed = 0,
    jobs: Jobs = 1,
) -> None:
    console = Console()
    load_config(config)  # a missing, unknown or invalid config fails before any data is made
    run_dir = out or Path(tempfile.mkdtemp(prefix="dpl-demo-"))
    if backbone_weights is not None:
        sections = merge(read_config(preset_path(config)),
                         {"model": {"backbone_weights": backbone_weights}})  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        config = str(write_stage_config(run_dir, sections).resolve())
    try:
        spec = replace(DEMO_DATA, train_images=train_images, test_images=test_images,
                       labeled_percent=percent)  # fmt: skip
        data = prepare_demo_data(run_dir, seed, spec)
        stages = demo_stages(data, run_dir, device=device, config=config)
        invoke = stage_runner(console, run_dir, jobs)
        run_stages(stages, run_dir, invoke, stage_printer(console), jobs=jobs)
        figures = demo_summary(run_dir)
    finally:
        if out is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    table = ReportTable(
        title=f"dpl demo (synthetic shapes, {spec.labeled_percent:g}% of "
        f"{spec.train_images} labeled, {spec.test_images} test images)"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, label in LABELS.items():
        value = figures[key]
        shown = (
            "n/a" if value is None else str(value) if isinstance(value, int | str)
            else f"{value:.3f}"
        )  # fmt: skip
        table.add_row(label, shown)
    console.print(table)
    if json_out:
        write_json(json_out, figures, indent=2)
        console.print(f"figures written to {json_out}")
    if out is not None:
        console.print(
            f"run directory: {out} (e.g. dpl report {out}/labels.parquet "
            f"--images {data.images} --out {out}/report)"
        )
