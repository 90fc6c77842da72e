"""Polish the teacher's pseudo labels on unlabeled images and write them to Parquet.

--images is a folder (recursive) or a COCO JSON image list; teacher and polisher default
to <run-dir>/teacher.pt and polisher.pt. Resumable: rerunning the same command skips
images already written (a killed run loses at most its batch in flight). --shard I/N and
torchrun ranks split the images, each writing a part file into the --out directory.
--coco-out / --yolo-out also export one view of the labels (--coco-view). Thresholds:
built-in defaults < the --config polish section < flags.
The keep rule's thresholds (cls_prob, teacher_score) are, unless given (flag or config),
the ones train-polisher fitted into the polisher (--keep-rule fitted, the default; the
paper's 0.9 / 0.9 with a note when it holds none) or the paper's (--keep-rule paper); the
values used and their source (fitted / paper / user) go into the Parquet metadata.

--detections polishes another labeler's boxes (a COCO results file or a folder of YOLO txt
files with confidences) instead of the teacher's; the teacher supplies the features only.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools.cli.options import (
    AllowOutsideRoot,
    CategoryMap,
    DetectionClasses,
    Device,
    RunDir,
    default,
    setting,
)
from dpl_tools.config import load_config
from dpl_tools.data.detections import TEACHER_BOXES, ExternalDetections, load_detections
from dpl_tools.data.export import VIEWS, check_yolo_out, view_boxes, write_coco, write_yolo
from dpl_tools.data.image_list import load_image_list, parse_shard, shard_records
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, output_file
from dpl_tools.data.pseudo_labels import META_BOXES, dropped_warning, read_pseudo_labels
from dpl_tools.engine.keep_thresholds import resolve_keep_thresholds
from dpl_tools.engine.polish import (
    PolishSettings,
    PolishSummary,
    kept_warning,
    polish_images,
    polish_metadata,
)
from dpl_tools.engine.regression_check import resolve_reg_steps
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.models.polisher import load_polisher
from dpl_tools.outputs import check_distinct_outputs, check_outputs_not_read, output_lock
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.runtime import resolve_device
from dpl_tools.tables import ReportTable


def _shard(shard: str | None) -> tuple[int, int]:
    """This process's shard: --shard I/N combined with torchrun's RANK / WORLD_SIZE."""
    index, count = parse_shard(shard) if shard else (0, 1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return index * world + rank, count * world


def _print_detections(
    console: Console, given: ExternalDetections, settings, learned: dict | None
) -> None:
    """What was read from --detections (and what of the teacher does not apply to it);
    ``learned``: the polisher's noise description (which mistakes it learned)."""
    source = given.source
    console.print(
        f"--detections: {given.count} boxes on {len(given.by_file)} image(s) from "
        f"{source['file']} ({source['format']})"
    )
    if given.dropped_classes:
        console.print(f"{given.dropped_classes} box(es) of classes mapped to null dropped")
    if getattr(settings, "tta", False):
        console.print("[yellow]note:[/] --tta augments teacher boxes; not used with --detections")
    if (learned or {}).get("model") != "detections":
        console.print(
            "[yellow]note:[/] this polisher learned the teacher's mistakes, and its keep "
            "thresholds (if fitted) the teacher's scores; dpl train-polisher --detections on "
            "this labeler's boxes of the labeled images fits both to the labeler"
        )


