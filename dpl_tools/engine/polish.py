"""The polish job: teacher detections on unlabeled images, polished, streamed to Parquet.

Images are decoded in DataLoader workers and run through the teacher in batches (AMP on
GPU). The polishers reuse the same forward pass's FPN features (no second backbone
pass): teacher boxes kept at the initial threshold are refined by the regression
polisher and re-classified by the classification polisher, in the teacher's transformed
coordinates, then mapped back to the original image. Two steps: ``detect`` (the teacher)
and ``polish_boxes`` (any detector's boxes on the teacher's features; the keep rule is
``keep_rule.select_pseudo_labels``). Options: ``tta`` (teacher passes on the flipped and
rescaled images, fused by weighted box fusion: ``engine.tta``) and ``reg_steps`` (the
regression polisher applied as a cascade). The job over many images, written to Parquet, is
``dpl_tools.engine.polish_job``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes

from dpl_tools.data.detections import ImageDetections
from dpl_tools.defaults import DEFAULTS
from dpl_tools.engine.keep_rule import PAPER_CLS_PROB, PAPER_TEACHER_SCORE, select_pseudo_labels
from dpl_tools.engine.tta import augmented_detections, fuse_passes, tta_augmentations
from dpl_tools.models.detector import set_test_settings
from dpl_tools.runtime import amp_enabled
from dpl_tools.settings import settings_from_section


class Refiner(Protocol):
    """What the job needs of the polishers (``dpl_tools.models.polisher.Polisher``)."""

    def refine(
        self, features: dict, boxes_per_image: list[torch.Tensor], image_sizes: list
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def regress(
        self, features: dict, boxes_per_image: list[torch.Tensor], image_sizes: list
    ) -> list[torch.Tensor]: ...


_RESOLVED = ("cls_prob", "teacher_score", "reg_steps")  # null: resolved from the polisher


@dataclass
class PolishSettings:
    """Test-time teacher settings and the polishing thresholds (defaults: the ``polish``
    section of ``dpl_tools.defaults``, DESIGN's values)."""

    score_thresh: float = DEFAULTS["polish"]["score_thresh"]
    nms_thresh: float = DEFAULTS["polish"]["nms_thresh"]
    detections_per_img: int = DEFAULTS["polish"]["detections_per_img"]
    initial_thresh: float = DEFAULTS["polish"]["initial_thresh"]
    cls_prob: float = PAPER_CLS_PROB  # the config's null: see ``keep_thresholds.resolve``
    teacher_score: float = PAPER_TEACHER_SCORE
    reg_steps: int = 1  # the config's null: the polisher's regression check decides
    tta: bool = DEFAULTS["polish"]["tta"]
    tta_scales: list[float] = field(default_factory=lambda: list(DEFAULTS["polish"]["tta_scales"]))
    tta_fusion_iou: float = DEFAULTS["polish"]["tta_fusion_iou"]

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> PolishSettings:
        """The settings of a ``polish`` config section (other keys ignored; a null
        cls_prob / teacher_score, "from the polisher", gives the paper's value here:
        ``dpl polish`` resolves them with ``keep_thresholds.resolve_keep_thresholds``)."""
        given = {k: v for k, v in section.items() if v is not None or k not in _RESOLVED}
        return settings_from_section(cls, given)

    def thresholds(self) -> dict[str, float]:
        """The metadata form, ``{"initial": .., "cls_prob": .., "teacher_score": .., ...}``."""
        return {
            "test_score": self.score_thresh,
            "test_nms": self.nms_thresh,
            "test_max_dets": self.detections_per_img,
            "initial": self.initial_thresh,
            "cls_prob": self.cls_prob,
            "teacher_score": self.teacher_score,
            "reg_steps": self.reg_steps,
            "tta": int(self.tta),  # 0/1: metadata thresholds are numbers
            **self._tta_thresholds(),
        }

    def _tta_thresholds(self) -> dict[str, float]:
        """With ``tta``: the fusion IoU and each extra scale (``tta_scale_1``, ...)."""
        if not self.tta:
            return {}
        scales = {f"tta_scale_{i}": s for i, s in enumerate(self.tta_scales, 1)}
        return {"tta_fusion_iou": self.tta_fusion_iou, **scales}


@dataclass
class TeacherDetections:
    """The teacher's pass over a batch: its FPN features and its detections kept at the
    initial threshold, boxes in the teacher's transformed coordinates (as the features)."""

    features: dict[str, torch.Tensor]
    image_sizes: list[tuple[int, int]]  # transformed (the features' coordinates)
    original_sizes: list[tuple[int, int]]  # of the input images
    boxes: list[torch.Tensor]  # float xyxy, one tensor per image
    scores: list[torch.Tensor]
    labels: list[torch.Tensor]  # 1..C


@torch.inference_mode()
def detect(
    teacher: FasterRCNN, images: list[torch.Tensor], settings: PolishSettings
) -> TeacherDetections:
    """Teacher detections with score >= the initial threshold, and the features they came
    from. ``images``: float CHW tensors in 0..1 on the model's device (AMP on GPU). The
    teacher's test-time score threshold, NMS and detections per image are ``settings``'
    here, so ``dpl polish``, the online teacher and its evaluation slice detect alike."""
    set_test_settings(
        teacher, settings.score_thresh, settings.nms_thresh, settings.detections_per_img
    )
    device = images[0].device
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        proposals, _ = teacher.rpn(batch, features)
        detections, _ = teacher.roi_heads(features, proposals, batch.image_sizes)
        if settings.tta:
            detections = _tta_detections(teacher, images, detections, batch.image_sizes, settings)
        kept = [d["scores"] >= settings.initial_thresh for d in detections]
        boxes = [d["boxes"][k].float() for d, k in zip(detections, kept, strict=True)]
    return TeacherDetections(
        features=features,
        image_sizes=list(batch.image_sizes),
        original_sizes=original_sizes,
        boxes=boxes,
        scores=[d["scores"][k].float() for d, k in zip(detections, kept, strict=True)],
        labels=[d["labels"][k] for d, k in zip(detections, kept, strict=True)],
    )


def _tta_detections(
    teacher: FasterRCNN,
    images: list[torch.Tensor],
    detections: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """The plain pass's ``detections`` (in the transformed ``image_sizes``) fused by WBF
    with the TTA passes (flip, ``tta_scales``), back in the transformed coordinates."""
    originals = [tuple(im.shape[-2:]) for im in images]
    plain = [
        {
            **d,
            "boxes": resize_boxes(d["boxes"].float(), size_t, size_o),
            "scores": d["scores"].float(),
        }
        for d, size_t, size_o in zip(detections, image_sizes, originals, strict=True)
    ]
    passes = [plain]
    passes += [
        augmented_detections(teacher, images, a) for a in tta_augmentations(settings.tta_scales)
    ]
    fused = fuse_passes(passes, settings.tta_fusion_iou, settings.detections_per_img)
    return [
        {**d, "boxes": resize_boxes(d["boxes"], size_o, size_t)}
        for d, size_t, size_o in zip(fused, image_sizes, originals, strict=True)
    ]


@torch.inference_mode()
def polish_boxes(
    features: dict[str, torch.Tensor],
    boxes: list[torch.Tensor],
    scores: list[torch.Tensor],
    labels: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    polisher: Refiner | None,
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """The polished view of boxes from any detector, on the teacher's ``features``.

    ``boxes`` (float xyxy), ``scores`` and ``labels`` (1..C) per image, in the features'
    coordinates (``image_sizes``; map other boxes there with ``resize_boxes`` first).
    Regression pseudo labels: every box, refined; classification pseudo labels: the
    ``select_pseudo_labels`` rule. Per image, CPU tensors in original pixels
    (``original_sizes``): ``boxes``, ``scores``, ``labels``, ``polished_boxes``,
    ``polished_labels`` (the rule's labels), ``polisher_labels`` (the polisher's best
    foreground class) and ``probs`` (its probability), ``use_cls``, ``use_reg``.
    Without a polisher the polished view equals the input (teacher-only timing). With
    ``settings.reg_steps`` N > 1 the regression polisher runs N times, each refined box
    (its RoI features pooled again) the next input; classification uses the input box.
    With 0 the regression pseudo labels are the input boxes (the regression check's
    fallback: ``engine.regression_check``).
    """
    if polisher is not None:
        device = next(iter(features.values())).device
        with torch.autocast(device.type, enabled=amp_enabled(device)):
            if settings.reg_steps == 0:  # the teacher's own boxes as regression labels
                refined = boxes
                probs = polisher.classify(features, boxes, image_sizes)
            else:
                refined, probs = polisher.refine(features, boxes, image_sizes)
            for _ in range(settings.reg_steps - 1):  # a cascade: re-pooled at the new box
                refined = polisher.regress(features, [r.float() for r in refined], image_sizes)
    out = []
    for i, (score, label) in enumerate(zip(scores, labels, strict=True)):
        if polisher is None:
            polished, best = boxes[i], torch.full_like(score, float("nan"))
            polished_labels, use_cls = label, torch.ones_like(score, dtype=torch.bool)
            own = label  # no polisher class: its rows are written with a null one
        else:
            polished = refined[i].float()
            best, cls = probs[i].float()[:, 1:].max(dim=1)
            choice = select_pseudo_labels(
                label, score, cls + 1, best, settings.cls_prob, settings.teacher_score
            )
            polished_labels, use_cls, own = choice.labels, choice.use_cls, cls + 1
        size_t, size_o = image_sizes[i], original_sizes[i]
        out.append(
            {
                "boxes": resize_boxes(boxes[i], size_t, size_o).cpu(),
                "scores": score.cpu(),
                "labels": label.cpu(),
                "polished_boxes": resize_boxes(polished, size_t, size_o).cpu(),
                "polished_labels": polished_labels.cpu(),
                "polisher_labels": own.cpu(),
                "probs": best.cpu(),
                "use_cls": use_cls.cpu(),
                "use_reg": torch.ones_like(use_cls).cpu(),
            }
        )
    return out


def detect_and_polish(
    teacher: FasterRCNN,
    polisher: Refiner | None,
    images: list[torch.Tensor],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """Teacher detections (score >= initial threshold) and their polished view for a batch:
    ``detect`` then ``polish_boxes`` (see there for the output)."""
    d = detect(teacher, images, settings)
    return polish_boxes(
        d.features, d.boxes, d.scores, d.labels, d.image_sizes, d.original_sizes, polisher,
        settings,
    )  # fmt: skip


@torch.inference_mode()
def polish_detections(
    teacher: FasterRCNN,
    polisher: Refiner | None,
    images: list[torch.Tensor],
    given: list[ImageDetections],
    cat_to_label: dict[int, int],
    settings: PolishSettings,
) -> list[dict[str, torch.Tensor]]:
    """Another labeler's detections (``given``, one per image, dpl category ids) polished on
    the teacher's features: one backbone pass, no teacher heads. Boxes are clipped to their
    image and kept at the initial threshold on the labeler's scores; output as ``polish_boxes``.
    """
    device = images[0].device
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
    boxes, scores, labels = [], [], []
    for det, (height, width), size_t in zip(given, original_sizes, batch.image_sizes, strict=True):
        b, s, c = det.pixel_boxes(width, height)
        keep = s >= settings.initial_thresh
        pixels = torch.as_tensor(b[keep], dtype=torch.float32, device=device).reshape(-1, 4)
        boxes.append(resize_boxes(pixels, (height, width), tuple(size_t)))
        scores.append(torch.as_tensor(s[keep], dtype=torch.float32, device=device))
        cls = [cat_to_label[int(cat)] for cat in c[keep]]
        labels.append(torch.as_tensor(cls, dtype=torch.int64, device=device))
    return polish_boxes(
        features, boxes, scores, labels, list(batch.image_sizes), original_sizes, polisher,
        settings,
    )  # fmt: skip
