"""Disentangled supervision: classification targets only from use_cls boxes, regression
targets only from use_reg boxes (DESIGN, 'Disentangled use by the student'). Targets come
from the production builder, ``student_target``, as in the student's dataset."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import MultiScaleRoIAlign, box_iou

from dpl_tools.data.pseudo_targets import ROW_COLUMNS, PseudoImage
from dpl_tools.models.student_criterion import (
    StudentRoIHeads,
    make_student,
    student_target,
    supervision,
)
from dpl_tools.models.transform import DetectorTransform

LABELS = {1: 1, 2: 2, 3: 3}  # COCO ids = detector labels here


def pseudo_target(cls_box, cls_label, reg_box=None, reg_label=None, size=(128, 128)) -> dict:
    """The disentangled target of an image with one classification-only pseudo label
    (teacher box, polished label) and, unless ``reg_box`` is None, one regression-only one
    (polished box, teacher label), built by ``student_target`` as the dataset does, with
    hard negatives (under the default ``ignore`` the regression-only box, not kept for
    classification, would be an ignore region: tests/test_student_negatives.py)."""
    boxes = [cls_box] + ([] if reg_box is None else [reg_box])
    n = len(boxes)
    rows = {c: np.full(n, np.nan, np.float32) for c in ROW_COLUMNS}
    rows["use_cls"], rows["use_reg"] = np.arange(n) == 0, np.arange(n) == 1
    for k, c in enumerate(("x1", "y1", "x2", "y2")):
        rows[f"teacher_{c}"][:] = rows[f"polished_{c}"][:] = [b[k] for b in boxes]
    rows["teacher_label"][:] = reg_label or 0
    rows["polished_label"][:] = cls_label
    image = PseudoImage("x.png", size[1], size[0], rows)
    target, dropped = student_target(image, supervision("polished", True), LABELS, "hard")
    assert dropped == 0
    return target


def _tiny_detector(num_classes: int = 3) -> FasterRCNN:
    body = torch.nn.Sequential()
    body.add_module("c1", torch.nn.Conv2d(3, 8, 3, stride=4, padding=1))
    backbone = BackboneWithFPN(body, {"c1": "0"}, [8], 16)
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    anchors = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    return FasterRCNN(
        backbone,
        num_classes=num_classes + 1,
        min_size=128,
        max_size=128,
        box_roi_pool=pool,
        rpn_anchor_generator=anchors,
    )


def _jitter_around(box: torch.Tensor, n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    wh = (box[2:] - box[:2]).repeat(2)
    return box + torch.randn(n, 4, generator=gen) * scale * wh


def test_cls_and_reg_targets_come_from_their_own_pseudo_labels() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = make_student(_tiny_detector())
    heads: StudentRoIHeads = model.roi_heads
    cls_box = torch.tensor([10.0, 10.0, 50.0, 50.0])
    reg_box = torch.tensor([70.0, 60.0, 120.0, 110.0])
    proposals = torch.cat(
        [
            _jitter_around(cls_box, 40, 0.05, gen),
            _jitter_around(reg_box, 40, 0.05, gen),
            torch.tensor([[0.0, 80.0, 30.0, 120.0]]),
        ]
    )
    target = pseudo_target(cls_box.tolist(), 1, reg_box.tolist(), 2)
    (c_props, c_labels, _), (r_props, r_labels, r_deltas) = heads.sample_disentangled(
        [proposals], [target]
    )
    c_props, c_labels = c_props[0], c_labels[0]
    r_props, r_labels, r_deltas = r_props[0], r_labels[0], r_deltas[0]

    c_pos = c_labels > 0
    assert c_pos.sum() > 10
    assert torch.all(c_labels[c_pos] == 1)
    assert torch.all(box_iou(c_props[c_pos], cls_box[None])[:, 0] >= 0.5)
    # proposals around the regression-only box are background for classification
    near_reg = box_iou(c_props, reg_box[None])[:, 0] >= 0.5
    assert near_reg.any() and torch.all(c_labels[near_reg] == 0)

    r_pos = r_labels > 0
    assert r_pos.sum() > 10
    assert torch.all(r_labels[r_pos] == 2)
    decoded = heads.box_coder.decode(r_deltas[r_pos], [r_props[r_pos]]).reshape(-1, 4)
    torch.testing.assert_close(decoded, reg_box.expand_as(decoded), atol=1e-3, rtol=0)
    near_cls = box_iou(r_props, cls_box[None])[:, 0] >= 0.5
    assert near_cls.any() and torch.all(r_labels[near_cls] == 0)


def test_transform_resizes_regression_pseudo_labels_with_the_image() -> None:
    transform = DetectorTransform(64, 64, [0.0] * 3, [1.0] * 3)
    image = torch.rand(3, 32, 32)
    target = pseudo_target([4.0, 4.0, 12.0, 12.0], 1, [8.0, 2.0, 16.0, 30.0], 1, size=(32, 32))
    _, (out,) = transform([image], [target])
    scale = 64 / 32
    torch.testing.assert_close(out["boxes"], torch.tensor([[4.0, 4.0, 12.0, 12.0]]) * scale)
    torch.testing.assert_close(out["reg_boxes"], torch.tensor([[8.0, 2.0, 16.0, 30.0]]) * scale)


def test_student_trains_on_mixed_labeled_and_pseudo_labeled_targets() -> None:
    torch.manual_seed(0)
    model = make_student(_tiny_detector())
    model.train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    labeled = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}
    pseudo = pseudo_target([20.0, 20.0, 80.0, 70.0], 2)  # no regression pseudo label
    assert pseudo["reg_boxes"].shape == (0, 4)
    losses = model(images, [labeled, pseudo])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.roi_heads.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # inference is the plain detector's
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
