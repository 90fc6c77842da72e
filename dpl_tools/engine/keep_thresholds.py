"""The keep rule's thresholds: fitted after polisher training, resolved when polishing.

Fitting (``dpl train-polisher``, ``fit_on_crossfit``): the trained (EMA) polisher runs on
the cross-fitted detections (``crossfit.parquet``: each labeled image detected by a fold
teacher that did not train on it) with score >= the polish initial threshold, on the
*main* teacher's FPN features of those labeled images, exactly as ``dpl polish`` would
(``polish.polish_boxes``); the thresholds are then chosen against the images' ground truth
(``fit_thresholds.fit_keep_thresholds``). Caveat: the teacher scores are honest, but the
polisher has seen these images' ground truth through its synthetic pairs, so its
probabilities there are somewhat optimistic (a fitted ``cls_prob`` tends to be a little
too low). Without cross-fitted detections nothing is fitted: a held-out slice of the
labeled split would not be honest either (the main teacher trained on it), so the paper's
thresholds stay, and the run says so.

The fold teachers may be weaker than the main teacher (fewer boxes, lower scores), so
the fit is not cut at the initial threshold alone: it takes the out-of-fold detections down
to the score where their count per image matches the main teacher's own count on the
labeled images (``matched_density_floor``; never above the initial threshold). When there
is still too little to fit on (fewer than ``polisher.keep_fit_min_matches`` matched boxes,
or a best F1 of 0), ``fit_keep_thresholds`` falls back to ``polisher.keep_fallback`` and
records why (``keep_rule_source``). The same pass checks the regression polisher on the
real pairs of the polisher's validation images (``engine.regression_check``).

Resolving (``dpl polish``, ``resolve_keep_thresholds``): a value given by the user (flag
or config) wins; else the rule's: ``fitted`` (the polisher checkpoint's, or the paper's
with a note when it holds none) or ``paper`` (0.9 / 0.9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes

from dpl_tools.data.coco import CocoData
from dpl_tools.data.crossfit_detections import (
    ImageDetections,
    find_crossfit,
    read_crossfit_detections,
)
from dpl_tools.data.detection import DetectionDataset, collate_detection
from dpl_tools.engine.fit_thresholds import (
    MIN_MATCHES,
    FittedThresholds,
    HeldOutImage,
    fit_keep_thresholds,
)
from dpl_tools.engine.keep_rule import PAPER_CLS_PROB, PAPER_TEACHER_SCORE
from dpl_tools.engine.loop import Hook, TrainLoop
from dpl_tools.engine.polish import PolishSettings, Refiner, polish_boxes
from dpl_tools.engine.regression_check import MIN_PAIRS, check_regression
from dpl_tools.errors import DplError
from dpl_tools.models.detector import set_test_settings
from dpl_tools.runtime import amp_enabled

KEEP_KEYS = ("cls_prob", "teacher_score")
PAPER = {"cls_prob": PAPER_CLS_PROB, "teacher_score": PAPER_TEACHER_SCORE}
# cls_prob 0 and an infinite teacher_score relabel every box: the polished label is then
# the polisher's own class (what the fit needs), whatever the rule would later do.
_REVEAL = {"cls_prob": 0.0, "teacher_score": math.inf}


def _match_images(
    coco: CocoData, detections: dict[str, ImageDetections]
) -> list[tuple[dict, ImageDetections]]:
    """(COCO image record, its detections) for the images of ``coco`` held out in the
    cross-fitting file: by file name, else by image id."""
    by_id = {d.image_id: d for d in detections.values()}
    out = []
    for record in coco.images:
        det = detections.get(record["file_name"])
        if det is None:
            det = by_id.get(record["id"])
        if det is not None:
            out.append((record, det))
    return out


@torch.inference_mode()
def _teacher_counts(
    teacher: FasterRCNN, batch: Any, features: dict, initial_thresh: float
) -> list[int]:
    """The main teacher's own detections per image (score >= ``initial_thresh``, test
    settings 0.001 / NMS 0.5 / 100), on features it already computed."""
    heads = teacher.roi_heads
    saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
    set_test_settings(teacher, 0.001, 0.5, 100)
    try:
        proposals, _ = teacher.rpn(batch, features)
        dets, _ = heads(features, proposals, batch.image_sizes)
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved
    return [int((d["scores"] >= initial_thresh).sum()) for d in dets]


@torch.inference_mode()
def heldout_images(
    teacher: FasterRCNN,
    label_to_cat: dict[int, int],
    polisher: Refiner,
    coco: CocoData,
    images_dir: str | Path,
    detections: dict[str, ImageDetections],
    initial_thresh: float,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    workers: int = 0,
    min_score: float | None = None,
) -> list[HeldOutImage]:
    """The polisher's verdict (class, probability, refined box) on the cross-fitted
    detections (score >= ``min_score``, default ``initial_thresh``) of ``coco``'s images,
    on the main teacher's features, with each image's true boxes and the main teacher's own
    detection count there (score >= ``initial_thresh``)."""
    device = torch.device(device)
    floor = initial_thresh if min_score is None else min_score
    cat_to_label = {c: k for k, c in label_to_cat.items()}
    pairs = _match_images(coco, detections)
    index_of = {r["id"]: k for k, r in enumerate(coco.images)}
    dataset = DetectionDataset(coco, images_dir)
    det_of = {r["id"]: d.at_least(floor) for r, d in pairs}
    unknown = {int(c) for d in det_of.values() for c in d.labels} - set(cat_to_label)
    if unknown:
        raise DplError(
            f"cross-fitted detections: category id(s) {sorted(unknown)} are not the "
            "teacher's (made for another dataset?)"
        )
    loader = DataLoader(
        Subset(dataset, [index_of[r["id"]] for r, _ in pairs]),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_detection,
    )
    settings = PolishSettings(**_REVEAL)
    out = []
    for images, targets in loader:
        if not images:
            continue
        images = [im.to(device) for im in images]
        with torch.autocast(device.type, enabled=amp_enabled(device)):
            batch, _ = teacher.transform(images)
            features = teacher.backbone(batch.tensors)
            counts = _teacher_counts(teacher, batch, features, initial_thresh)
        sizes = [tuple(s) for s in batch.image_sizes]
        originals = [tuple(im.shape[-2:]) for im in images]
        dets = [det_of[t["image_id"]] for t in targets]
        boxes = [
            resize_boxes(torch.from_numpy(d.boxes).to(device), o, s)
            for d, o, s in zip(dets, originals, sizes, strict=True)
        ]
        scores = [torch.from_numpy(d.scores).to(device) for d in dets]
        labels = [
            torch.tensor([cat_to_label[int(c)] for c in d.labels], dtype=torch.int64).to(device)
            for d in dets
        ]
        verdicts = polish_boxes(
            features=features, boxes=boxes, scores=scores, labels=labels, image_sizes=sizes,
            original_sizes=originals, polisher=polisher, settings=settings,
        )  # fmt: skip
        for d, target, verdict, n in zip(dets, targets, verdicts, counts, strict=True):
            cls = verdict["polished_labels"].numpy()
            out.append(
                HeldOutImage(
                    boxes=d.boxes.astype(np.float64),
                    teacher_labels=d.labels,
                    teacher_scores=d.scores,
                    polisher_labels=np.array([label_to_cat[int(k)] for k in cls], np.int64),
                    polisher_probs=verdict["probs"].numpy().astype(np.float32),
                    gt_boxes=target["boxes"].numpy().astype(np.float64),
                    gt_labels=np.array([label_to_cat[int(k)] for k in target["labels"]], np.int64),
                    image_id=int(target["image_id"]),
                    polished_boxes=verdict["polished_boxes"].numpy().astype(np.float64),
                    teacher_detections=n,
                )
            )
    return out


def matched_density_floor(images: Sequence[HeldOutImage], initial_thresh: float) -> float:
    """The teacher score down to which the out-of-fold detections are fitted on: the
    initial threshold when the fold teachers find as many boxes per image there as the main
    teacher does; else lower, until their count matches the main teacher's (weaker fold
    teachers score lower), never below the lowest detection given."""
    target = sum(im.teacher_detections for im in images)
    scores = np.sort(np.concatenate([im.teacher_scores for im in images] or [np.zeros(0)]))[::-1]
    if target == 0 or len(scores) == 0 or int((scores >= initial_thresh).sum()) >= target:
        return initial_thresh
    return min(initial_thresh, float(scores[min(target, len(scores)) - 1]))


def at_least(image: HeldOutImage, score: float) -> HeldOutImage:
    """``image`` with only its detections of teacher score >= ``score``."""
    k = image.teacher_scores >= score
    polished = image.polished_boxes[k] if image.polished_boxes is not None else None
    return replace(
        image, boxes=image.boxes[k], teacher_labels=image.teacher_labels[k],
        teacher_scores=image.teacher_scores[k], polisher_labels=image.polisher_labels[k],
        polisher_probs=image.polisher_probs[k], polished_boxes=polished,
    )  # fmt: skip


@dataclass
class HeldOutFit:
    """What the trained polisher's run on the out-of-fold detections gave: the keep
    thresholds (fitted or fallback), the density match behind them, and the regression
    polisher's check on real pairs of the polisher's validation images."""

    thresholds: FittedThresholds
    density: dict[str, Any]
    regression: dict[str, Any]


def fit_heldout(
    crossfit: str | Path,
    teacher: FasterRCNN,
    label_to_cat: dict[int, int],
    polisher: Refiner,
    coco: CocoData,
    images_dir: str | Path,
    initial_thresh: float,
    precision_target: float | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    workers: int = 0,
    min_matches: int = MIN_MATCHES,
    fallback: str = "keep_all",
    val_ids: Sequence[int] = (),
    min_pairs: int = MIN_PAIRS,
) -> HeldOutFit | None:
    """Fit the keep thresholds on ``crossfit``'s detections of ``coco``'s images, down to
    the density-matched floor (``matched_density_floor``), and check the regression
    polisher on the real pairs of the ``val_ids`` images (``check_regression``); None
    when none of the file's images is in ``coco``."""
    detections = read_crossfit_detections(crossfit)
    images = heldout_images(
        teacher, label_to_cat, polisher, coco, images_dir, detections, initial_thresh,
        device, batch_size, workers, min_score=0.0,
    )  # fmt: skip
    if not images:
        return None
    floor = matched_density_floor(images, initial_thresh)
    fitted_on = [at_least(im, floor) for im in images]
    n = len(images)
    density = {
        "images": n,
        "fold_per_image": sum(int((im.teacher_scores >= initial_thresh).sum())
                              for im in images) / n,
        "teacher_per_image": sum(im.teacher_detections for im in images) / n,
        "truth_per_image": sum(len(im.gt_labels) for im in images) / n,
        "initial_thresh": initial_thresh,
        "floor": floor,
        "fitted_per_image": sum(len(im.teacher_scores) for im in fitted_on) / n,
    }  # fmt: skip
    thresholds = fit_keep_thresholds(
        fitted_on, precision_target=precision_target, min_matches=min_matches, fallback=fallback
    )
    val = set(int(i) for i in val_ids)
    regression = check_regression([im for im in fitted_on if im.image_id in val], min_pairs)
    return HeldOutFit(thresholds, density, regression)