def _print_summary(
    console: Console, summary: PolishSummary, dest: Path, external: bool = False
) -> None:
    table = ReportTable(title=f"dpl polish -> {dest}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("images in this shard", summary.total_images),
        ("already written earlier", summary.already_done),
        ("processed now", summary.processed),
        ("skipped (unreadable, whole output)", len(summary.skipped)),
        ("labeler boxes kept" if external else "teacher boxes kept", summary.boxes),
        ("classification labels (use_cls)", summary.use_cls),
        ("kept for classification", _pct(summary.kept_fraction)),
        ("labels changed by the polisher", summary.label_changed),
        ("images/s", f"{summary.images_per_s:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    warning = kept_warning(summary)
    if warning:
        console.print(f"[bold red]warning:[/] {warning}", highlight=False)
    for name, reason in summary.skipped[:10]:
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    if len(summary.skipped) > 10:
        console.print(f"... and {len(summary.skipped) - 10} more (status='skipped' rows)")
    if not summary.wrote:
        console.print("nothing to do: every image is already in the output")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _print_bad_input(console: Console, listing_skipped: list, summary: PolishSummary) -> None:
    """Retried images, size mismatches and folder entries passed over while listing."""
    if summary.retried:
        console.print(
            f"retried {summary.retried} image(s) skipped as unreadable by an earlier run: "
            f"{summary.retried_ok} read now, {summary.retried - summary.retried_ok} still skipped"
        )
    if summary.size_mismatch:
        console.print(
            f"[yellow]warning:[/] {summary.size_mismatch} image(s) whose width/height in the "
            "image list differ from the decoded (EXIF-upright) image; the labels use the "
            "decoded size"
        )
    for name, reason in listing_skipped[:10]:
        console.print(f"[yellow]skipped while listing[/] {name}: {reason}", highlight=False)
    if len(listing_skipped) > 10:
        console.print(f"... and {len(listing_skipped) - 10} more folder entries passed over")


def _export(
    console: Console, out: Path, coco_out, coco_view: str, yolo_out, overwrite: bool
) -> None:
    if not (coco_out or yolo_out):
        return
    table, meta = read_pseudo_labels(out)
    dropped = view_boxes(table, coco_view)["dropped"]
    if dropped:
        warning = dropped_warning(out, dropped)
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if coco_out:
        n = write_coco(table, meta, coco_out, coco_view, source=out)
        console.print(f"COCO JSON ({coco_view} view, {n} boxes) written to {coco_out}")
    if yolo_out:
        n = write_yolo(table, meta, yolo_out, coco_view, overwrite, source=out)
        console.print(f"YOLO labels ({coco_view} view, {n} boxes) written to {yolo_out}")


def command(
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Unlabeled images: a folder (recursive; linked folders leading outside it "
            "are skipped with a warning unless --allow-outside-root) or a COCO JSON. No "
            "output may lie inside it.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output .parquet file, or a directory of part files (sharded runs); "
            "default <run-dir>/labels.parquet.",
        ),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="Teacher checkpoint (default <run-dir>/teacher.pt)."),
    ] = None,
    polisher: Annotated[
        Path | None,
        typer.Option("--polisher", help="Polisher checkpoint (default <run-dir>/polisher.pt)."),
    ] = None,
    allow_outside_root: AllowOutsideRoot = False,
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root",
            help="Folder the file names of a COCO JSON --images are relative to "
            "(default: the JSON's folder).",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="Preset name or YAML path whose polish section sets the thresholds below "
            "(score_thresh, nms_thresh, detections_per_img, initial_thresh, cls_prob, "
            "teacher_score, batch_size, workers, reg_steps, tta); flags override it.",
        ),
    ] = None,
    score_thresh: Annotated[
        float | None,
        typer.Option(
            "--score-thresh",
            help=f"Teacher test-time score threshold ({default('polish', 'score_thresh')}).",
            callback=setting("polish", "score_thresh"),
        ),
    ] = None,
    nms_thresh: Annotated[
        float | None,
        typer.Option(
            "--nms-thresh",
            help=f"Teacher test-time NMS IoU threshold ({default('polish', 'nms_thresh')}).",
            callback=setting("polish", "nms_thresh"),
        ),
    ] = None,
    max_dets: Annotated[
        int | None,
        typer.Option(
            "--max-dets",
            help=f"Teacher detections kept per image ({default('polish', 'detections_per_img')}).",
            callback=setting("polish", "detections_per_img"),
        ),
    ] = None,
    initial_threshold: Annotated[
        float | None,
        typer.Option(
            "--initial-threshold",
            help="Teacher boxes with this score or more are polished "
            f"({default('polish', 'initial_thresh')}).",
            callback=setting("polish", "initial_thresh"),
        ),
    ] = None,
    cls_prob: Annotated[
        float | None,
        typer.Option(
            "--cls-prob",
            help="Classification polisher probability that keeps/relabels a box (default: "
            "--keep-rule's value); overrides the polisher's fitted value.",
            callback=setting("polish", "cls_prob"),
        ),
    ] = None,
    teacher_score: Annotated[
        float | None,
        typer.Option(
            "--teacher-score",
            help="Teacher score above which a box is kept as it is (default: --keep-rule's "
            "value); overrides the polisher's fitted value.",
            callback=setting("polish", "teacher_score"),
        ),
    ] = None,
    keep_rule: Annotated[
        str | None,
        typer.Option(
            "--keep-rule",
            help="Keep thresholds: fitted (by train-polisher on cross-fitted detections; the "
            "paper's when the polisher holds none) or paper (0.9 / 0.9) "
            f"({default('polish', 'keep_rule')}).",
            callback=setting("polish", "keep_rule"),
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Images per batch (default 16 on GPU, 2 on CPU).",
            callback=setting("polish", "batch_size"),
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help=f"DataLoader worker processes decoding images ({default('polish', 'workers')}).",
            callback=setting("polish", "workers"),
        ),
    ] = None,
    reg_steps: Annotated[
        int | None,
        typer.Option(
            "--reg-steps",
            help="Regression polisher passes per box, each refined box the next input "
            f"({default('polish', 'reg_steps')}).",
            callback=setting("polish", "reg_steps"),
        ),
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Teacher test-time augmentation: flip + polish.tta_scales passes fused by "
            "weighted box fusion; the fused boxes are the teacher boxes (off by default).",
        ),
    ] = None,
    device: Device = "auto",
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard", help="Process shard I of N (0-based, e.g. 0/4); --out is a directory."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop with an error at the first unreadable image.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Start again instead of resuming or reusing the output."),
    ] = False,
    coco_out: Annotated[
        Path | None, typer.Option("--coco-out", help="Also write the labels as COCO JSON here.")
    ] = None,
    coco_view: Annotated[
        str,
        typer.Option(
            "--coco-view",
            help="Labels exported by --coco-out/--yolo-out: polished (use_cls rows, polished "
            "box + label), cls (teacher box, polished label), reg (use_reg rows, polished box, "
            "teacher label), teacher (all kept teacher boxes).",
        ),
    ] = "polished",
    yolo_out: Annotated[
        Path | None,
        typer.Option(
            "--yolo-out", help="Also write YOLO txt labels (+ classes.txt) into this folder."
        ),
    ] = None,
    export_only: Annotated[
        bool,
        typer.Option(
            "--export-only",
            help="Run no model: export an existing --out (file or part directory) to "
            "--coco-out/--yolo-out, e.g. after all shards finished.",
        ),
    ] = False,
    detections: Annotated[
        Path | None,
        typer.Option(
            "--detections",
            help="Polish another labeler's boxes instead of the teacher's: a COCO results "
            "JSON (image_id or file_name, category_id, bbox, score) or a folder of YOLO txt "
            "files with a confidence column (class cx cy w h conf). The teacher still "
            "supplies the features; --initial-threshold applies to the labeler's scores.",
        ),
    ] = None,
    detection_classes: DetectionClasses = None,
    category_map: CategoryMap = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")
    ] = True,
) -> None:
    console = Console()
    pcfg = load_config(
        config,
        {
            "polish": {
                "score_thresh": score_thresh,
                "nms_thresh": nms_thresh,
                "detections_per_img": max_dets,
                "initial_thresh": initial_threshold,
                "cls_prob": cls_prob,
                "teacher_score": teacher_score,
                "keep_rule": keep_rule,
                "batch_size": batch_size,
                "workers": workers,
                "reg_steps": reg_steps,
                "tta": tta,
            }
        },
    )["polish"]
    if coco_view not in VIEWS:
        raise DplError(f"--coco-view {coco_view!r}: choose from {', '.join(VIEWS)}")
    out = resolve_output(out, run_dir, "labels")
    if export_only:
        if not (coco_out or yolo_out):
            raise DplError("--export-only needs --coco-out and/or --yolo-out")
        exports = {"--coco-out": coco_out, "--yolo-out": yolo_out}
        check_distinct_outputs({"--out": out}, exports, folders={"--yolo-out"})
        if yolo_out:
            check_yolo_out(yolo_out, overwrite)
        _export(console, out, coco_out, coco_view, yolo_out, overwrite)
        return
    if images is None:
        raise DplError("--images is required (a folder or a COCO JSON image list)")
    shard_index, shard_count = _shard(shard)
    if shard_count > 1 and (coco_out or yolo_out):
        raise DplError(
            "--coco-out/--yolo-out need every shard's labels: after all shards finish, run "
            "`dpl polish --out DIR --export-only --coco-out ...`"
        )
    teacher_path = resolve_input(teacher, run_dir, "teacher")
    polisher_path = resolve_input(polisher, run_dir, "polisher")
    check_distinct_outputs(
        {"--images": images, "--image-root": image_root, "--teacher": teacher_path,
         "--polisher": polisher_path, "--detections": detections,
         "--detection-classes": detection_classes, "--category-map": category_map},
        {"--out": out, "--coco-out": coco_out, "--yolo-out": yolo_out},
        folders={"--out", "--yolo-out"},
    )  # fmt: skip
    dest = output_file(out, shard_index, shard_count)
    if dest != out:  # --out is a folder of part files: this shard's file too
        check_distinct_outputs({}, {"--out": dest, "--coco-out": coco_out})
    if yolo_out:
        check_yolo_out(yolo_out, overwrite)
    with output_lock(dest, "dpl polish"):  # a second polish of the same --out fails at once
        dev = resolve_device(device)
        image_list = load_image_list(images, image_root, allow_outside_root)
        read = (r["path"] for r in image_list)
        check_outputs_not_read({"--out": dest, "--coco-out": coco_out}, read, "--images")
        if image_list.outside:
            console.print(
                f"[yellow]warning:[/] {image_list.outside} image(s) in linked folders leading "
                f"outside {images} not read (--allow-outside-root reads them)",
                highlight=False,
            )
        records = shard_records(image_list, shard_index, shard_count)
        model, spec = load_detector(teacher_path, dev)
        teacher_sha = sha256_file(teacher_path)
        refiner = load_polisher(polisher_path, teacher_sha=teacher_sha, device=dev)
        keep = resolve_keep_thresholds(
            pcfg["keep_rule"], refiner.fitted_thresholds, pcfg["cls_prob"],
            pcfg["teacher_score"], str(polisher_path),
        )  # fmt: skip
        steps, steps_source = resolve_reg_steps(pcfg["reg_steps"], refiner.regression_check)
        settings = replace(
            PolishSettings.from_section(pcfg), cls_prob=keep.cls_prob,
            teacher_score=keep.teacher_score, reg_steps=steps,
        )  # fmt: skip
        if keep.note:
            console.print(f"note: {keep.note}", highlight=False)
        console.print(keep.describe(), highlight=False)
        if keep.source.startswith("fallback"):
            console.print(f"[bold red]keep rule: {keep.source}[/]", highlight=False)
        if steps == 0:
            console.print(
                f"[bold red]regression pseudo labels: the teacher's boxes[/] ({steps_source})",
                highlight=False,
            )
        meta = polish_metadata(
            spec.categories, settings, teacher_sha, sha256_file(polisher_path),
            keep_sources={**keep.metadata(), "reg_steps_source": steps_source},
            fitted=keep.fitted, regression=refiner.regression_check,
        )  # fmt: skip
        given = None
        if detections is not None:
            given = load_detections(
                detections, image_list, spec.categories, detection_classes, category_map
            )
            _print_detections(console, given, settings, refiner.noise)
        meta[META_BOXES] = given.source if given is not None else TEACHER_BOXES
        writer = PseudoLabelWriter(dest, meta, overwrite=overwrite)
        summary = polish_images(
            model,
            spec.label_to_cat,
            refiner,
            records,
            writer,
            settings,
            pcfg["batch_size"] or (16 if dev.type == "cuda" else 2),
            dev,
            pcfg["workers"],
            strict,
            show_progress=progress,
            console=console,
            detections=given,
        )
        _print_summary(console, summary, dest, given is not None)
        _print_bad_input(console, image_list.skipped, summary)
        _export(console, dest, coco_out, coco_view, yolo_out, overwrite)
