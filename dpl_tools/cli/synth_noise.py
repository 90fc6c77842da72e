"""Synthesize the polishers' training pairs (noisy boxes around labeled GT boxes).

Regression: 150 noisy copies per GT box at s = 0.2 plus the GT (target: the image's
best-IoU GT); classification: 50 at s = 0.06 and 50 at s = 0.2 plus the GT (label:
best-IoU GT's class if IoU >= 0.7, else background). --rounds independent draws, one
per training round. --noise-model empirical fits the noise to the teacher's own errors
(--teacher, on --heldout-ann images the teacher did not train on, never a test split);
--noise-model crossfit trains K fold teachers on K-1 folds of the labeled images, takes
their real errors on the held-out fold (crossfit.parquet beside --out) as real pairs and
fits the empirical noise on them. --detections takes another labeler's boxes on the
labeled images as the real errors instead (see dpl train-polisher --detections). Writes
Parquet in row groups and prints a summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import (
    AllowOutsideRoot,
    CategoryMap,
    Config,
    DetectionClasses,
    Device,
    LabeledAnn,
    RunDir,
    Seed,
    setting,
)
from dpl_tools.cli.setting_flags import Flags, with_setting_flags
from dpl_tools.errors import DplError
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.tables import ReportTable

if TYPE_CHECKING:  # torch: only when a stage runs
    from dpl_tools.engine.polisher_noise import NoiseFile


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DplError(f"{what} {text!r}: expected comma-separated numbers") from None


# The pair synthesis settings with a flag of their own.
NOISE_FLAGS = (
    "noise_model", "rounds", "reg_copies", "reg_scale", "fg_iou", "crossfit_folds",
    "crossfit_iters_fraction", "empirical_inflate",
)  # fmt: skip


OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Noise Parquet to write (default <run-dir>/noise.parquet)."),
]
ClsCopiesOption = Annotated[
    str | None,
    typer.Option("--cls-copies", help="Classification copies per group, e.g. 50,50."),
]
ClsScalesOption = Annotated[
    str | None,
    typer.Option("--cls-scales", help="Classification noise scale per group, e.g. 0.06,0.2."),
]
TeacherOption = Annotated[
    Path | None,
    typer.Option(
        "--teacher",
        help="Teacher for --noise-model empirical / crossfit (<run-dir>/teacher.pt).",
    ),
]
ImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="Image folder of --ann (crossfit) or --heldout-ann (empirical noise).",
    ),
]
HeldoutAnnOption = Annotated[
    Path | None,
    typer.Option(
        "--heldout-ann",
        help="empirical: COCO JSON of labeled images the teacher did not train on, to fit "
        "the noise on (default: --ann itself, which understates real errors). Must not "
        "be a test split: the figures measured on it would be leaked; --noise-model "
        "crossfit needs no held-out set.",
    ),
]
WorkersOption = Annotated[
    int,
    typer.Option(
        "--workers",
        help="DataLoader workers for the teacher (empirical).",
        callback=setting("polisher", "workers"),
    ),
]
DetectionsOption = Annotated[
    Path | None,
    typer.Option(
        "--detections",
        help="Real pairs from another labeler's detections on the --ann images (COCO "
        "results JSON or YOLO txt folder) instead of the noise model's; optimistic if "
        "the labeler trained on these images (give out-of-fold predictions).",
    ),
]


@with_setting_flags({"polisher": NOISE_FLAGS})
def command(
    ann: LabeledAnn = None,
    out: OutOption = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    seed: Seed = 0,
    cls_copies: ClsCopiesOption = None,
    cls_scales: ClsScalesOption = None,
    teacher: TeacherOption = None,
    images: ImagesOption = None,
    heldout_ann: HeldoutAnnOption = None,
    device: Device = "auto",
    workers: WorkersOption = 2,
    allow_outside_root: AllowOutsideRoot = False,
    detections: DetectionsOption = None,
    detection_classes: DetectionClasses = None,
    category_map: CategoryMap = None,
    flags: Flags | None = None,
) -> None:
    console = Console()
    flags = {"polisher": {**(flags or {}).get("polisher", {}),
                          "cls_copies": _floats(cls_copies, "--cls-copies") or None,
                          "cls_scales": _floats(cls_scales, "--cls-scales")}}  # fmt: skip
    cfg = api.stage_config(config, "polisher", flags=flags)["polisher"]
    ann_path = resolve_input(ann, run_dir, "labeled")
    out_path = resolve_output(out, run_dir, "noise")
    needs_teacher = cfg["noise_model"] != "gaussian" and detections is None
    if needs_teacher and images is None:
        raise DplError(
            f"--noise-model {cfg['noise_model']} needs --images (the labeled images' folder)"
        )
    teacher_path = resolve_input(teacher, run_dir, "teacher") if needs_teacher else None
    made = api.synth_noise(
        ann_path, out_path, config, images=images, teacher=teacher_path,
        heldout_ann=heldout_ann, detections=detections, detection_classes=detection_classes,
        category_map=category_map, device=device, seed=seed, workers=workers,
        allow_outside_root=allow_outside_root, console=console, flags=flags,
    )  # fmt: skip
    print_noise(console, made)


def print_noise(console: Console, made: NoiseFile) -> None:
    """The cross-fitting summary (when it ran) and the pairs written, by kind and source."""
    summary, model, gt = made.summary, made.model, made.gt
    if made.crossfit is not None:
        from dpl_tools.engine.polisher_noise import print_crossfit

        print_crossfit(made.crossfit, console)
    table = ReportTable(title=f"synth-noise -> {made.path}", title_justify="left")
    for name in ("kind", "pairs", "mean IoU", "foreground"):
        table.add_column(name, justify="right")
    first = next(iter(summary.per_kind.values()), {})
    for bin_name in first.get("iou_histogram", {}):
        table.add_column(f"IoU {bin_name}", justify="right")
    for kind, stats in summary.per_kind.items():
        fg = stats["foreground_fraction"]
        table.add_row(
            kind, str(stats["pairs"]), f"{stats['mean_iou']:.3f}",
            "" if fg is None else f"{fg:.1%}",
            *(f"{v / max(stats['pairs'], 1):.1%}" for v in stats["iou_histogram"].values()),
        )  # fmt: skip
    console.print(table)
    sources = ", ".join(f"{n} {k}" for k, n in sorted(summary.per_source.items()))
    console.print(
        f"{len(gt.image_ids)} images, {len(gt.boxes)} GT boxes, {made.rounds} round(s), "
        f"noise model {made.source} ({model.name} "
        f"synthetic noise); pairs: {sources}",
        highlight=False,
    )
