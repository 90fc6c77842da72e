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

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import (
    AllowOutsideRoot,
    CategoryMap,
    DetectionClasses,
    Device,
    RunDir,
)
from dpl_tools.cli.setting_flags import Flags, with_setting_flags
from dpl_tools.errors import DplError
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output

# The polish settings with a flag of their own, and the flags named other than their key.
POLISH_FLAGS = (
    "score_thresh", "nms_thresh", "detections_per_img", "initial_thresh", "cls_prob",
    "teacher_score", "keep_rule", "batch_size", "workers", "reg_steps", "tta",
)  # fmt: skip
POLISH_FLAG_NAMES = {"detections_per_img": "--max-dets", "initial_thresh": "--initial-threshold"}


ImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="Unlabeled images: a folder (recursive; linked folders leading outside it "
        "are skipped with a warning unless --allow-outside-root) or a COCO JSON. No "
        "output may lie inside it.",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Output .parquet file, or a directory of part files (sharded runs); "
        "default <run-dir>/labels.parquet.",
    ),
]
TeacherOption = Annotated[
    Path | None,
    typer.Option("--teacher", help="Teacher checkpoint (default <run-dir>/teacher.pt)."),
]
PolisherOption = Annotated[
    Path | None,
    typer.Option("--polisher", help="Polisher checkpoint (default <run-dir>/polisher.pt)."),
]
ImageRootOption = Annotated[
    Path | None,
    typer.Option(
        "--image-root",
        help="Folder the file names of a COCO JSON --images are relative to "
        "(default: the JSON's folder).",
    ),
]
ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="Preset name or YAML path whose polish section sets the thresholds below "
        "(score_thresh, nms_thresh, detections_per_img, initial_thresh, cls_prob, "
        "teacher_score, batch_size, workers, reg_steps, tta); flags override it.",
    ),
]
ShardOption = Annotated[
    str | None,
    typer.Option("--shard", help="Process shard I of N (0-based, e.g. 0/4); --out is a directory."),
]
StrictOption = Annotated[
    bool, typer.Option("--strict", help="Stop with an error at the first unreadable image.")
]
OverwriteOption = Annotated[
    bool,
    typer.Option("--overwrite", help="Start again instead of resuming or reusing the output."),
]
CocoOutOption = Annotated[
    Path | None, typer.Option("--coco-out", help="Also write the labels as COCO JSON here.")
]
CocoViewOption = Annotated[
    str,
    typer.Option(
        "--coco-view",
        help="Labels exported by --coco-out/--yolo-out: polished (use_cls rows, polished "
        "box + label), cls (teacher box, polished label), reg (use_reg rows, polished box, "
        "teacher label), teacher (all kept teacher boxes).",
    ),
]
YoloOutOption = Annotated[
    Path | None,
    typer.Option("--yolo-out", help="Also write YOLO txt labels (+ classes.txt) into this folder."),
]
SaveConfOption = Annotated[
    bool,
    typer.Option(
        "--save-conf",
        help="--yolo-out: end each label line with the box's teacher score "
        "(class cx cy w h conf, ultralytics' save_conf convention).",
    ),
]
ExportOnlyOption = Annotated[
    bool,
    typer.Option(
        "--export-only",
        help="Run no model: export an existing --out (file or part directory) to "
        "--coco-out/--yolo-out, e.g. after all shards finished.",
    ),
]
DetectionsOption = Annotated[
    Path | None,
    typer.Option(
        "--detections",
        help="Polish another labeler's boxes instead of the teacher's: a COCO results "
        "JSON (image_id or file_name, category_id, bbox, score) or a folder of YOLO txt "
        "files with a confidence column (class cx cy w h conf). The teacher still "
        "supplies the features; --initial-threshold applies to the labeler's scores.",
    ),
]
ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")
]


@with_setting_flags({"polish": POLISH_FLAGS}, POLISH_FLAG_NAMES)
def command(
    images: ImagesOption = None,
    out: OutOption = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    teacher: TeacherOption = None,
    polisher: PolisherOption = None,
    allow_outside_root: AllowOutsideRoot = False,
    image_root: ImageRootOption = None,
    config: ConfigOption = None,
    device: Device = "auto",
    shard: ShardOption = None,
    strict: StrictOption = False,
    overwrite: OverwriteOption = False,
    coco_out: CocoOutOption = None,
    coco_view: CocoViewOption = "polished",
    yolo_out: YoloOutOption = None,
    save_conf: SaveConfOption = False,
    export_only: ExportOnlyOption = False,
    detections: DetectionsOption = None,
    detection_classes: DetectionClasses = None,
    category_map: CategoryMap = None,
    progress: ProgressOption = True,
    flags: Flags | None = None,
) -> None:
    console = Console()
    flags = dict(flags or {})
    api.stage_config(config, "polish", flags=flags)  # a bad --config fails first
    out = resolve_output(out, run_dir, "labels")
    if save_conf and yolo_out is None:
        raise DplError("--save-conf applies to --yolo-out labels; give --yolo-out")
    if export_only:
        polishing = {"--images": images, "--teacher": teacher, "--polisher": polisher,
                     "--image-root": image_root, "--config": config, "--shard": shard,
                     "--detections": detections, "--detection-classes": detection_classes,
                     "--category-map": category_map}  # fmt: skip
        unused = [name for name, value in polishing.items() if value is not None]
        unused += [POLISH_FLAG_NAMES.get(k, f"--{k.replace('_', '-')}")
                   for k, v in flags.get("polish", {}).items() if v is not None]  # fmt: skip
        if unused:
            raise DplError(
                f"--export-only writes the labels of --out as they are; {', '.join(unused)} "
                "apply to polishing only (run dpl polish without --export-only to use them)"
            )
        api.export_labels(out, coco_out, yolo_out, coco_view, overwrite, console, save_conf)
        return
    if images is None:
        raise DplError("--images is required (a folder or a COCO JSON image list)")
    api.polish(
        images, out, resolve_input(teacher, run_dir, "teacher"),
        resolve_input(polisher, run_dir, "polisher"), config, image_root=image_root,
        device=device, shard=shard, strict=strict, overwrite=overwrite, coco_out=coco_out,
        coco_view=coco_view, yolo_out=yolo_out, save_conf=save_conf, detections=detections,
        detection_classes=detection_classes, category_map=category_map, progress=progress,
        allow_outside_root=allow_outside_root, console=console, flags=flags,
    )  # fmt: skip
