"""Convert Pascal VOC XML, YOLO txt, Label Studio JSON or CVAT XML annotations to one
validated COCO JSON.

VOC: SRC is a VOC root (Annotations/, JPEGImages/, ImageSets/Main/) or a
folder of XML files; boxes follow the VOC 1-based inclusive convention
(x = xmin - 1, w = xmax - xmin + 1). YOLO: SRC holds images/ and labels/
(optionally per split) or txt files beside the images; class names come
from data.yaml or classes.txt. Label Studio (a JSON export of tasks) and
CVAT (CVAT for images 1.1 XML): reviewed labels, e.g. of `dpl export
--format label-studio / cvat`; give --classes with the labeled set's class
names in order so the ids match it. COCO: validated pass-through.

Every problem found is repaired or dropped and counted. A bad annotation
file (malformed XML, a bad YOLO label file) skips its image and is listed in
a table at the end (--strict: stop at the first). Nothing is written when no
image, or none of the input's boxes, is left. File names in the output are
relative to the images folder printed at the end: pass it to later commands
as --images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dpl_tools import api
from dpl_tools.cli.options import AllowOutsideRoot
from dpl_tools.data.coco import CocoData
from dpl_tools.data.convert import FORMATS
from dpl_tools.tables import ReportTable, print_skipped_files


def print_summary(console: Console, coco: CocoData, title: str) -> None:
    """Images, boxes and classes of a set, with boxes per class."""
    per_class: dict[int, int] = {c["id"]: 0 for c in coco.categories}
    for a in coco.annotations:
        per_class[a["category_id"]] += 1
    table = ReportTable(title=title, title_justify="left")
    table.add_column("class", min_width=12)
    table.add_column("boxes", justify="right")
    for c in coco.categories:
        table.add_row(str(c["name"]), str(per_class[c["id"]]))
    console.print(table)
    console.print(
        f"{len(coco.images)} images, {len(coco.annotations)} boxes, {len(coco.categories)} classes"
    )


def command(
    src: Annotated[
        Path,
        typer.Argument(
            help="VOC root / XML folder, YOLO dataset folder, Label Studio JSON, CVAT XML, or "
            "COCO JSON."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="COCO JSON file to write.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help=f"Input format: {', '.join(FORMATS)}.")
    ] = "voc",
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="VOC: ImageSets/Main/<split>.txt; YOLO: images/<split>/ (or <split>/images/).",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Comma-separated class names fixing category order (VOC default: sorted "
            "names found; YOLO default: data.yaml / classes.txt; Label Studio / CVAT "
            "default: order of first appearance, so give the labeled set's names to keep "
            "its ids).",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Images folder (VOC: overrides JPEGImages/; COCO: check that files exist).",
        ),
    ] = None,
    skip_difficult: Annotated[
        bool,
        typer.Option(
            "--skip-difficult",
            help="VOC: drop objects marked difficult (default: keep them, tagged difficult=1).",
        ),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Stop at the first bad annotation file (default: skip it, list it at the end).",
        ),
    ] = False,
    allow_outside_root: AllowOutsideRoot = False,
) -> None:
    console = Console()
    fmt = fmt.lower()
    names = [n.strip() for n in classes.split(",") if n.strip()] if classes is not None else None
    if names is None and fmt in ("label-studio", "cvat"):
        console.print(
            f"[yellow]warning:[/] no --classes: category ids follow the order the classes "
            f"first appear in {escape(str(src))}, which may not be the labeled set's; give "
            "--classes NAME,NAME,... in the labeled set's order to merge the two",
            highlight=False,
        )
    result = api.convert(
        src, out, fmt, split=split, classes=names, images=images,
        skip_difficult=skip_difficult, strict=strict, allow_outside_root=allow_outside_root,
        console=console,
    )  # fmt: skip
    print_summary(console, result.coco, "converted")
    console.print(f"wrote {out}")
    if result.images_dir is not None:
        console.print(f"images folder (pass as --images): {result.images_dir}")
    elif fmt != "coco":
        console.print("[yellow]no images folder found: image files were not checked[/]")
    print_skipped_files(console, result.skipped_files)
