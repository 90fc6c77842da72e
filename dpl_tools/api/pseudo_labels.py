"""Polish the teacher's pseudo labels from Python (``dpl polish``): detect on the unlabeled
images, polish the boxes and classes, apply the keep rule, write the Parquet labels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.api.config import ConfigLike, stage_config
from dpl_tools.data.detections import TEACHER_BOXES, ExternalDetections, load_detections
from dpl_tools.data.export import VIEWS, check_yolo_out, view_boxes, write_coco, write_yolo
from dpl_tools.data.image_list import load_image_list, parse_shard, shard_records
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, output_file
from dpl_tools.data.pseudo_labels import META_BOXES, dropped_warning, read_pseudo_labels
from dpl_tools.engine.polish_job import PolishSummary, kept_warning, polish_images, polish_metadata
from dpl_tools.engine.polish_settings import applied_polisher
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.models.polisher import load_polisher
from dpl_tools.outputs import check_distinct_outputs, check_outputs_not_read, output_lock
from dpl_tools.runtime import resolve_device
from dpl_tools.tables import ReportTable


@dataclass
class Polished:
    """A polish run: the Parquet file written, its counts, the keep rule used (thresholds
    and their sources) and the regression steps."""

    labels: Path
    summary: PolishSummary
    keep_rule: dict[str, Any]
    reg_steps: int


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
    console: Console,
    out: Path,
    coco_out,
    coco_view: str,
    yolo_out,
    overwrite: bool,
    save_conf: bool = False,
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
        n = write_yolo(table, meta, yolo_out, coco_view, overwrite, source=out, save_conf=save_conf)
        console.print(f"YOLO labels ({coco_view} view, {n} boxes) written to {yolo_out}")


def export_labels(
    labels: str | Path,
    coco_out: str | Path | None = None,
    yolo_out: str | Path | None = None,
    view: str = "polished",
    overwrite: bool = False,
    console: Console | None = None,
    save_conf: bool = False,
) -> None:
    """Export existing pseudo labels (a file or a part-file folder) as COCO JSON and / or
    YOLO txt (``dpl polish --export-only``): ``view`` picks which boxes and classes."""
    console = console or Console()
    if view not in VIEWS:
        raise DplError(f"--coco-view {view!r}: choose from {', '.join(VIEWS)}")
    if not (coco_out or yolo_out):
        raise DplError("--export-only needs --coco-out and/or --yolo-out")
    exports = {"--coco-out": coco_out, "--yolo-out": yolo_out}
    check_distinct_outputs({"--out": labels}, exports, folders={"--yolo-out"})
    if yolo_out:
        check_yolo_out(yolo_out, overwrite)
    _export(console, Path(labels), coco_out, view, yolo_out, overwrite, save_conf)


def _checked_outputs(
    inputs: dict[str, Any],
    out: Path,
    shard_index: int,
    shard_count: int,
    coco_out: str | Path | None,
    yolo_out: str | Path | None,
    overwrite: bool,
) -> Path:
    """The Parquet file this polish writes (``out``, or this shard's part file in the
    folder ``out``), once every output is known to be distinct from every input."""
    if shard_count > 1 and (coco_out or yolo_out):
        raise DplError(
            "--coco-out/--yolo-out need every shard's labels: after all shards finish, run "
            "`dpl polish --out DIR --export-only --coco-out ...`"
        )
    check_distinct_outputs(
        inputs, {"--out": out, "--coco-out": coco_out, "--yolo-out": yolo_out},
        folders={"--out", "--yolo-out"},
    )  # fmt: skip
    dest = output_file(out, shard_index, shard_count)
    if dest != out:  # --out is a folder of part files: this shard's file too
        check_distinct_outputs({}, {"--out": dest, "--coco-out": coco_out})
    if yolo_out:
        check_yolo_out(yolo_out, overwrite)
    return dest


def polish(
    images: str | Path,
    out: str | Path = "runs/labels.parquet",
    teacher: str | Path = "runs/teacher.pt",
    polisher: str | Path = "runs/polisher.pt",
    config: ConfigLike = None,
    *,
    image_root: str | Path | None = None,
    device: str = "auto",
    shard: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    coco_out: str | Path | None = None,
    coco_view: str = "polished",
    yolo_out: str | Path | None = None,
    save_conf: bool = False,
    detections: str | Path | None = None,
    detection_classes: str | Path | None = None,
    category_map: str | Path | None = None,
    progress: bool = True,
    allow_outside_root: bool = False,
    console: Console | None = None,
    flags: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> Polished:
    """Polish the teacher's pseudo labels on ``images`` (a folder or a COCO image list) and
    write them to ``out`` (``dpl polish``; resumable); overrides are ``polish`` keys."""
    console = console or Console()
    pcfg = stage_config(config, "polish", overrides, flags)["polish"]
    if coco_view not in VIEWS:
        raise DplError(f"--coco-view {coco_view!r}: choose from {', '.join(VIEWS)}")
    out, teacher_path, polisher_path = Path(out), Path(teacher), Path(polisher)
    shard_index, shard_count = _shard(shard)
    inputs = {"--images": images, "--image-root": image_root, "--teacher": teacher_path,
              "--polisher": polisher_path, "--detections": detections,
              "--detection-classes": detection_classes, "--category-map": category_map}  # fmt: skip
    dest = _checked_outputs(inputs, out, shard_index, shard_count, coco_out, yolo_out, overwrite)
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
        applied = applied_polisher(pcfg, refiner, polisher_path)
        applied.announce(console)
        settings, keep, steps = applied.settings, applied.keep, applied.settings.reg_steps
        meta = polish_metadata(
            spec.categories, settings, teacher_sha, sha256_file(polisher_path),
            keep_sources={**keep.metadata(), "reg_steps_source": applied.reg_steps_source},
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
        _export(console, dest, coco_out, coco_view, yolo_out, overwrite, save_conf)
    rule = {"cls_prob": keep.cls_prob, "teacher_score": keep.teacher_score, **keep.metadata()}
    return Polished(dest, summary, rule, steps)


@dataclass
class PseudoQuality:
    """Pseudo-label quality of a polish output against the truth (``dpl evaluate
    --pseudo``): ``figures`` has the teacher vs polished view, box IoU before/after
    polishing, the keep rule and per-class figures (``pseudo_label_quality``)."""

    labels: Path
    figures: dict[str, Any]
    written: list[Path]


def evaluate_pseudo(
    pseudo: str | Path, ann: str | Path, *, json_out: str | Path | None = None
) -> PseudoQuality:
    """Score the pseudo labels ``pseudo`` (file or part directory) against the COCO truth
    ``ann``; ``figures["thresholds"]`` are those polish used, with their sources."""
    from dpl_tools.data.coco import load_coco
    from dpl_tools.data.pseudo_labels import META_THRESHOLDS
    from dpl_tools.evaluation.pseudo_quality import scored_against_truth
    from dpl_tools.io import write_json

    check_distinct_outputs({"--ann": ann, "--pseudo": pseudo}, {"--json": json_out})
    table, meta = read_pseudo_labels(pseudo)
    figures = scored_against_truth(table, meta, load_coco(ann), pseudo)
    figures["thresholds"] = meta.get(META_THRESHOLDS)
    written = []
    if json_out:
        write_json(json_out, figures, indent=2)
        written.append(Path(json_out))
    return PseudoQuality(Path(pseudo), figures, written)
