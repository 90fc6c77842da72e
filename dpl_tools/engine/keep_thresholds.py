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

Resolving (``dpl polish``, ``resolve_keep_thresholds``): a value given by the user (flag
or config) wins; else the rule's: ``fitted`` (the polisher checkpoint's, or the paper's
with a note when it holds none) or ``paper`` (0.9 / 0.9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from dpl_tools.engine.fit_thresholds import FittedThresholds, HeldOutImage, fit_keep_thresholds
from dpl_tools.engine.keep_rule import PAPER_CLS_PROB, PAPER_TEACHER_SCORE
from dpl_tools.engine.loop import Hook, TrainLoop
from dpl_tools.engine.polish import PolishSettings, Refiner, polish_boxes
from dpl_tools.errors import DplError
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
) -> list[HeldOutImage]:
    """The polisher's verdict on the cross-fitted detections (score >= ``initial_thresh``)
    of ``coco``'s images, on the main teacher's features, with each image's true boxes."""
    device = torch.device(device)
    cat_to_label = {c: k for k, c in label_to_cat.items()}
    pairs = _match_images(coco, detections)
    index_of = {r["id"]: k for k, r in enumerate(coco.images)}
    dataset = DetectionDataset(coco, images_dir, train=False)
    det_of = {r["id"]: d.at_least(initial_thresh) for r, d in pairs}
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
        for d, target, verdict in zip(dets, targets, verdicts, strict=True):
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
                )
            )
    return out


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
) -> FittedThresholds | None:
    """Fit the keep thresholds on ``crossfit``'s detections of ``coco``'s images (see the
    module docstring); None when none of its images is in ``coco``."""
    detections = read_crossfit_detections(crossfit)
    images = heldout_images(
        teacher, label_to_cat, polisher, coco, images_dir, detections, initial_thresh,
        device, batch_size, workers,
    )  # fmt: skip
    if not images:
        return None
    return fit_keep_thresholds(images, precision_target=precision_target)


def fitted_record(fitted: FittedThresholds, crossfit: str | Path, initial: float) -> dict:
    """What the polisher checkpoint stores: ``FittedThresholds.to_dict()`` plus where the
    detections came from and the initial threshold they were cut at."""
    return {**fitted.to_dict(), "crossfit": str(crossfit), "initial_thresh": initial}


class KeepRuleFit(Hook):
    """After training (rank 0): fit the keep thresholds with the EMA polisher on the
    first existing ``candidates`` cross-fitting file; ``fitted`` goes into the final
    checkpoint (None: not fitted, ``note`` says why)."""

    def __init__(
        self,
        polisher: Refiner,
        candidates: Sequence[str | Path],
        fit: Callable[[Path, Refiner], dict[str, Any] | None],
        enabled: bool = True,
    ) -> None:
        self.polisher, self.candidates, self.fit, self.enabled = polisher, candidates, fit, enabled
        self.fitted: dict[str, Any] | None = None
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
        self.fitted = self.fit(path, self.polisher)
        if self.fitted is None:
            self.note = f"keep thresholds not fitted: none of {path}'s images is labeled; {paper}"


@dataclass
class KeepThresholds:
    """The keep thresholds a polish run uses, and where each came from."""

    rule: str
    cls_prob: float
    teacher_score: float
    sources: dict[str, str] = field(default_factory=dict)  # key -> fitted / paper / user
    fitted: dict[str, Any] | None = None  # the polisher's fitted record, if any
    note: str = ""

    def metadata(self) -> dict[str, str]:
        """The text entries of the Parquet thresholds (beside the numbers)."""
        return {
            "keep_rule": self.rule,
            "cls_prob_source": self.sources["cls_prob"],
            "teacher_score_source": self.sources["teacher_score"],
        }

    def describe(self) -> str:
        """One line: ``keep rule fitted: cls_prob 0.55 (fitted), teacher_score 0.9 (user)``."""
        parts = [f"{k} {getattr(self, k):g} ({self.sources[k]})" for k in KEEP_KEYS]
        return f"keep rule {self.rule}: " + ", ".join(parts)


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
        base, source = {k: float(fitted[k]) for k in KEEP_KEYS}, "fitted"
    else:
        base, source = PAPER, "paper"
    given = {"cls_prob": cls_prob, "teacher_score": teacher_score}
    values = {k: float(given[k]) if given[k] is not None else base[k] for k in KEEP_KEYS}
    sources = {k: "user" if given[k] is not None else source for k in KEEP_KEYS}
    return KeepThresholds(rule, values["cls_prob"], values["teacher_score"], sources, fitted, note)
