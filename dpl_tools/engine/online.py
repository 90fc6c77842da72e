"""Online polishing, the paper's own training: a mean teacher with the polishers inside
the student's loop (``dpl train-student --online``).

The student starts from the teacher checkpoint; the teacher is an exponential moving
average (EMA) of the student (``student.ema_momentum``). Each iteration, the unlabeled
images of the batch are labelled on the spot: the EMA teacher detects on the image as it
is (the weak view), the polishers refine the boxes and classes and the keep rule
selects the classification pseudo labels, all through ``detect_and_polish``, the code path
of ``dpl polish``, with the same settings (``applied_polisher``). The image and its pseudo
labels are then augmented together (``student.pseudo_augment``: the strong view, every box
set moved with the image), and the student takes the disentangled loss with the configured
negatives, as offline. The EMA is updated after each step and saved beside the student as
``<out stem>.teacher.pt``, a detector checkpoint like any teacher. The polishers are frozen,
or, with ``student.online_polisher``, keep training on the labeled images of each batch
(``dpl_tools.engine.online_polisher``, the paper's joint form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dpl_tools.data.augment import DetectionAugment
from dpl_tools.data.detection import image_tensor, report_skipped
from dpl_tools.data.images import ImageReadError
from dpl_tools.data.pseudo_labels import BOX_FIELDS
from dpl_tools.data.pseudo_targets import PseudoImage
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.loop import Hook, TrainLoop
from dpl_tools.engine.online_eval import EvaluationSlice
from dpl_tools.engine.polish import PolishSettings, detect_and_polish
from dpl_tools.evaluation.matching import box_iou_np, greedy_match
from dpl_tools.models.student_criterion import PSEUDO_KEY, Supervision, student_target

if TYPE_CHECKING:
    from dpl_tools.engine.online_polisher import OnlinePolisher

ONLINE_KEY = "online"  # target key of an unlabeled image to be labelled in the loop


class OnlineImages(Dataset):
    """Unlabeled images for online training: each item is the image (as read: the
    teacher's weak view) and a target holding only its file name; the loop labels it."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        record = self.records[index]
        try:
            image = image_tensor(record["path"])
        except ImageReadError as e:
            report_skipped(Path(record["path"]), e.reason)
            return None
        empty = torch.zeros((0, 4))
        target = {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64),
                  ONLINE_KEY: str(record["file_name"])}  # fmt: skip
        return image, target


def pseudo_image(det: dict[str, torch.Tensor], label_to_cat: dict[int, int],
                 file_name: str, height: int, width: int) -> PseudoImage:  # fmt: skip
    """``detect_and_polish``'s output for one image as pseudo-label rows (what ``dpl
    polish`` would write for it), so the student's targets are built the same way."""
    n = len(det["scores"])
    cats = np.array([label_to_cat[int(v)] for v in det["labels"]], dtype=np.float64)
    polished = np.array([label_to_cat[int(v)] for v in det["polished_labels"]], np.float64)
    own = np.array([label_to_cat.get(int(v), -1) for v in det["polisher_labels"]], np.float64)
    rows: dict[str, np.ndarray] = {
        "teacher_label": cats.reshape(n),
        "polished_label": polished.reshape(n),
        "teacher_score": det["scores"].double().numpy().reshape(n),
        "polisher_prob": det["probs"].double().numpy().reshape(n),
        "polisher_label": own.reshape(n),
        "use_cls": det["use_cls"].numpy().astype(bool).reshape(n),
        "use_reg": det["use_reg"].numpy().astype(bool).reshape(n),
    }
    for prefix, key in (("teacher", "boxes"), ("polished", "polished_boxes")):
        boxes = det[key].double().numpy().reshape(n, 4)
        for i, c in enumerate(BOX_COORDS):
            rows[f"{prefix}_{c}"] = boxes[:, i]
    return PseudoImage(file_name, width, height, {k: rows[k] for k in BOX_FIELDS})


