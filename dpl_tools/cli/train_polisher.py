"""Train the regression and classification polishers with the teacher frozen.

One teacher backbone pass per image serves both polishers (RoI features of the 7 vote
boxes from the teacher's own RoI pooler). Regression: GIoU loss on --noise's regression
pairs; classification: cross-entropy on its classification pairs plus the teacher's RPN
proposals. An EMA copy (momentum 0.99) is saved, tied to the teacher's hash. A held-out
--val-fraction of the labeled images reports IoU before/after and classification recall.
AMP on GPU, DDP under torchrun. Periodic checkpoints go to <out stem>.last.pt; --resume
continues from there to the same weights as an uninterrupted run.
After training, the keep thresholds of dpl polish are fitted (best F1 of the
classification pseudo labels at IoU 0.5, or --precision-target) on --crossfit's
out-of-fold detections of the labeled images, run through the trained polisher on the
teacher's features, and stored in the checkpoint. The teacher scores there are honest;
the polisher saw those images' ground truth through its synthetic pairs, so its
probabilities are somewhat optimistic. Without cross-fitted detections the paper's
0.9 / 0.9 stay (said in one line): see dpl_tools/engine/keep_thresholds.py.
--detections trains the polishers on another labeler's mistakes instead: its boxes on the
labeled images, matched to their ground truth, are the real pairs (and fit the synthetic
noise and the keep thresholds), for polishing that labeler's boxes with dpl polish
--detections. A labeler that trained on these images makes optimistic errors here: give
its out-of-fold predictions (each image predicted by a model that did not train on it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

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
    Resume,
    RunDir,
    Seed,
    SetValues,
    set_overrides,
)
from dpl_tools.cli.setting_flags import Flags, with_setting_flags
from dpl_tools.data.crossfit_detections import (
    CROSSFIT_FILE,
    crossfit_path,
)
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.tables import ReportTable


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


# The polisher settings with a flag of their own (any other: --set polisher.KEY=VALUE).
POLISHER_FLAGS = (
    "iters", "batch_size", "lr", "reg_per_image", "cls_per_image", "max_proposals",
    "ema_momentum", "val_fraction", "workers", "checkpoint_every", "noise_model",
    "crossfit_folds", "crossfit_iters_fraction", "real_fraction", "fit_keep_rule",
    "precision_target", "keep_fit_min_matches", "keep_fallback",
)  # fmt: skip


ImagesOption = Annotated[
    Path, typer.Option("--images", help="Folder the file names in --ann are relative to.")
]
TeacherOption = Annotated[
    Path | None,
    typer.Option("--teacher", help="Teacher checkpoint (default <run-dir>/teacher.pt)."),
]
NoiseOption = Annotated[
    Path | None,
    typer.Option("--noise", help="Pairs from dpl synth-noise (default <run-dir>/noise.parquet)."),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Polisher checkpoint to write (default <run-dir>/polisher.pt)."),
]
ValJsonOption = Annotated[
    Path | None,
    typer.Option("--val-json", help="Also write the validation figures to this JSON file."),
]
CrossfitOption = Annotated[
    Path | None,
    typer.Option(
        "--crossfit",
        help="Cross-fitted detections (--noise-model crossfit) to fit dpl polish's keep "
        "thresholds on after training (default: crossfit.parquet beside --noise, else in "
        "the run directory; none found: the paper's 0.9 / 0.9 stay).",
    ),
]
DetectionsOption = Annotated[
    Path | None,
    typer.Option(
        "--detections",
        help="Learn another labeler's mistakes: its detections on the --ann images (COCO "
        "results JSON or YOLO txt folder, as dpl polish --detections), matched to their "
        "ground truth, become the real pairs and fit the synthetic noise and the keep "
        "thresholds (makes --noise; written beside it: labeler_detections.parquet). If "
        "the labeler trained on these images its errors are optimistic: give out-of-fold "
        "predictions.",
    ),
]


@with_setting_flags({"polisher": POLISHER_FLAGS})
def command(
    images: ImagesOption,
    teacher: TeacherOption = None,
    noise: NoiseOption = None,
    ann: LabeledAnn = None,
    out: OutOption = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    val_json: ValJsonOption = None,
    device: Device = "auto",
    seed: Seed = 0,
    resume: Resume = False,
    allow_outside_root: AllowOutsideRoot = False,
    crossfit: CrossfitOption = None,
    detections: DetectionsOption = None,
    detection_classes: DetectionClasses = None,
    category_map: CategoryMap = None,
    set_values: SetValues = None,
    flags: Flags | None = None,
) -> None:
    console = Console()
    flags = dict(flags or {})
    noise_model = flags["polisher"]["noise_model"]
    sets = set_overrides(set_values)
    api.stage_config(config, "polisher", flags=flags, sets=sets)  # a bad --config fails first
    teacher_path = resolve_input(teacher, run_dir, "teacher")
    makes_noise = noise_model is not None or detections is not None
    if not makes_noise:
        noise_path = resolve_input(noise, run_dir, "noise")
    else:
        noise_path = resolve_output(noise, run_dir, "noise")
    ann_path = resolve_input(ann, run_dir, "labeled")
    out_path = resolve_output(out, run_dir, "polisher")
    if crossfit is None and detections is None:  # beside the noise file, or in the run dir
        crossfit = [crossfit_path(noise_path), run_dir / CROSSFIT_FILE]
    trained = api.train_polisher(
        teacher_path, ann_path, images, out_path, config, noise=noise_path,
        make_noise=makes_noise, crossfit=crossfit, detections=detections,
        detection_classes=detection_classes, category_map=category_map, val_json=val_json,
        device=device, seed=seed, resume=resume, allow_outside_root=allow_outside_root,
        console=console, flags=flags, sets=sets,
    )  # fmt: skip
    if int(os.environ.get("RANK", 0)) == 0:
        print_polisher(console, trained)


def print_polisher(console: Console, trained: api.TrainedPolisher) -> None:
    """The trained polisher's table (validation, the keep rule fitted on the cross-fitted or
    the labeler's boxes, the regression check) and its loud fallback lines."""
    result = trained.result
    table = ReportTable(
        title=f"polisher {trained.checkpoint}", title_justify="left", show_header=False
    )
    table.add_row(
        "iterations",
        f"{result.iterations} ({result.iterations_run} in this run, {result.seconds:.1f} s)",
    )
    table.add_row("images", f"{result.train_images} train, {result.val_images} held out")
    table.add_row(
        "last losses",
        f"reg (GIoU) {result.last_losses['reg']:.4f}, cls {result.last_losses['cls']:.4f}",
    )
    val = result.validation
    if val.get("reg_pairs"):
        table.add_row(
            "val mean IoU",
            f"{_fmt(val['mean_iou_before'])} -> {_fmt(val['mean_iou_after'])} "
            f"({val['reg_pairs']} pairs, {val['improved_fraction']:.0%} improved)",
        )
    if val.get("cls_samples"):
        table.add_row("val cls accuracy", _fmt(val["cls_accuracy"]))
        table.add_row("val fg / bg recall", f"{_fmt(val['fg_recall'])} / {_fmt(val['bg_recall'])}")
    fitted = result.keep_thresholds
    if fitted:
        _keep_rows(table, fitted, trained.fitted_on)
    if result.regression_check:
        check = result.regression_check
        table.add_row("regression pseudo labels", f"{check['choice']} ({check['reason']})")
    console.print(table)
    if result.keep_note:
        console.print(result.keep_note, highlight=False)
    for line in fallback_lines(fitted, result.regression_check):
        console.print(f"[bold red]{line}[/]", highlight=False)


