"""Polish the teacher's pseudo labels on unlabeled images and write them to Parquet.

--images is a folder (recursive) or a COCO JSON image list; teacher and polisher default
to <run-dir>/teacher.pt and polisher.pt. Resumable: rerunning the same command skips
images already written (a killed run loses at most its batch in flight). --shard I/N and
torchrun ranks split the images, each writing a part file into the --out directory.
--coco-out / --yolo-out also export one view of the labels (--coco-view).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from commands.options import Device, RunDir
from dpl_tools.data.export import VIEWS, write_coco, write_yolo
from dpl_tools.data.image_list import load_image_list, parse_shard, shard_records
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, output_file
from dpl_tools.data.pseudo_labels import read_pseudo_labels
from dpl_tools.engine.polish import PolishSettings, PolishSummary, polish_images, polish_metadata
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.models.polisher import load_polisher
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.runtime import resolve_device


def _shard(shard: str | None) -> tuple[int, int]:
    """This process's shard: --shard I/N combined with torchrun's RANK / WORLD_SIZE."""
    index, count = parse_shard(shard) if shard else (0, 1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return index * world + rank, count * world


def _print_summary(console: Console, summary: PolishSummary, dest: Path) -> None:
    table = Table(title=f"dpl polish -> {dest}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("images in this shard", summary.total_images),
        ("already written earlier", summary.already_done),
        ("processed now", summary.processed),
        ("skipped (unreadable, whole output)", len(summary.skipped)),
        ("teacher boxes kept", summary.boxes),
        ("classification labels (use_cls)", summary.use_cls),
        ("labels changed by the polisher", summary.label_changed),
        ("images/s", f"{summary.images_per_s:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    for name, reason in summary.skipped[:10]:
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    if len(summary.skipped) > 10:
        console.print(f"... and {len(summary.skipped) - 10} more (status='skipped' rows)")
    if not summary.wrote:
        console.print("nothing to do: every image is already in the output")


def _export(console: Console, out: Path, coco_out, coco_view: str, yolo_out) -> None:
    if not (coco_out or yolo_out):
        return
    table, meta = read_pseudo_labels(out)
    if coco_out:
        n = write_coco(table, meta, coco_out, coco_view)
        console.print(f"COCO JSON ({coco_view} view, {n} boxes) written to {coco_out}")
    if yolo_out:
        n = write_yolo(table, meta, yolo_out, coco_view)
        console.print(f"YOLO labels ({coco_view} view, {n} boxes) written to {yolo_out}")


def command(
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Unlabeled images: a folder (recursive) or a COCO JSON."),
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
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root",
            help="Folder the file names of a COCO JSON --images are relative to "
            "(default: the JSON's folder).",
        ),
    ] = None,
    score_thresh: Annotated[
        float, typer.Option("--score-thresh", help="Teacher test-time score threshold.")
    ] = 0.001,
    nms_thresh: Annotated[
        float, typer.Option("--nms-thresh", help="Teacher test-time NMS IoU threshold.")
    ] = 0.5,
    max_dets: Annotated[
        int, typer.Option("--max-dets", help="Teacher detections kept per image.")
    ] = 100,
    initial_threshold: Annotated[
        float,
        typer.Option(
            "--initial-threshold", help="Teacher boxes with this score or more are polished."
        ),
    ] = 0.5,
    cls_prob: Annotated[
        float,
        typer.Option(
            "--cls-prob", help="Classification polisher probability that keeps/relabels a box."
        ),
    ] = 0.9,
    teacher_score: Annotated[
        float,
        typer.Option("--teacher-score", help="Teacher score above which a box is kept as it is."),
    ] = 0.9,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images per batch (default 16 on GPU, 2 on CPU)."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="DataLoader worker processes decoding images.")
    ] = 2,
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
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")
    ] = True,
) -> None:
    console = Console()
    if coco_view not in VIEWS:
        raise DplError(f"--coco-view {coco_view!r}: choose from {', '.join(VIEWS)}")
    out = resolve_output(out, run_dir, "labels")
    if export_only:
        if not (coco_out or yolo_out):
            raise DplError("--export-only needs --coco-out and/or --yolo-out")
        _export(console, out, coco_out, coco_view, yolo_out)
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
    dev = resolve_device(device)
    records = shard_records(load_image_list(images, image_root), shard_index, shard_count)
    model, spec = load_detector(teacher_path, dev)
    teacher_sha = sha256_file(teacher_path)
    refiner = load_polisher(polisher_path, teacher_sha=teacher_sha, device=dev)
    settings = PolishSettings(
        score_thresh, nms_thresh, max_dets, initial_threshold, cls_prob, teacher_score
    )
    dest = output_file(out, shard_index, shard_count)
    meta = polish_metadata(spec.categories, settings, teacher_sha, sha256_file(polisher_path))
    writer = PseudoLabelWriter(dest, meta, overwrite=overwrite)
    summary = polish_images(
        model,
        spec.label_to_cat,
        refiner,
        records,
        writer,
        settings,
        batch_size or (16 if dev.type == "cuda" else 2),
        dev,
        workers,
        strict,
        show_progress=progress,
        console=console,
    )
    _print_summary(console, summary, dest)
    _export(console, dest, coco_out, coco_view, yolo_out)