@dataclass
class OnlineQuality:
    """Running counts of the pseudo labels made in the loop against the hidden truth of
    the unlabeled images (``--unlabeled-gt``): class-aware true positives at IoU 0.5 of
    the teacher's boxes and of the kept classification pseudo labels, and the IoU with
    their truth box of the matched teacher boxes before and after polishing."""

    truth: dict[str, tuple[np.ndarray, np.ndarray]]  # file name -> (xyxy, COCO ids)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, file_name: str, det: dict[str, torch.Tensor], label_to_cat: dict) -> None:
        if file_name not in self.truth:
            return
        gt_boxes, gt_labels = self.truth[file_name]
        c = self.counts
        c["gt"] = c.get("gt", 0) + len(gt_boxes)
        teacher = det["boxes"].double().numpy().reshape(-1, 4)
        labels = np.array([label_to_cat[int(v)] for v in det["labels"]])
        polished = np.array([label_to_cat[int(v)] for v in det["polished_labels"]])
        keep = det["use_cls"].numpy().astype(bool)
        scores = det["scores"].double().numpy()
        iou = box_iou_np(teacher, gt_boxes)
        for name, rows, classes in (("teacher", np.ones(len(scores), bool), labels),
                                    ("kept", keep, polished)):  # fmt: skip
            same = classes[rows][:, None] == gt_labels[None, :]
            match, _ = greedy_match(iou[rows], scores[rows], 0.5, same)
            c[f"{name}_boxes"] = c.get(f"{name}_boxes", 0) + int(rows.sum())
            c[f"{name}_tp"] = c.get(f"{name}_tp", 0) + int((match >= 0).sum())
        match, before = greedy_match(iou, scores, 0.5)
        hit = match >= 0
        if hit.any():
            after_iou = box_iou_np(det["polished_boxes"].double().numpy().reshape(-1, 4), gt_boxes)
            after = after_iou[np.flatnonzero(hit), match[hit]]
            c["matched"] = c.get("matched", 0) + int(hit.sum())
            c["iou_before"] = c.get("iou_before", 0.0) + float(before[hit].sum())
            c["iou_after"] = c.get("iou_after", 0.0) + float(after.sum())

    def summary(self) -> dict[str, float | None]:
        """Precision and recall (IoU 0.5, class-aware) of the teacher's boxes and of the
        kept pseudo labels, and the matched boxes' mean IoU before / after polishing."""
        c = self.counts

        def ratio(a: str, b: str) -> float | None:
            return round(c[a] / c[b], 4) if c.get(b) else None

        return {
            "teacher_precision": ratio("teacher_tp", "teacher_boxes"),
            "teacher_recall": ratio("teacher_tp", "gt"),
            "kept_precision": ratio("kept_tp", "kept_boxes"),
            "kept_recall": ratio("kept_tp", "gt"),
            "iou_before": ratio("iou_before", "matched"),
            "iou_after": ratio("iou_after", "matched"),
            "images_boxes": c.get("teacher_boxes", 0),
        }