def fit_on_crossfit(
    crossfit: str | Path,
    teacher: FasterRCNN,
    label_to_cat: dict[int, int],
    polisher: Refiner,
    coco: CocoData,
    images_dir: str | Path,
    initial_thresh: float,
    precision_target: float | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    workers: int = 0,
    min_matches: int = MIN_MATCHES,
    fallback: str = "keep_all",
) -> FittedThresholds | None:
    """The keep thresholds of ``fit_heldout`` alone (None: no image in common)."""
    fit = fit_heldout(
        crossfit, teacher, label_to_cat, polisher, coco, images_dir, initial_thresh,
        precision_target, device, batch_size, workers, min_matches, fallback,
    )  # fmt: skip
    return None if fit is None else fit.thresholds


def fitted_record(fit: HeldOutFit, crossfit: str | Path, initial: float) -> dict:
    """What the polisher checkpoint stores: the keep thresholds
    (``FittedThresholds.to_dict()`` plus where the detections came from, the initial
    threshold and the density match) and the regression check's record."""
    keep = {**fit.thresholds.to_dict(), "crossfit": str(crossfit), "initial_thresh": initial,
            "density": fit.density}  # fmt: skip
    return {"keep_thresholds": keep, "regression_check": fit.regression}


class KeepRuleFit(Hook):
    """After training (rank 0): fit the keep thresholds with the EMA polisher on the
    first existing ``candidates`` cross-fitting file, and check its regression on real
    held-out pairs; ``fit`` returns ``{"keep_thresholds": .., "regression_check": ..}``
    (``fitted_record``) or None. ``fitted`` and ``regression`` go into the final checkpoint
    (None: not fitted, ``note`` says why)."""

    def __init__(
        self,
        polisher: Refiner,
        candidates: Sequence[str | Path],
        fit: Callable[[Path, Refiner], dict[str, Any] | None],
        enabled: bool = True,
    ) -> None:
        self.polisher, self.candidates, self.fit, self.enabled = polisher, candidates, fit, enabled
        self.fitted: dict[str, Any] | None = None
        self.regression: dict[str, Any] | None = None  # the regression check's record
        self.note = ""

    def after_train(self, loop: TrainLoop) -> None:
        if not (loop.finished and loop.dist.is_main):
            return
        paper = f"dpl polish will use the paper's {PAPER_CLS_PROB:g} / {PAPER_TEACHER_SCORE:g}"
        if not self.enabled:
            self.note = f"keep thresholds not fitted (polisher.fit_keep_rule false); {paper}"
            return
        path = find_crossfit(self.candidates)
        if path is None:
            self.note = (
                "keep thresholds not fitted: no cross-fitted detections (crossfit.parquet, "
                "from --noise-model crossfit); a held-out slice of the labeled split would not "
                f"be honest (the teacher trained on it), so {paper}"
            )
            return
        if isinstance(self.polisher, torch.nn.Module):
            self.polisher.eval()
        result = self.fit(path, self.polisher)
        if result is not None:
            self.fitted, self.regression = result["keep_thresholds"], result["regression_check"]
        if self.fitted is None:
            self.note = f"keep thresholds not fitted: none of {path}'s images is labeled; {paper}"


