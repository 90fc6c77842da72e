"""The student's loss in one place: which pseudo labels feed which loss, and how.

As detectron2's ``FastRCNNOutputLayers.losses()`` or ultralytics' ``init_criterion``, this
module alone says what a student learns from a pseudo-labeled image:

* ``SUPERVISION``: per view (``--pseudo-view``, ``--disentangle``) the pair of pseudo-label
  sets (``dpl_tools.data.pseudo_views.LABEL_SETS``) that forms the classification set (RPN
  and RoI classification) and the regression set (RoI box regression only);
* ``student_target``: the one builder of a pseudo-labeled image's detector target, used by
  the student's dataset and by the tests. Keys ``boxes`` / ``labels`` (classification set)
  and, when the view has a separate regression set, ``reg_boxes`` / ``reg_labels``; boxes
  clipped to the image, unusable rows (non-finite, inverted or empty box, missing label)
  dropped and counted. Under ``negatives="ignore"`` also ``ignore_boxes``: the teacher
  boxes the classification set leaves out (rows with ``use_cls`` false);
* ``StudentRoIHeads``: torchvision's RoI heads, whose training losses on a batch with
  ``reg_boxes`` are the paper's disentangled ones: the proposals are sampled twice, matched
  against each set, and only the matching loss of each sampling is kept (as the official
  code); a target without ``reg_boxes`` (a labeled image) uses its boxes for both;
* ``StudentRPN``: torchvision's RPN, leaving out the anchors on ``ignore_boxes``;
* ``StudentCriterion``: the per-batch loss, ``L_labeled + unlabeled_weight * L_unlabeled``
  (one forward pass per image set, so the weight applies per set).

Negatives of the unlabeled images (``--negatives``, ``NEGATIVES``): a proposal that matches
no classification pseudo label is background under ``hard``. Under ``ignore`` (default) a
proposal whose IoU with an ignore box reaches the RoI head's foreground IoU (0.5, also its
background IoU), and an anchor that the ignore box would keep from being background were
it a pseudo label (IoU >= the RPN's background IoU 0.3, or the box's best anchor), is
neither foreground nor background unless a pseudo label claims it (left out of sampling
and loss): an uncertain teacher box is not taught as background.
Under ``soft`` (Soft Teacher's form, as the paper's official code) the RoI classification
loss of each sampled background proposal is weighted by the frozen teacher's background
probability for it (``TeacherBackground``), foreground proposals by 1, and the sum is
divided by the sum of the weights (at least 1); the RPN stays hard.

Target contract: every target key ending in ``boxes`` holds xyxy pixel boxes of its image;
``DetectorTransform`` resizes them and the dataset flips them together with the image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from dpl_tools.data.augment import IGNORE_BOXES
from dpl_tools.data.pseudo_labels import usable_boxes
from dpl_tools.data.pseudo_views import LABEL_SETS, LabelSet
from dpl_tools.defaults import DEFAULTS, PSEUDO_VIEWS, STUDENT_NEGATIVES
from dpl_tools.errors import DplError
from dpl_tools.models.transform import DetectorTransform, detector_transform

if TYPE_CHECKING:
    from dpl_tools.data.pseudo_targets import PseudoImage

PSEUDO_KEY = "pseudo"  # target flag of a pseudo-labeled image (removed before the forward)

# (sampled proposals, their labels, their regression targets), one list entry per image
Samples = tuple[list[Tensor], list[Tensor], list[Tensor]]


@dataclass(frozen=True)
class Supervision:
    """What a pseudo-labeled image teaches: the classification set (RPN + RoI
    classification) and the regression set (RoI box regression; None: the classification
    set serves every loss)."""

    cls: LabelSet
    reg: LabelSet | None


VIEWS = PSEUDO_VIEWS  # --pseudo-view: polished, raw, reg-only, cls-only
NEGATIVES = STUDENT_NEGATIVES  # --negatives: hard, ignore, soft
IGNORE_KEY = IGNORE_BOXES  # target key of the ignore regions (negatives="ignore", cut boxes)

# (--pseudo-view, --disentangle) -> (classification set, regression set), names of
# LABEL_SETS; a view that uses one set for both trains as torchvision does (one sampling)
VIEW_SETS: dict[tuple[str, bool], tuple[str, str]] = {
    # full method (the paper): teacher boxes whose class the polisher confirmed (polished
    # label) for classification, polished boxes (teacher label) for regression
    ("polished", True): ("cls", "reg"),
    # merged (no disentangling): the polished box and label of the use_cls rows for both
    ("polished", False): ("polished", "polished"),
    # the unpolished baseline: every teacher box with the teacher's label for both
    **{("raw", d): ("teacher", "teacher") for d in (True, False)},
    # ablations: only regression polished (classification from the raw teacher boxes) ...
    **{("reg-only", d): ("teacher", "reg") for d in (True, False)},
    # ... and only classification polished (regression from the raw teacher boxes)
    **{("cls-only", d): ("cls", "teacher") for d in (True, False)},
}


def _pair(cls_set: str, reg_set: str) -> Supervision:
    return Supervision(LABEL_SETS[cls_set], None if reg_set == cls_set else LABEL_SETS[reg_set])


SUPERVISION: dict[tuple[str, bool], Supervision] = {
    key: _pair(*sets) for key, sets in VIEW_SETS.items()
}


def supervision(view: str, disentangle: bool = True) -> Supervision:
    """The supervision of a view (one of ``VIEWS``; ``disentangle`` matters for
    ``polished`` only); a DplError for another name."""
    if view not in VIEWS:
        raise DplError(f"unknown pseudo-label view {view!r} (choose from {', '.join(VIEWS)})")
    return SUPERVISION[(view, bool(disentangle))]


def _clipped_boxes(image: PseudoImage, columns: tuple[str, ...], idx: np.ndarray):
    """(boxes of rows ``idx`` clipped to the image, whether each is finite and non-empty)."""
    rows = image.rows
    boxes = np.stack([rows[c][idx] for c in columns], axis=1).astype(np.float32).reshape(-1, 4)
    clipped, usable = usable_boxes(boxes, image.width, image.height)  # every reader's rule
    return torch.as_tensor(clipped, dtype=torch.float32), torch.as_tensor(usable)


def _label_set(
    image: PseudoImage, chosen: LabelSet, cat_to_label: Mapping[int, int]
) -> tuple[Tensor, Tensor, np.ndarray]:
    """(boxes clipped to the image, detector labels) of the usable rows of one set, and
    the indices (into the image's rows) of the rows it drops as unusable."""
    rows = image.rows
    n = len(rows["teacher_label"])
    take = np.ones(n, bool) if chosen.rows is None else np.asarray(rows[chosen.rows], bool)
    idx = np.flatnonzero(take)
    boxes_t, usable = _clipped_boxes(image, chosen.box_columns, idx)
    cats = np.asarray(rows[chosen.labels][idx], dtype=np.float64)
    keep = usable & torch.as_tensor(np.isfinite(cats))
    labels = torch.tensor(
        [cat_to_label[int(c)] for c, k in zip(cats, keep.tolist(), strict=True) if k],
        dtype=torch.int64,
    )
    return boxes_t[keep], labels, idx[~keep.numpy()]


def ignore_boxes(image: PseudoImage, chosen: LabelSet) -> Tensor:
    """The ignore regions of one image for a classification set: the teacher boxes of the
    rows the set leaves out (``use_cls`` false; none for a set of every row), clipped to
    the image, unusable boxes left out."""
    n = len(image)
    left_out = np.zeros(n, bool) if chosen.rows is None else ~np.asarray(image.rows[chosen.rows])
    boxes, usable = _clipped_boxes(
        image, LABEL_SETS["teacher"].box_columns, np.flatnonzero(left_out)
    )
    return boxes[usable]


def student_target(
    image: PseudoImage,
    chosen: Supervision,
    cat_to_label: Mapping[int, int],
    negatives: str = DEFAULTS["student"]["negatives"],
) -> tuple[dict[str, Tensor], int]:
    """The detector target of one pseudo-labeled image under ``chosen`` supervision, and
    how many of its rows were dropped as unusable (non-finite, inverted or empty box after
    clipping to the image, or no label). ``cat_to_label`` maps COCO ids to labels 1..C.
    ``negatives="ignore"`` adds the image's ``ignore_boxes`` (see ``ignore_boxes``)."""
    if negatives not in NEGATIVES:
        raise DplError(f"unknown negatives {negatives!r} (choose from {', '.join(NEGATIVES)})")
    boxes, labels, dropped = _label_set(image, chosen.cls, cat_to_label)
    target = {"boxes": boxes, "labels": labels}
    if chosen.reg is not None:
        reg_boxes, reg_labels, reg_dropped = _label_set(image, chosen.reg, cat_to_label)
        target.update(reg_boxes=reg_boxes, reg_labels=reg_labels)
        dropped = np.union1d(dropped, reg_dropped)
    if negatives == "ignore":
        target[IGNORE_KEY] = ignore_boxes(image, chosen.cls)
    return target, len(dropped)


def used_categories(image: PseudoImage, chosen: Supervision) -> set[int]:
    """The COCO category ids the chosen sets of one image read (finite labels only)."""
    used: set[int] = set()
    for part in (chosen.cls, chosen.reg):
        if part is None:
            continue
        rows = image.rows
        take = slice(None) if part.rows is None else np.asarray(rows[part.rows], bool)
        cats = np.asarray(rows[part.labels][take], dtype=np.float64)
        used.update(int(c) for c in cats[np.isfinite(cats)])
    return used


class StudentRoIHeads(RoIHeads):
    """RoI heads whose classification and box-regression losses come from different
    targets on pseudo-labeled batches (see the module docstring); otherwise torchvision's."""

    @classmethod
    def from_heads(cls, heads: RoIHeads) -> StudentRoIHeads:
        """Student heads sharing ``heads``' modules and settings (same state-dict keys)."""
        if heads.has_mask() or heads.has_keypoint():
            raise DplError("the student supports box-only Faster R-CNN RoI heads")
        student = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
        )
        student.box_coder.bbox_xform_clip = heads.box_coder.bbox_xform_clip
        student.proposal_matcher.allow_low_quality_matches = (
            heads.proposal_matcher.allow_low_quality_matches
        )
        return student.train(heads.training)

    # set by ``StudentCriterion`` for the forward pass of pseudo-labeled images under soft
    # negatives: (sampled proposals, image shapes) -> the teacher's background probability
    background_prob: Callable[[list[Tensor], list[tuple[int, int]]], Tensor] | None = None

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's sampling, except that proposals on a target's ``ignore_boxes``
        (IoU >= the foreground IoU) which no target box claims are left out (label -1)."""
        ignore = [t.get(IGNORE_KEY) for t in targets or []]
        if not any(b is not None and len(b) for b in ignore):
            return super().select_training_samples(proposals, targets)
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        fg_iou = self.proposal_matcher.high_threshold
        for labels_in_image, props, boxes in zip(labels, proposals, ignore, strict=True):
            if boxes is not None:
                on = on_ignore_region(props, boxes, fg_iou) & (labels_in_image == 0)
                labels_in_image[on] = -1  # -1: left out by the sampler
        # the rest as torchvision's select_training_samples
        sampled_inds = self.subsample(labels)
        matched_gt_boxes = []
        for i, inds in enumerate(sampled_inds):
            proposals[i], labels[i], matched_idxs[i] = (
                proposals[i][inds], labels[i][inds], matched_idxs[i][inds]
            )  # fmt: skip
            boxes = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype)
            matched_gt_boxes.append(boxes.to(device)[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets

    def sample_disentangled(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Samples, Samples]:
        """Two samplings of the proposals: (proposals, labels, regression targets) for each of
        the classification targets (with their ignore regions) and the regression targets."""
        cls_keys = ("boxes", "labels", IGNORE_KEY)
        cls_targets = [{k: t[k] for k in cls_keys if k in t} for t in targets]
        reg_targets = [
            {"boxes": t.get("reg_boxes", t["boxes"]), "labels": t.get("reg_labels", t["labels"])}
            for t in targets
        ]
        cls_props, _, cls_labels, cls_reg_t = self.select_training_samples(proposals, cls_targets)
        reg_props, _, reg_labels, reg_reg_t = self.select_training_samples(proposals, reg_targets)
        return (cls_props, cls_labels, cls_reg_t), (reg_props, reg_labels, reg_reg_t)

    def _head(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes
    ) -> tuple[Tensor, Tensor]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    def disentangled_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """``loss_classifier`` from the classification sampling, ``loss_box_reg`` from the
        regression sampling (Faster R-CNN's ``fastrcnn_loss`` for each; one sampling for
        both when no target has ``reg_boxes``). Under soft negatives the classification
        loss is ``soft_classification_loss`` with the teacher's background probabilities."""
        two_sets = any("reg_boxes" in t for t in targets)
        if two_sets:
            (cls_props, cls_labels, cls_reg_t), (reg_props, reg_labels, reg_reg_t) = (
                self.sample_disentangled(proposals, targets)
            )
        else:
            cls_props, _, cls_labels, cls_reg_t = self.select_training_samples(proposals, targets)
        logits, deltas = self._head(features, cls_props, image_shapes)
        loss_classifier, loss_box_reg = fastrcnn_loss(logits, deltas, cls_labels, cls_reg_t)
        if self.background_prob is not None:
            background = self.background_prob(cls_props, image_shapes)
            loss_classifier = soft_classification_loss(logits, torch.cat(cls_labels), background)
        if two_sets:
            logits, deltas = self._head(features, reg_props, image_shapes)
            _, loss_box_reg = fastrcnn_loss(logits, deltas, reg_labels, reg_reg_t)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ):
        own = targets is not None and (
            self.background_prob is not None or any("reg_boxes" in t for t in targets)
        )
        if not self.training or not own:
            return super().forward(features, proposals, image_shapes, targets)
        return [], self.disentangled_losses(features, proposals, image_shapes, targets)


