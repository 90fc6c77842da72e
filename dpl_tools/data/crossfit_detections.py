"""``crossfit.parquet``: the out-of-fold detections of cross-fitting (write and read).

Cross-fitting (``dpl_tools.engine.crossfit``) splits the labeled images into K folds and
runs, on each fold, a fold teacher trained on the other K-1 folds. Every detection of a
fold teacher on its held-out fold with score >= ``min_score`` is one row:

=========  ======  ==========================================================
column     type    meaning
=========  ======  ==========================================================
image_id   int64   COCO image id (of the labeled set)
file_name  string  its ``file_name`` in the labeled COCO JSON
fold       int32   fold index 0..K-1 of the image (= of the teacher that ran)
x1 y1      float32 detection box, xyxy, original image pixels
x2 y2
score      float32 fold teacher score
label      int32   COCO category id (not the contiguous label)
=========  ======  ==========================================================

A held-out image with no detection has one row whose box, score and label are null, so
that its objects still count as missed. File metadata (JSON under key ``dpl_crossfit``):
``folds`` (K), ``iterations`` (per fold teacher), ``teacher_iterations``,
``teacher_config_sha256`` (hash of the fold teachers' ``model`` + ``teacher`` config),
``seed``, ``min_score``, ``test_settings`` (score / NMS / detections per image),
``fold_images`` (K lists of image ids), ``categories``, ``source`` (the labeled COCO
JSON), ``fold_seconds``. No test image is ever in it: the folds partition exactly the
images of the labeled JSON. These detections are honest (no teacher saw the image it
detected on): the real polisher pairs (``detections_by_image``) and the keep-threshold
fit (``read_crossfit_detections``, ``dpl_tools.engine.keep_thresholds``) read them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpl_tools.data.detections import ExternalDetections
from dpl_tools.data.parquet_files import open_dpl_parquet
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path

CROSSFIT_FILE = "crossfit.parquet"
# A labeler's own detections of the labeled images (train-polisher --detections), in the
# same schema with fold -1 (its folds, if it had any, are not known to dpl).
LABELER_FILE = "labeler_detections.parquet"
LABELER_FOLD = -1
CROSSFIT_META_KEY = b"dpl_crossfit"
_BOX = BOX_COORDS
COLUMNS = ("image_id", "file_name", "fold", *_BOX, "score", "label")
CROSSFIT_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("fold", pa.int32()),
        *((c, pa.float32()) for c in _BOX),
        ("score", pa.float32()),
        ("label", pa.int32()),
    ]
)


def crossfit_path(noise_path: str | Path) -> Path:
    """Where cross-fitting writes its detections: beside the noise file."""
    return Path(noise_path).parent / CROSSFIT_FILE


def labeler_path(noise_path: str | Path) -> Path:
    """Where ``--detections`` writes the labeler's detections: beside the noise file."""
    return Path(noise_path).parent / LABELER_FILE