@dataclass
class KeepThresholds:
    """The keep thresholds a polish run uses, and where each came from."""

    rule: str
    cls_prob: float
    teacher_score: float
    sources: dict[str, str] = field(default_factory=dict)  # key -> fitted/fallback/paper/user
    fitted: dict[str, Any] | None = None  # the polisher's fitted record, if any
    note: str = ""

    @property
    def source(self) -> str:
        """Where the rule came from as a whole: ``fitted``, ``fallback keep_all (why)``,
        ``paper`` or ``user`` (either threshold given)."""
        if "user" in self.sources.values():
            return "user"
        if self.sources["cls_prob"] in ("fitted", "fallback") and self.fitted:
            return str(self.fitted.get("keep_rule_source", "fitted"))
        return self.sources["cls_prob"]

    def metadata(self) -> dict[str, str]:
        """The text entries of the Parquet thresholds (beside the numbers)."""
        return {
            "keep_rule": self.rule,
            "cls_prob_source": self.sources["cls_prob"],
            "teacher_score_source": self.sources["teacher_score"],
            "keep_rule_source": self.source,
        }

    def describe(self) -> str:
        """One line: ``keep rule fitted: cls_prob 0.55 (fitted), teacher_score 0.9 (user)``."""
        parts = [f"{k} {getattr(self, k):g} ({self.sources[k]})" for k in KEEP_KEYS]
        line = f"keep rule {self.rule}: " + ", ".join(parts)
        return line if self.source in ("fitted", "paper", "user") else f"{line}; {self.source}"