def _keep_rows(table: ReportTable, fitted: dict, boxes: str) -> None:
    """The fitting rows: the rule, what it was fitted on, and the density match."""
    source = fitted.get("keep_rule_source", "fitted")
    table.add_row(
        f"keep thresholds ({'fitted' if source == 'fitted' else 'fallback'})",
        f"cls_prob {fitted['cls_prob']:g}, teacher_score {fitted['teacher_score']:g}",
    )
    floor = fitted.get("min_score")
    table.add_row(
        f"  fitted on {boxes} boxes",
        f"{fitted['detections']} boxes (score >= {_fmt(floor)}), {fitted.get('matched', 'n/a')} "
        f"matched to truth, {fitted['images']} images",
    )
    table.add_row(
        "  at that point",
        f"{fitted['objective']}: P@.5 {fitted['precision50']:.3f}, R@.5 "
        f"{fitted['recall50']:.3f}, F1 {fitted['f1']:.3f}; kept {fitted['kept']} boxes",
    )
    density = fitted.get("density")
    if density:
        t = density["initial_thresh"]
        table.add_row(
            "  boxes per image",
            f"fold teachers {density['fold_per_image']:.2f} (>= {t:g}, out-of-fold), teacher "
            f"{density['teacher_per_image']:.2f} (>= {t:g}, its own labeled images), truth "
            f"{density['truth_per_image']:.2f}; fitted down to {density['floor']:.3f}",
        )


def fallback_lines(fitted: dict | None, check: dict | None) -> list[str]:
    """One loud line per fallback taken (keep rule, regression pseudo labels)."""
    lines = []
    source = (fitted or {}).get("keep_rule_source", "fitted")
    if fitted and source != "fitted":
        lines.append(
            f"keep rule: too little to fit on, {source}: cls_prob {fitted['cls_prob']:g}, "
            f"teacher_score {fitted['teacher_score']:g} (dpl polish will use it)"
        )
    if check and check.get("reg_steps") == 0:
        lines.append(
            f"regression polisher: {check['reason']} on {check['pairs']} real held-out pairs; "
            "dpl polish will keep the teacher's boxes as regression pseudo labels (--reg-steps "
            "1 to polish anyway; or retrain with --noise-model gaussian)"
        )
    return lines
