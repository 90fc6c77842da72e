"""The student detector's disentangled supervision (the paper's section on using pseudo labels).

On an unlabeled image a student learns from two sets of pseudo labels:

* classification pseudo labels (``boxes`` / ``labels`` in the target): the teacher's boxes
  whose class the classification polisher confirmed; they drive the RPN and the RoI
  classification loss;
* regression pseudo labels (``reg_boxes`` / ``reg_labels``): the boxes refined by the
  regression polisher; they drive only the RoI box-regression loss.

As in the official code, the RoI head samples the student's proposals twice, once
matched against each set, and keeps only the matching loss of each sampling. A target
without ``reg_boxes`` (a labeled image) uses its ground truth for both.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

# (sampled proposals, their labels, their regression targets), one list entry per image
Samples = tuple[list[Tensor], list[Tensor], list[Tensor]]


class PseudoLabelTransform(GeneralizedRCNNTransform):
    """torchvision's resize/normalize transform that also resizes ``reg_boxes``."""

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        original_size = list(image.shape[-2:])
        image, target = super().resize(image, target)
        if target is not None and "reg_boxes" in target:
            target["reg_boxes"] = resize_boxes(
                target["reg_boxes"], original_size, list(image.shape[-2:])
            )
        return image, target


class DisentangledRoIHeads(RoIHeads):
    """RoI heads whose classification and box-regression losses come from different targets."""

    @classmethod
    def from_heads(cls, heads: RoIHeads) -> DisentangledRoIHeads:
        """Re-class an existing RoIHeads in place (same modules, same state-dict keys)."""
        heads.__class__ = cls
        return heads  # type: ignore[return-value]

    def sample_disentangled(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[
        tuple[list[Tensor], list[Tensor], list[Tensor]],
        tuple[list[Tensor], list[Tensor], list[Tensor]],
    ]:
        """Two samplings of the proposals: (proposals, labels, regression targets) for each of
        the classification targets and the regression targets."""
        cls_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
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

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ):
        if not self.training or targets is None or not any("reg_boxes" in t for t in targets):
            return super().forward(features, proposals, image_shapes, targets)
        (cls_props, cls_labels, cls_reg_t), (reg_props, reg_labels, reg_reg_t) = (
            self.sample_disentangled(proposals, targets)
        )
        logits, deltas = self._head(features, cls_props, image_shapes)
        loss_classifier, _ = fastrcnn_loss(logits, deltas, cls_labels, cls_reg_t)
        logits, deltas = self._head(features, reg_props, image_shapes)
        _, loss_box_reg = fastrcnn_loss(logits, deltas, reg_labels, reg_reg_t)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def make_disentangled(model: FasterRCNN) -> FasterRCNN:
    """Give a torchvision Faster R-CNN disentangled pseudo-label supervision, in place.

    Module names and the state dict are unchanged, so the trained student saves and loads
    as an ordinary detector; inference behaves exactly as before.
    """
    t = model.transform
    model.transform = PseudoLabelTransform(
        t.min_size,
        t.max_size,
        t.image_mean,
        t.image_std,
        size_divisible=t.size_divisible,
        fixed_size=t.fixed_size,
    )
    DisentangledRoIHeads.from_heads(model.roi_heads)
    return model


def pseudo_label_target(
    cls_boxes: Tensor, cls_labels: Tensor, reg_boxes: Tensor, reg_labels: Tensor
) -> dict[str, Tensor]:
    """The training target of one unlabeled image under disentangled supervision."""
    return {
        "boxes": cls_boxes.float().reshape(-1, 4),
        "labels": cls_labels.long().reshape(-1),
        "reg_boxes": reg_boxes.float().reshape(-1, 4),
        "reg_labels": reg_labels.long().reshape(-1),
    }
