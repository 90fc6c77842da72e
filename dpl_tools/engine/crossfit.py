"""Cross-fitting: the teacher's real errors on labeled images it did not train on.

``--noise-model crossfit`` (``dpl synth-noise`` / ``dpl train-polisher``, config key
``polisher.noise_model``): the labeled images are split into ``polisher.crossfit_folds``
(K) folds, seeded and exact (every labeled image in exactly one fold; only the labeled
COCO JSON is read, so no test image can be in any). Fold teacher k is trained on the other
K-1 folds with the teacher's own recipe (the ``model`` / ``teacher`` config recorded in
the teacher checkpoint), ``iters`` and ``warmup_iters`` scaled by
``polisher.crossfit_iters_fraction`` (default (K-1)/K: ``fold_fraction``), through the
same training loop as the teacher (``train_teacher``); it is saved as
``<out dir>/crossfit/fold-k.pt`` and reused when rerun
with the same folds, recipe and seed (an interrupted fold resumes from its
``fold-k.last.pt``). Each fold teacher then runs on its held-out fold with the teacher's
test-time settings (the ``polish`` section: score 0.001, NMS 0.5, 100 detections), and
its detections with score >= ``polisher.empirical_cls_min_score`` are written to
``<out dir>/crossfit.parquet`` (schema: ``dpl_tools.data.crossfit_detections``).

Cost: K fold teachers of ``fraction * iters`` iterations each, i.e. ``K * fraction``
teacher trainings (2x with the defaults K = 3, fraction 2/3), plus one inference pass
over the labeled images.

``fit_empirical_noise`` fits the empirical noise model on a given held-out set instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rich.console import Console

from dpl_tools.config import plain
from dpl_tools.data.coco import CocoData, read_json
from dpl_tools.data.crossfit_detections import (
    crossfit_path,
    detections_by_image,
    detections_table,
    write_crossfit,
)
from dpl_tools.data.noise_models import EmpiricalNoise, empirical_from_matches
from dpl_tools.data.polisher_pairs import GroundTruth
from dpl_tools.engine.inference import predict_detections
from dpl_tools.engine.loop import last_checkpoint_path
from dpl_tools.errors import DplError
from dpl_tools.io import write_json
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.models.detector import set_test_settings
from dpl_tools.outputs import MARKER, check_owned_folder

CROSSFIT_DIR = "crossfit"


def crossfit_folds(image_ids: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Split ``image_ids`` into ``folds`` folds of near-equal size, seeded: every id in
    exactly one fold (each fold sorted)."""
    ids = sorted({int(i) for i in image_ids})
    if folds < 2:
        raise DplError(f"crossfit: needs at least 2 folds, got {folds}")
    if len(ids) < folds:
        raise DplError(f"crossfit: {len(ids)} labeled image(s), fewer than the {folds} folds")
    order = np.random.default_rng([seed, 7919]).permutation(len(ids))
    return [sorted(ids[j] for j in order[f::folds]) for f in range(folds)]


def fold_fraction(fraction: float | None, folds: int) -> float:
    """Fold teacher iterations / teacher iterations: ``fraction``, or by default (None)
    (K-1)/K, so that a fold teacher, trained on (K-1)/K of the labeled images, takes as
    many iterations per labeled image as the teacher: a fold teacher at half the
    iterations is much weaker than the teacher on a small labeled set, and its errors and
    scores would not be the teacher's."""
    return (folds - 1) / folds if fraction is None else float(fraction)