class OnlineLabeler:
    """Labels the unlabeled images of a batch with the EMA teacher and the polishers, then
    augments each image with its pseudo labels (see the module docstring)."""

    def __init__(
        self,
        ema: ModelEMA,
        polisher: Any,
        settings: PolishSettings,
        label_to_cat: dict[int, int],
        cat_to_label: dict[int, int],
        chosen: Supervision,
        negatives: str,
        augment: DetectionAugment,
        quality: OnlineQuality | None = None,
    ) -> None:
        self.ema, self.polisher, self.settings = ema, polisher, settings
        self.label_to_cat, self.cat_to_label = label_to_cat, cat_to_label
        self.chosen, self.negatives, self.augment = chosen, negatives, augment
        self.quality = quality
        self.boxes = self.kept = 0  # pseudo labels made in this run: teacher boxes, kept

    def __call__(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        """Replace, in place, each unlabeled image and target by its augmented pseudo-
        labelled version."""
        todo = [i for i, t in enumerate(targets) if ONLINE_KEY in t]
        if not todo:
            return
        self.ema.module.eval()
        dets = detect_and_polish(
            self.ema.module, self.polisher, [images[i] for i in todo], self.settings
        )
        for i, det in zip(todo, dets, strict=True):
            name = targets[i][ONLINE_KEY]
            height, width = images[i].shape[-2:]
            if self.quality is not None:
                self.quality.add(name, det, self.label_to_cat)
            item = pseudo_image(det, self.label_to_cat, name, int(height), int(width))
            target, _ = student_target(item, self.chosen, self.cat_to_label, self.negatives)
            self.boxes += len(item)
            self.kept += int(det["use_cls"].sum())
            device = images[i].device
            target = {k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}
            image, target = self.augment(images[i].detach().clone(), target)
            target[PSEUDO_KEY] = True
            images[i], targets[i] = image, target


def online_losses(
    criterion: Callable[[nn.Module, list, list], dict],
    labeler: OnlineLabeler,
    polisher_training: OnlinePolisher | None = None,
) -> Callable[[nn.Module, list, list], dict]:
    """The student's loss function with the unlabeled images labelled in the loop first
    (after the polishers' own step on the labeled images, when they train jointly)."""

    def losses(model: nn.Module, images: list, targets: list) -> dict:
        images, targets = list(images), list(targets)
        if polisher_training is not None:
            polisher_training.step(images, targets)
        labeler(images, targets)
        return criterion(model, images, targets)

    return losses


class OnlineLog(Hook):
    """Every ``every`` iterations (rank 0): the pseudo labels made so far (and the jointly
    trained polishers' mean losses), with the hidden truth their quality
    (``OnlineQuality``) and, with an ``evaluation`` slice, the same images' pseudo labels
    scored before training and at every line; the log is kept for the checkpoint's record
    (``record["online_log"]``) and continues in a resumed run."""

    name = "online_log"

    def __init__(
        self,
        labeler: OnlineLabeler,
        every: int,
        console: Any,
        record: dict | None = None,
        evaluation: EvaluationSlice | None = None,
        polisher_training: OnlinePolisher | None = None,
    ) -> None:
        self.labeler, self.every, self.console = labeler, max(1, every), console
        self.polisher_training = polisher_training  # its mean losses join each line
        self.evaluation = evaluation  # the fixed slice, scored at every line (rank 0)
        self.history: list[dict[str, Any]] = []
        if record is not None:  # e.g. the student's spec.extra: the log goes into its file
            record["online_log"] = self.history

    def _line(self, loop: TrainLoop, iteration: int | None = None) -> None:
        done = loop.iteration + 1 if iteration is None else iteration
        entry: dict[str, Any] = {"iteration": done, "pseudo_boxes": self.labeler.boxes,
                                 "kept_for_classification": self.labeler.kept}  # fmt: skip
        if self.polisher_training is not None:
            entry.update(self.polisher_training.take_losses())
        if self.labeler.quality is not None:
            entry.update(self.labeler.quality.summary())
            self.labeler.quality.counts.clear()
        if self.evaluation is not None and loop.dist.is_main:
            entry.update(self.evaluation.evaluate(self.labeler.ema.module, self.labeler.polisher))
        self.history.append(entry)
        if loop.dist.is_main:
            shown = "  ".join(f"{k} {v}" for k, v in entry.items()
                              if v is not None and not k.startswith("slice_"))  # fmt: skip
            self.console.print(f"online pseudo labels: {shown}", highlight=False)
            on_slice = "  ".join(f"{k.removeprefix('slice_')} {v}" for k, v in entry.items()
                                 if v is not None and k.startswith("slice_"))  # fmt: skip
            if on_slice:
                self.console.print(f"online evaluation slice: {on_slice}", highlight=False)
            if self.evaluation is not None and self.evaluation.warning and len(self.history) == 1:
                self.console.print(f"[bold yellow]warning:[/] {self.evaluation.warning}")

    def before_train(self, loop: TrainLoop) -> None:
        if self.evaluation is not None and not self.history:  # the teacher's, before step 1
            self._line(loop, iteration=loop.iteration)

    def after_step(self, loop: TrainLoop) -> None:
        if (loop.iteration + 1) % self.every == 0:
            self._line(loop)

    def state_dict(self) -> dict:
        quality = self.labeler.quality
        return {"history": list(self.history), "boxes": self.labeler.boxes,
                "kept": self.labeler.kept,
                "counts": dict(quality.counts) if quality is not None else {},
                "slice_recall": self.evaluation.recall if self.evaluation else None}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.history[:] = state["history"]  # in place: the record holds this list
        if self.evaluation is not None and state.get("slice_recall") is not None:
            self.evaluation.recall = state["slice_recall"]
        self.labeler.boxes, self.labeler.kept = state["boxes"], state["kept"]
        if self.labeler.quality is not None:
            self.labeler.quality.counts = dict(state["counts"])

    def after_train(self, loop: TrainLoop) -> None:
        if loop.finished and (not self.history or self.history[-1]["iteration"] != loop.iteration):
            self._line(loop)
