"""The standard SSOD data protocol: P% of a labeled set kept labeled, the rest unlabeled.

The labeled images are drawn reproducibly from ``(seed, fold)``: the same arguments
always pick the same images, different folds pick different ones. Three COCO files
come out: ``labeled`` (images + their boxes), ``unlabeled`` (images only, empty
``annotations``) and ``unlabeled_gt`` (the unlabeled images with their true boxes, kept
apart to evaluate pseudo labels later).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpl_tools.data.coco import CocoData, save_coco
from dpl_tools.errors import DplError
from dpl_tools.outputs import file_set


@dataclass
class Split:
    """The three COCO dicts of one split, and how it was drawn."""

    labeled: dict[str, Any]
    unlabeled: dict[str, Any]
    unlabeled_gt: dict[str, Any]
    info: dict[str, Any]


def labeled_count_for(num_images: int, percent: float) -> int:
    """Number of labeled images for ``percent`` of ``num_images``: rounded half up, >= 1."""
    if not 0 < percent <= 100:
        raise DplError(f"--percent must be in (0, 100], got {percent}")
    return min(num_images, max(1, int(num_images * percent / 100 + 0.5)))


def choose_labeled(image_ids: list[int], count: int, fold: int, seed: int) -> list[int]:
    """``count`` image ids drawn reproducibly from (seed, fold), in their original order."""
    rng = np.random.default_rng([seed, fold])
    picked = set(rng.permutation(len(image_ids))[:count].tolist())
    return [image_id for i, image_id in enumerate(image_ids) if i in picked]


def split_coco(
    coco: CocoData,
    percent: float | None = None,
    labeled_count: int | None = None,
    fold: int = 1,
    seed: int = 0,
) -> Split:
    """Split ``coco`` into labeled / unlabeled / unlabeled_gt sets (give percent or count)."""
    n = len(coco.images)
    if n == 0:
        raise DplError(f"{coco.path}: no images to split")
    if labeled_count is not None:
        if not 1 <= labeled_count <= n:
            raise DplError(f"--labeled-count must be in 1..{n} (images in {coco.path})")
        count = labeled_count
    else:
        count = labeled_count_for(n, 10.0 if percent is None else percent)
    ids = [im["id"] for im in coco.images]
    labeled_ids = set(choose_labeled(ids, count, fold, seed))
    info = {
        "source": str(coco.path),
        "percent": percent if labeled_count is None else None,
        "labeled_images": count,
        "unlabeled_images": n - count,
        "fold": fold,
        "seed": seed,
    }

    def part(name: str, labeled: bool, with_boxes: bool) -> dict[str, Any]:
        images = [im for im in coco.images if (im["id"] in labeled_ids) == labeled]
        keep = {im["id"] for im in images}
        anns = [a for a in coco.annotations if a["image_id"] in keep] if with_boxes else []
        return {
            **coco.extra,
            "dpl_split": {**info, "part": name},
            "images": images,
            "annotations": anns,
            "categories": coco.categories,
        }

    return Split(
        labeled=part("labeled", True, True),
        unlabeled=part("unlabeled", False, False),
        unlabeled_gt=part("unlabeled_gt", False, True),
        info=info,
    )


PARTS = ("labeled", "unlabeled", "unlabeled_gt")


def split_paths(out_dir: str | Path) -> dict[str, Path]:
    """The files ``write_split`` writes into ``out_dir``, by part name."""
    return {name: Path(out_dir) / f"{name}.json" for name in PARTS}


def is_split_file(path: Path) -> bool:
    """Whether ``path`` is a file ``dpl split`` wrote (a COCO JSON with its ``dpl_split``
    record), i.e. one a new split may replace."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("dpl_split"), dict)


def write_split(split: Split, out_dir: str | Path) -> dict[str, Path]:
    """Write labeled.json, unlabeled.json, unlabeled_gt.json into ``out_dir`` as one set
    (``dpl_tools.outputs.file_set``): a killed split never leaves files of two seeds, and
    only an earlier split's files are replaced."""
    paths = split_paths(out_dir)
    names = [p.name for p in paths.values()]
    with file_set(out_dir, names, "dpl split", is_split_file) as staged:
        for name, path in paths.items():
            save_coco(getattr(split, name), staged[path.name])
    return paths
