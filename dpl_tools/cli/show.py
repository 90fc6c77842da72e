"""Render one image with its pseudo labels to a PNG: teacher boxes dashed orange, polished
boxes solid cyan (grey when not kept for classification), class names and scores.

With --augment: a grid of training samples as the teacher or the student sees them (its
augmentation from --config, and with --labels the student's pseudo-labeled images)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pyarrow as pa
import typer
from rich.console import Console

from dpl_tools.cli.options import Config, Seed, SetValues, set_overrides, within
from dpl_tools.config import load_config
from dpl_tools.data.pseudo_labels import drop_unusable_rows, dropped_warning, read_pseudo_labels
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path
from dpl_tools.outputs import check_distinct_outputs
from dpl_tools.report.draw import render_image, rows_for_image
from dpl_tools.report.summary import category_names
from dpl_tools.settings import AT_LEAST_1, NON_NEGATIVE

ImageOption = Annotated[
    Path | None,
    typer.Argument(help="Image file to render (as listed in the labels); not with --augment."),
]
LabelsOption = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        help="Pseudo-label Parquet file (or part-file folder); with --augment, the "
        "student's pseudo-labeled images are drawn too.",
    ),
]
OutOption = Annotated[Path, typer.Option("--out", help="PNG file to write.")]
SizeOption = Annotated[
    int,
    typer.Option(
        "--size",
        help="Long side of the output in pixels (0: the image's own); with --augment, of "
        "each sample (default 320).",
        callback=within(NON_NEGATIVE),
    ),
]
AugmentOption = Annotated[
    bool,
    typer.Option(
        "--augment",
        help="Draw a grid of training samples as the detector sees them (the --section's "
        "augmentation from --config) instead of one image's pseudo labels: classification "
        "boxes green, regression pseudo labels cyan, ignore regions grey dashed.",
    ),
]
AnnOption = Annotated[Path | None, typer.Option("--ann", help="--augment: labeled COCO JSON.")]
ImagesOption = Annotated[
    Path | None,
    typer.Option("--images", help="--augment: folder the file names in --ann are relative to."),
]
UnlabeledImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--unlabeled-images",
        help="--augment: folder of the pseudo-labeled images (default: --images).",
    ),
]
SectionOption = Annotated[
    str,
    typer.Option("--section", help="--augment: whose training to show, teacher or student."),
]
CountOption = Annotated[
    int,
    typer.Option("--count", help="--augment: samples to draw (>= 1).", callback=within(AT_LEAST_1)),
]


def command(
    image: ImageOption = None,
    labels: LabelsOption = None,
    out: OutOption = Path("image.png"),
    size: SizeOption = 0,
    augment: AugmentOption = False,
    ann: AnnOption = None,
    images: ImagesOption = None,
    unlabeled_images: UnlabeledImagesOption = None,
    section: SectionOption = "student",
    config: Config = None,
    count: CountOption = 8,
    seed: Seed = 0,
    set_values: SetValues = None,
) -> None:
    if augment:
        if ann is None or images is None:
            raise DplError("--augment needs --ann and --images (the training images to draw)")
        if section not in ("teacher", "student"):
            raise DplError(f"--section must be teacher or student, got {section!r}")
        check_distinct_outputs(
            {"--ann": ann, "--images": images, "--labels": labels,
             "--unlabeled-images": unlabeled_images},
            {"--out": out},
        )  # fmt: skip
        from dpl_tools.report.augment_preview import (  # torch: only when drawing
            CELL,
            draw_sample,
            sample_grid,
            training_samples,
        )

        cfg = load_config(config, None, set_overrides(set_values))
        samples, names = training_samples(
            ann, images, cfg, section, count, seed, labels, unlabeled_images
        )
        if not samples:
            raise DplError(f"{ann}: no readable training image to draw")
        grid = sample_grid([draw_sample(i, t, names, size or CELL) for i, t in samples])
        with atomic_path(out, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
        kind = cfg[section]["augment"]
        if cfg[section]["train_crop"]:
            kind += f", {cfg[section]['train_crop']} px training windows"
        Console().print(f"{len(samples)} {section} training sample(s) ({kind}) drawn to {out}")
        return
    if image is None or labels is None:
        raise DplError("give an IMAGE and --labels, or --augment with --ann and --images")
    check_distinct_outputs({"IMAGE": image, "--labels": labels}, {"--out": out})
    table, meta = read_pseudo_labels(labels)
    mine = pa.Table.from_pylist(rows_for_image(table, image), schema=table.schema)
    mine, dropped = drop_unusable_rows(mine)
    if dropped:
        warning = f"[yellow]warning:[/] {dropped_warning(labels, dropped)} for {image}"
        Console().print(warning, highlight=False, soft_wrap=True)
    rows = [r for r in mine.to_pylist() if r["teacher_x1"] is not None]
    rendered = render_image(image, rows, category_names(meta), size)
    with atomic_path(out, suffix=".png") as tmp:
        rendered.save(tmp, format="PNG")
    Console().print(f"{len(rows)} box(es) of {image} drawn to {out}")