def on_ignore_region(boxes: Tensor, ignore: Tensor, iou: float) -> Tensor:
    """Which of ``boxes`` (proposals or anchors, xyxy) overlap an ignore box at IoU >= ``iou``."""
    if len(ignore) == 0 or len(boxes) == 0:
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    return box_iou(ignore.to(boxes), boxes).max(dim=0).values >= iou


def soft_classification_loss(logits: Tensor, labels: Tensor, background: Tensor) -> Tensor:
    """Soft Teacher's RoI classification loss: cross-entropy of each sampled proposal,
    weighted 1 (foreground) or by the teacher's ``background`` probability (background,
    label 0), summed and divided by the sum of the weights (at least 1)."""
    weights = torch.where(labels > 0, torch.ones_like(background), background.to(logits.dtype))
    loss = F.cross_entropy(logits, labels, reduction="none")
    return (weights * loss).sum() / weights.sum().clamp(min=1.0)


class StudentRPN(RegionProposalNetwork):
    """torchvision's RPN, except that the anchors an ignore box would keep from being
    background, were it a pseudo label, are left out (label -1) unless a target box claims
    them: those at IoU >= the RPN's background IoU (0.3) with it, and its best anchor.
    (At the foreground IoU, 0.7, most small boxes have no anchor at all, and the anchors at
    0.3-0.7, which a pseudo label leaves out, were taught as background.)"""

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork) -> StudentRPN:
        """A student RPN sharing ``rpn``'s modules and settings (same state-dict keys)."""
        student = cls(
            rpn.anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
        )
        student.box_coder, student.min_size = rpn.box_coder, rpn.min_size
        student.proposal_matcher.allow_low_quality_matches = (
            rpn.proposal_matcher.allow_low_quality_matches
        )
        return student.train(rpn.training)

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        bg_iou = self.proposal_matcher.low_threshold
        for labels_in_image, anchors_in_image, t in zip(labels, anchors, targets, strict=True):
            boxes = t.get(IGNORE_KEY)
            if boxes is None or not len(boxes) or not len(anchors_in_image):
                continue
            iou = box_iou(boxes.to(anchors_in_image), anchors_in_image)  # ignore x anchor
            near = iou.max(dim=0).values >= bg_iou
            best = (iou == iou.max(dim=1, keepdim=True).values) & (iou > 0)  # low-quality match
            on = (near | best.any(dim=0)) & (labels_in_image == 0)
            labels_in_image[on] = -1.0
        return labels, matched_gt_boxes