def detections_table(
    image_ids: np.ndarray,
    file_names: list[str],
    folds: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
) -> pa.Table:
    """Rows in ``CROSSFIT_SCHEMA`` from per-detection arrays (boxes ``(N, 4)`` xyxy; a NaN
    score marks an image without detections: its box, score and label are written null)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32)
    empty = np.isnan(scores)
    cats = np.asarray(category_ids, np.float64)
    return pa.table(
        {
            "image_id": np.asarray(image_ids, np.int64),
            "file_name": pa.array(file_names, pa.string()),
            "fold": np.asarray(folds, np.int32),
            **{c: pa.array(boxes[:, i], mask=empty) for i, c in enumerate(_BOX)},
            "score": pa.array(scores, mask=empty),
            "label": pa.array(np.nan_to_num(cats).astype(np.int32), mask=empty),
        },
        schema=CROSSFIT_SCHEMA,
    )


def labeler_table(given: ExternalDetections, records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """A labeler's detections of the labeled images ``records`` in ``CROSSFIT_SCHEMA``
    (fold ``LABELER_FOLD``; an image it found nothing on gets the one empty row, so that its
    objects count as missed), so that the real pairs, the empirical noise and the
    keep-threshold fit read them exactly as they read cross-fitted detections."""
    ids, names, boxes, scores, cats = [], [], [], [], []
    for record in records:
        b, s, c = given.for_image(record["file_name"]).pixel_boxes(
            int(record["width"]), int(record["height"])
        )
        if not len(s):
            b, s, c = np.full((1, 4), np.nan), np.array([np.nan]), np.array([np.nan])
        ids += [int(record["id"])] * len(s)
        names += [record["file_name"]] * len(s)
        boxes.append(np.asarray(b).reshape(-1, 4))
        scores.append(np.asarray(s, np.float64))
        cats.append(np.asarray(c, np.float64))
    if not ids:
        return CROSSFIT_SCHEMA.empty_table()
    return detections_table(
        np.asarray(ids), names, np.full(len(ids), LABELER_FOLD), np.concatenate(boxes),
        np.concatenate(scores), np.concatenate(cats),
    )  # fmt: skip


def write_crossfit(path: str | Path, table: pa.Table, meta: dict[str, Any]) -> Path:
    """Write the detections with their metadata, atomically."""
    schema = CROSSFIT_SCHEMA.with_metadata({CROSSFIT_META_KEY: json.dumps(meta).encode()})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table.cast(schema), tmp, compression="zstd")
    return Path(path)


def read_crossfit(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """``(rows, metadata)`` of a crossfit file, or a one-line DplError naming it."""
    _, meta = open_dpl_parquet(path, "crossfit file", CROSSFIT_SCHEMA.names, CROSSFIT_META_KEY,
                               "make one with --noise-model crossfit")  # fmt: skip
    table = pq.read_table(path, columns=CROSSFIT_SCHEMA.names)
    return table.cast(CROSSFIT_SCHEMA), meta


@dataclass
class ImageDetections:
    """One held-out image's detections: boxes xyxy (original pixels), float32 scores (the
    precision polishing compares in), COCO category ids, and the fold that held it out."""

    image_id: int
    file_name: str
    fold: int
    boxes: np.ndarray  # [N, 4] float32
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int64

    def at_least(self, score: float) -> ImageDetections:
        """The detections with score >= ``score`` (float32 comparison, as polishing's)."""
        keep = self.scores >= np.float32(score)
        return ImageDetections(
            self.image_id, self.file_name, self.fold, self.boxes[keep], self.scores[keep],
            self.labels[keep],
        )  # fmt: skip


def find_crossfit(candidates: Iterable[str | Path]) -> Path | None:
    """The first of ``candidates`` that is a file, or None."""
    for path in candidates:
        if Path(path).is_file():
            return Path(path)
    return None


def read_crossfit_detections(path: str | Path) -> dict[str, ImageDetections]:
    """Every held-out image of ``path``, keyed by file name; a DplError if the file is
    missing, not Parquet, lacks a column, or holds an image in two folds."""
    path = Path(path)
    open_dpl_parquet(path, "cross-fitted detections file", COLUMNS)
    table = pq.read_table(path, columns=list(COLUMNS))
    ids = table["image_id"].to_numpy(zero_copy_only=False)
    names = table["file_name"].to_pylist()
    folds = table["fold"].to_numpy(zero_copy_only=False)
    boxes = np.stack(
        [table[c].fill_null(np.nan).to_numpy(zero_copy_only=False) for c in _BOX], 1
    ).astype(np.float32) if len(table) else np.zeros((0, 4), np.float32)  # fmt: skip
    scores = table["score"].fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float32)
    labels = table["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    has_box = ~np.isnan(boxes).any(axis=1) & ~np.isnan(scores) & (labels >= 0)
    rows: dict[str, list[int]] = {}
    fold_of: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is None:
            raise DplError(f"{path}: row {i} has no file_name")
        fold = int(folds[i])
        if fold_of.setdefault(name, fold) != fold:
            raise DplError(
                f"{path}: {name} is held out by folds {fold_of[name]} and {fold}; "
                "each labeled image belongs to exactly one fold"
            )
        rows.setdefault(name, [])
        if has_box[i]:
            rows[name].append(i)
    first = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    out = {}
    for name, idx in rows.items():
        k = np.asarray(idx, dtype=np.int64)
        out[name] = ImageDetections(
            int(ids[first[name]]), name, fold_of[name], boxes[k].reshape(-1, 4), scores[k],
            labels[k],
        )  # fmt: skip
    return out


def detections_by_image(path: str | Path) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(image_id, boxes (N, 4), scores)`` per image of a crossfit file, in id order
    (N = 0 for an image without detections)."""
    for image in sorted(read_crossfit_detections(path).values(), key=lambda d: d.image_id):
        yield image.image_id, image.boxes, image.scores