def resolve_keep_thresholds(
    rule: str,
    fitted: dict[str, Any] | None,
    cls_prob: float | None = None,
    teacher_score: float | None = None,
    polisher_name: str = "the polisher",
) -> KeepThresholds:
    """The thresholds to polish with: explicit values (flag or config) win; else ``rule``'s
    (``paper``: 0.9 / 0.9; ``fitted``: the polisher's, or the paper's with a note)."""
    if rule not in ("fitted", "paper"):
        raise DplError(f"--keep-rule {rule!r}: choose fitted or paper")
    note = ""
    if rule == "fitted" and fitted is None:
        base, source = PAPER, "paper"
        if cls_prob is None or teacher_score is None:
            note = (
                f"{polisher_name} holds no fitted keep thresholds (train-polisher fits them on "
                f"cross-fitted detections); using the paper's {PAPER_CLS_PROB:g} / "
                f"{PAPER_TEACHER_SCORE:g}"
            )
    elif rule == "fitted":
        base = {k: float(fitted[k]) for k in KEEP_KEYS}
        source = "fitted" if fitted.get("keep_rule_source", "fitted") == "fitted" else "fallback"
    else:
        base, source = PAPER, "paper"
    given = {"cls_prob": cls_prob, "teacher_score": teacher_score}
    values = {k: float(given[k]) if given[k] is not None else base[k] for k in KEEP_KEYS}
    sources = {k: "user" if given[k] is not None else source for k in KEEP_KEYS}
    return KeepThresholds(rule, values["cls_prob"], values["teacher_score"], sources, fitted, note)
