"""Render one image with its pseudo labels to a PNG: teacher boxes dashed orange, polished
boxes solid cyan (grey when not kept for classification), class names and scores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from commands.options import within
from dpl_tools.data.pseudo_labels import read_pseudo_labels
from dpl_tools.defaults import NON_NEGATIVE
from dpl_tools.io import atomic_path
from dpl_tools.outputs import check_distinct_outputs
from dpl_tools.report.draw import render_image, rows_for_image
from dpl_tools.report.summary import category_names


def command(
    image: Annotated[Path, typer.Argument(help="Image file to render (as listed in the labels).")],
    labels: Annotated[
        Path, typer.Option("--labels", help="Pseudo-label Parquet file (or part-file folder).")
    ],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("image.png"),
    size: Annotated[
        int,
        typer.Option(
            "--size",
            help="Long side of the output in pixels (0: the image's own).",
            callback=within(NON_NEGATIVE),
        ),
    ] = 0,
) -> None:
    check_distinct_outputs({"IMAGE": image, "--labels": labels}, {"--out": out})
    table, meta = read_pseudo_labels(labels)
    rows = [r for r in rows_for_image(table, image) if r["teacher_x1"] is not None]
    rendered = render_image(image, rows, category_names(meta), size)
    with atomic_path(out, suffix=".png") as tmp:
        rendered.save(tmp, format="PNG")
    Console().print(f"{len(rows)} box(es) of {image} drawn to {out}")