def make_student(model: FasterRCNN) -> FasterRCNN:
    """Give a torchvision Faster R-CNN the student's supervision, in place: the transform
    resizes every ``*boxes`` target key (and makes boxes a training crop cuts off ignore
    regions), the RPN is ``StudentRPN``, the RoI heads are ``StudentRoIHeads``.

    Module names and the state dict are unchanged, so the trained student saves and loads
    as an ordinary detector; inference behaves exactly as before.
    """
    if not isinstance(model.transform, DetectorTransform):
        model.transform = detector_transform(model.transform)
    model.transform.cut_to_ignore = True  # its targets may have ignore regions
    if not isinstance(model.rpn, StudentRPN):
        model.rpn = StudentRPN.from_rpn(model.rpn)
    if not isinstance(model.roi_heads, StudentRoIHeads):
        model.roi_heads = StudentRoIHeads.from_heads(model.roi_heads)
    return model


class TeacherBackground:
    """The frozen teacher's background probability for the student's sampled proposals
    (the weights of soft negatives): the teacher sees each (flipped) image at its own test
    size, the proposals scaled to it, and scores them with its box head (softmax, class 0).
    Costs one teacher backbone pass per pseudo-labeled image and iteration, no gradient."""

    def __init__(self, teacher: FasterRCNN) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(
        self, images: list[Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Background probabilities of ``proposals`` (in the student's resized frames
        ``image_shapes`` of ``images``), concatenated over the images."""
        teacher = self.teacher
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        scaled = [
            p * p.new_tensor([tw / sw, th / sh, tw / sw, th / sh])
            for p, (sh, sw), (th, tw) in zip(
                proposals, image_shapes, batch.image_sizes, strict=True
            )
        ]
        heads = teacher.roi_heads
        pooled = heads.box_roi_pool(features, scaled, batch.image_sizes)
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        return torch.softmax(logits.float(), dim=-1)[:, 0]


class StudentCriterion:
    """The per-batch loss of the training loop (a ``LossFn``): Faster R-CNN losses of the
    labeled images plus ``unlabeled_weight`` times those of the pseudo-labeled images
    (targets flagged ``pseudo``), each set in its own forward pass, keys prefixed
    ``labeled_`` / ``unlabeled_``. With a ``teacher`` (soft negatives) the pseudo-labeled
    images' background proposals are weighted by its background probability."""

    def __init__(
        self, unlabeled_weight: float = 1.0, teacher: TeacherBackground | None = None
    ) -> None:
        self.unlabeled_weight = float(unlabeled_weight)
        self.teacher = teacher

    def __call__(
        self, model: nn.Module, images: list[Tensor], targets: list[dict[str, Any]]
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for name, weight, pseudo in (
            ("labeled", 1.0, False),
            ("unlabeled", self.unlabeled_weight, True),
        ):
            idx = [i for i, t in enumerate(targets) if bool(t.get(PSEUDO_KEY, False)) == pseudo]
            if not idx or (pseudo and weight == 0):
                continue
            part_images = [images[i] for i in idx]
            part_targets = [{k: v for k, v in targets[i].items() if k != PSEUDO_KEY} for i in idx]
            heads = getattr(model, "module", model).roi_heads  # DDP wraps the student
            if pseudo and self.teacher is not None:
                heads.background_prob = partial(self.teacher, part_images)
            try:
                part = model(part_images, part_targets)
            finally:
                heads.background_prob = None
            losses.update({f"{name}_{k}": weight * v for k, v in part.items()})
        return losses


def student_losses(
    unlabeled_weight: float = 1.0, teacher: TeacherBackground | None = None
) -> StudentCriterion:
    """The student's per-batch loss function (``StudentCriterion``)."""
    return StudentCriterion(unlabeled_weight, teacher)