def fold_recipe(teacher_config: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The fold teachers' config: the teacher's ``model`` and ``teacher`` sections with
    ``iters`` and ``warmup_iters`` times ``fraction`` (so the schedule keeps its shape)."""
    recipe = {k: plain(teacher_config[k]) for k in ("model", "teacher")}
    t = recipe["teacher"]
    t["iters"] = max(1, round(int(t["iters"]) * fraction))
    t["warmup_iters"] = round(int(t.get("warmup_iters", 0)) * fraction)
    return recipe


def config_sha256(config: dict[str, Any]) -> str:
    """Content hash of a config (sorted JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def teacher_recipe(teacher_path: str | Path, current: dict[str, Any]) -> dict[str, Any]:
    """The config the teacher was trained with (recorded in its checkpoint), else
    ``current``'s ``model`` / ``teacher`` sections."""
    from dpl_tools.models.checkpoint import read_checkpoint, spec_from_dict

    spec = spec_from_dict(read_checkpoint(teacher_path)["spec"], teacher_path)
    recorded = spec.extra.get("config")
    if isinstance(recorded, dict) and all(isinstance(recorded.get(k), dict) for k in
                                          ("model", "teacher")):  # fmt: skip
        return {k: recorded[k] for k in ("model", "teacher")}
    return {k: plain(current[k]) for k in ("model", "teacher")}


def fold_subset(raw: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """The labeled COCO JSON restricted to ``image_ids`` (their images and annotations)."""
    out = {k: v for k, v in raw.items() if k not in ("images", "annotations")}
    out["images"] = [r for r in raw.get("images", []) if r.get("id") in image_ids]
    out["annotations"] = [a for a in raw.get("annotations", []) if a.get("image_id") in image_ids]
    return out


@dataclass
class CrossfitResult:
    """What cross-fitting did: its detections file, per fold the training seconds (0 when
    reused), which folds were reused, and the iteration counts."""

    path: Path
    folds: list[list[int]]
    fold_seconds: list[float]
    reused: list[int]
    fold_iters: int
    teacher_iters: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        """Fold teacher iterations over the teacher's: the training cost in teachers."""
        return len(self.folds) * self.fold_iters / max(self.teacher_iters, 1)


def _train_fold(
    k: int,
    train_ids: set[int],
    raw: dict[str, Any],
    folder: Path,
    recipe: dict[str, Any],
    fingerprint: dict[str, Any],
    images_dir: Path,
    device: str,
    seed: int,
    console: Console,
    allow_outside_root: bool,
) -> tuple[Path, float]:
    """Train fold teacher ``k`` on ``train_ids`` (or reuse it); its path and seconds."""
    from dpl_tools.engine.train_detector import train_teacher

    out, stamp, ann = (folder / f"fold-{k}{ext}" for ext in (".pt", ".stamp.json", ".json"))
    try:
        current = json.loads(stamp.read_text()) if stamp.is_file() else None
    except (OSError, json.JSONDecodeError):
        current = None
    if current == fingerprint and out.is_file():
        return out, 0.0
    if current != fingerprint:  # other folds, recipe or seed: nothing of it can be reused
        out.unlink(missing_ok=True)
        last_checkpoint_path(out).unlink(missing_ok=True)
        write_json(stamp, fingerprint, indent=1)
    write_json(ann, fold_subset(raw, train_ids))
    began = time.perf_counter()
    train_teacher(
        ann, images_dir, out, recipe, device, seed + 1 + k, resume=True,
        console=console, allow_outside_root=allow_outside_root,
    )  # fmt: skip
    return out, time.perf_counter() - began


def run_crossfit(
    teacher_path: str | Path,
    ann: str | Path,
    coco: CocoData,
    images_dir: str | Path,
    noise_out: str | Path,
    config: dict[str, Any],
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    console: Console | None = None,
    allow_outside_root: bool = False,
) -> CrossfitResult:
    """Train (or reuse) the K fold teachers under ``<noise_out dir>/crossfit/`` and write
    their out-of-fold detections to ``<noise_out dir>/crossfit.parquet``."""
    from dpl_tools.runtime import resolve_device

    console = console or Console()
    pcfg, polish = config["polisher"], config["polish"]
    k_folds = pcfg["crossfit_folds"]
    fraction = fold_fraction(pcfg["crossfit_iters_fraction"], k_folds)
    base = teacher_recipe(teacher_path, config)
    recipe = fold_recipe(base, fraction)
    folds = crossfit_folds([r["id"] for r in coco.images], k_folds, seed)
    folder = Path(noise_out).parent / CROSSFIT_DIR
    check_owned_folder(folder, "crossfit", "a dpl crossfit folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MARKER, {"kind": "crossfit", "command": "crossfit", "complete": True,
                                 "files": _owned_files(k_folds)}, indent=1)  # fmt: skip
    raw = read_json(ann)
    all_ids = {i for f in folds for i in f}
    recipe_sha = config_sha256(recipe)
    seconds, reused, paths = [], [], []
    for k, held_out in enumerate(folds):
        fingerprint = {"fold": k, "folds": folds, "config_sha256": recipe_sha, "seed": seed}
        console.print(
            f"crossfit fold {k + 1}/{k_folds}: fold teacher on {len(all_ids) - len(held_out)} "
            f"images, {recipe['teacher']['iters']} iterations",
            highlight=False,
        )
        path, s = _train_fold(
            k, all_ids - set(held_out), raw, folder, recipe, fingerprint, Path(images_dir),
            device, seed, console, allow_outside_root,
        )  # fmt: skip
        if s == 0.0:
            reused.append(k)
            console.print(f"  reusing {path}", highlight=False)
        seconds.append(s)
        paths.append(path)

    min_score = pcfg["empirical_cls_min_score"]
    test = {k: polish[k] for k in ("score_thresh", "nms_thresh", "detections_per_img")}
    table = _out_of_fold_detections(paths, folds, coco, Path(images_dir), test, min_score,
                                    resolve_device(device), workers)  # fmt: skip
    meta = {
        "folds": k_folds,
        "iterations": int(recipe["teacher"]["iters"]),
        "teacher_iterations": int(base["teacher"]["iters"]),
        "teacher_config_sha256": recipe_sha,
        "seed": seed,
        "min_score": min_score,
        "test_settings": test,
        "fold_images": folds,
        "categories": coco.categories,
        "source": str(ann),
        "fold_seconds": seconds,
    }
    out = write_crossfit(crossfit_path(noise_out), table, meta)
    return CrossfitResult(
        out, folds, seconds, reused, meta["iterations"], meta["teacher_iterations"], meta
    )


def _out_of_fold_detections(
    paths: list[Path],
    folds: list[list[int]],
    coco: CocoData,
    images_dir: Path,
    test: dict[str, Any],
    min_score: float,
    dev: torch.device,
    workers: int,
) -> pa.Table:
    """Each fold teacher's detections (score >= ``min_score``, with the test-time
    settings ``test``) on the images it did not train on; an image with none gets one
    null row, so every labeled image is known to have been seen."""
    by_id = {r["id"]: r for r in coco.images}
    cols: dict[str, list] = {k: [] for k in ("id", "name", "fold", "box", "score", "cat")}
    for k, (path, held_out) in enumerate(zip(paths, folds, strict=True)):
        detector, spec = load_detector(path, dev)
        set_test_settings(detector, float(test["score_thresh"]), float(test["nms_thresh"]),
                          int(test["detections_per_img"]))  # fmt: skip
        to_cat = spec.label_to_cat
        records = [by_id[i] for i in held_out]
        for record, boxes, scores, labels in predict_detections(
            detector, records, images_dir, 4, dev, workers
        ):
            keep = (scores >= min_score).numpy()
            n = int(keep.sum())
            box, score = boxes.numpy()[keep], scores.numpy()[keep]
            cat = np.asarray([to_cat[int(v)] for v in labels[keep].tolist()], np.float64)
            if n == 0:  # one null row: the image was seen, nothing was detected
                n, box, score, cat = 1, np.zeros((1, 4)), np.full(1, np.nan), np.zeros(1)
            cols["id"].append(np.full(n, record["id"], np.int64))
            cols["name"] += [record["file_name"]] * n
            cols["fold"].append(np.full(n, k, np.int32))
            cols["box"].append(box)
            cols["score"].append(score)
            cols["cat"].append(cat)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items() if k != "name"}
    return detections_table(
        cat["id"], cols["name"], cat["fold"], cat["box"], cat["score"], cat["cat"]
    )


def _owned_files(k_folds: int) -> list[str]:
    """The files cross-fitting writes in its folder (for the marker)."""
    names = [".pt", ".last.pt", ".stamp.json", ".json"]
    return sorted(f"fold-{k}{ext}" for k in range(k_folds) for ext in names)


def crossfit_matches(
    path: str | Path, gt: GroundTruth
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(det_boxes, det_scores, gt_boxes)`` per labeled image with GT, from a crossfit file
    (the input of ``empirical_from_matches``)."""
    for image_id, boxes, scores in detections_by_image(path):
        k = np.searchsorted(gt.image_ids, image_id)
        if k < len(gt.image_ids) and gt.image_ids[k] == image_id:
            yield boxes, scores, gt.image_boxes(int(k))


def fit_empirical_noise(
    detector: torch.nn.Module,
    coco: CocoData,
    images_dir: str | Path,
    device: str | torch.device = "cpu",
    workers: int = 2,
    batch_size: int = 4,
    min_match_iou: float = 0.5,
    reg_min_score: float = 0.5,
    cls_min_score: float = 0.05,
    inflate: float = 1.0,
    progress: Callable[[], None] | None = None,
) -> EmpiricalNoise:
    """Run the teacher (test settings: score 0.001, NMS 0.5, 100 per image) on ``coco``'s
    images and fit the noise to its errors against their ground truth."""
    set_test_settings(detector, 0.001, 0.5, 100)
    gt = GroundTruth.from_coco(coco)
    rows = {int(i): k for k, i in enumerate(gt.image_ids)}

    def matches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for record, boxes, scores, _ in predict_detections(
            detector, coco.images, images_dir, batch_size, device, workers
        ):
            if progress:
                progress()
            k = rows.get(record["id"])
            if k is not None:
                yield boxes.cpu().numpy(), scores.cpu().numpy(), gt.image_boxes(k)

    return empirical_from_matches(
        matches(), min_match_iou, reg_min_score, cls_min_score, inflate=inflate
    )


def empirical_from_crossfit(
    path: str | Path, gt: GroundTruth, section: dict[str, Any]
) -> EmpiricalNoise | None:
    """The empirical noise model fitted on a crossfit file's detections (the ``polisher``
    section's empirical settings); None when no detection matched a GT box."""
    try:
        return empirical_from_matches(
            crossfit_matches(path, gt),
            section["empirical_min_match_iou"],
            section["empirical_reg_min_score"],
            section["empirical_cls_min_score"],
            inflate=section["empirical_inflate"],
        )
    except DplError:
        return None
