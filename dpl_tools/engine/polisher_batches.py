"""The polishers' training data: each labeled image's noise pairs of the current round
(``NoisePairs``, from ``noise.parquet``, real pairs mixed in at ``real_fraction``), one
pass of the frozen teacher that turns a batch of images and their pairs into the
polishers' inputs (``teacher_batch``: FPN features, sampled pairs and RPN proposals in the
teacher's resized coordinates), the joint loss (``PolisherLoss``: GIoU for regression,
cross-entropy for classification) and the validation figures (``evaluate_polisher``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, generalized_box_iou_loss

from dpl_tools.boxes import decode_deltas
from dpl_tools.data.polisher_pairs import CLS, REAL, REG, mixed_rows, read_noise_metadata
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.models.polisher import Polisher
from dpl_tools.runtime import amp_enabled

_BOX = list(BOX_COORDS)
_TARGET = [f"target_{c}" for c in _BOX]


@dataclass
class ImagePairs:
    """One image's pairs of one round: noisy boxes, targets, labels (original pixels)."""

    reg_boxes: np.ndarray
    reg_targets: np.ndarray
    cls_boxes: np.ndarray
    cls_labels: np.ndarray


class NoisePairs:
    """The pairs of a noise file, one round at a time, indexed by image id. Where the file
    has real pairs (``source`` "real": crossfit or a labeler's detections), each image's
    pairs of each kind are mixed so that real ones make up ``real_fraction`` of them
    (``mixed_rows``)."""

    def __init__(self, path: str | Path, image_ids: set[int], real_fraction: float = 0.5) -> None:
        self.path = Path(path)
        self.meta = read_noise_metadata(self.path)
        self.rounds = int(self.meta.get("rounds", 1))
        self.image_ids = image_ids
        self.real_fraction = real_fraction
        self.has_source = "source" in pq.read_schema(self.path).names
        self._round: int | None = None
        self._pairs: dict[int, ImagePairs] = {}

    def load_round(self, round_: int) -> None:
        """Read round ``round_`` (only its rows, only this run's images) into memory."""
        if round_ == self._round:
            return
        table = pq.read_table(
            self.path,
            columns=["image_id", "kind", *_BOX, *_TARGET, "label"]
            + (["source"] if self.has_source else []),
            filters=[("round", "=", round_)],
        )
        is_real = (
            pc.equal(table["source"], REAL).to_numpy(zero_copy_only=False)
            if self.has_source
            else np.zeros(table.num_rows, bool)
        )
        ids = table["image_id"].to_numpy()
        keep = np.isin(ids, np.fromiter(self.image_ids, np.int64, len(self.image_ids)))
        is_reg = (pc.equal(table["kind"], REG)).to_numpy(zero_copy_only=False)
        boxes = np.stack([table[c].to_numpy() for c in _BOX], 1)
        targets = np.stack([table[c].to_numpy() for c in _TARGET], 1)
        labels = table["label"].to_numpy()
        self._pairs = {}
        for kind_mask, kind in ((is_reg, REG), (~is_reg, CLS)):
            sel = np.flatnonzero(keep & kind_mask)
            order = sel[np.argsort(ids[sel], kind="stable")]
            uniq, starts = np.unique(ids[order], return_index=True)
            bounds = np.append(starts, len(order))
            for k, image_id in enumerate(uniq.tolist()):
                rows = order[bounds[k] : bounds[k + 1]]
                if is_real[rows].any():
                    rng = np.random.default_rng([round_, image_id, kind == REG])
                    rows = rows[mixed_rows(is_real[rows], self.real_fraction, rng)]
                entry = self._pairs.setdefault(
                    image_id,
                    ImagePairs(
                        np.zeros((0, 4), np.float32),
                        np.zeros((0, 4), np.float32),
                        np.zeros((0, 4), np.float32),
                        np.zeros(0, np.int64),
                    ),
                )
                if kind == REG:
                    entry.reg_boxes, entry.reg_targets = boxes[rows], targets[rows]
                else:
                    entry.cls_boxes, entry.cls_labels = boxes[rows], labels[rows].astype(np.int64)
        self._round = round_

    def get(self, image_id: int) -> ImagePairs | None:
        return self._pairs.get(int(image_id))


@dataclass
class PolisherBatch:
    """Training inputs of one step, in the teacher's resized coordinates (per image)."""

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    reg_boxes: list[Tensor]
    reg_targets: list[Tensor]
    cls_boxes: list[Tensor]
    cls_labels: list[Tensor]


def _sample(n: int, cap: int, generator: torch.Generator) -> Tensor:
    if cap <= 0 or n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:cap]


def proposal_labels(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, fg_iou: float
) -> Tensor:
    """Class of the best-IoU GT box if that IoU >= ``fg_iou``, else background (0)."""
    if len(gt_boxes) == 0:
        return torch.zeros(len(proposals), dtype=torch.int64, device=proposals.device)
    best_iou, best = box_iou(proposals, gt_boxes).max(dim=1)
    return torch.where(best_iou >= fg_iou, gt_labels[best], torch.zeros_like(best))


@torch.no_grad()
def teacher_batch(
    teacher: FasterRCNN,
    images: list[Tensor],
    targets: list[dict],
    pairs: list[ImagePairs | None],
    reg_cap: int,
    cls_cap: int,
    max_proposals: int,
    fg_iou: float,
    generator: torch.Generator,
) -> PolisherBatch:
    """One frozen-teacher pass (features + RPN proposals) and the sampled pairs of a batch."""
    device = images[0].device
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        proposals, _ = teacher.rpn(batch, features) if max_proposals > 0 else ([], None)
    features = {k: v.float() for k, v in features.items()}
    sizes = [tuple(s) for s in batch.image_sizes]
    out = PolisherBatch(features, sizes, [], [], [], [])
    for i, (image, target, p) in enumerate(zip(images, targets, pairs, strict=True)):
        original, resized = tuple(image.shape[-2:]), sizes[i]

        def scaled(boxes: np.ndarray, original=original, resized=resized) -> Tensor:
            t = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).to(device)
            return resize_boxes(t, original, resized)

        empty = torch.zeros((0, 4), device=device)
        if p is None:
            reg_b, reg_t, cls_b = empty, empty, empty
            cls_l = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            k = _sample(len(p.reg_boxes), reg_cap, generator).numpy()
            reg_b, reg_t = scaled(p.reg_boxes[k]), scaled(p.reg_targets[k])
            cls_b = scaled(p.cls_boxes)
            cls_l = torch.from_numpy(p.cls_labels).to(device)
        if max_proposals > 0:
            props = proposals[i][:max_proposals].float()
            gt = resize_boxes(target["boxes"].to(device), original, resized)
            labels = proposal_labels(props, gt, target["labels"].to(device), fg_iou)
            cls_b, cls_l = torch.cat([cls_b, props]), torch.cat([cls_l, labels])
        k = _sample(len(cls_b), cls_cap, generator).to(device)
        out.reg_boxes.append(reg_b)
        out.reg_targets.append(reg_t)
        out.cls_boxes.append(cls_b[k])
        out.cls_labels.append(cls_l[k])
    return out


class PolisherLoss(nn.Module):
    """Both polishers' losses for a ``PolisherBatch`` (a module, so DDP can wrap it)."""

    def __init__(self, polisher: Polisher) -> None:
        super().__init__()
        self.polisher = polisher

    def forward(self, b: PolisherBatch) -> dict[str, Tensor]:
        pol = self.polisher
        zero = sum(p.sum() * 0.0 for p in pol.parameters())  # every parameter joins the graph
        losses = {"reg": zero, "cls": zero}
        if sum(len(x) for x in b.reg_boxes):
            deltas = pol.regression(pol.vote_features(b.features, b.reg_boxes, b.image_sizes))
            decoded = decode_deltas(deltas.float(), torch.cat(b.reg_boxes))
            target = torch.cat(b.reg_targets)
            losses["reg"] = zero + generalized_box_iou_loss(decoded, target, reduction="mean")
        if sum(len(x) for x in b.cls_boxes):
            logits = pol.classification(pol.box_features(b.features, b.cls_boxes, b.image_sizes))
            losses["cls"] = zero + F.cross_entropy(logits.float(), torch.cat(b.cls_labels))
        return losses


@torch.no_grad()
def evaluate_polisher(polisher: Polisher, batches: Iterable[PolisherBatch]) -> dict[str, Any]:
    """Mean IoU to GT of the noisy boxes before / after regression polishing, and the
    classification accuracy, foreground recall (right class) and background recall.
    ``batches`` may be a generator: only per-box results are kept, not the features."""
    polisher.eval()
    before, after, correct, labels = [], [], [], []
    for b in batches:
        if sum(len(x) for x in b.reg_boxes):
            refined = polisher.regress(b.features, b.reg_boxes, b.image_sizes)
            for box, new, target in zip(b.reg_boxes, refined, b.reg_targets, strict=True):
                before.append(box_iou(box, target).diagonal())
                after.append(box_iou(new, target).diagonal())
        if sum(len(x) for x in b.cls_boxes):
            probs = polisher.classify(b.features, b.cls_boxes, b.image_sizes)
            for p, lab in zip(probs, b.cls_labels, strict=True):
                correct.append(p.argmax(dim=1) == lab)
                labels.append(lab)
    result: dict[str, Any] = {"reg_pairs": 0, "cls_samples": 0}
    if before:
        b_iou, a_iou = torch.cat(before), torch.cat(after)
        result.update(
            reg_pairs=len(b_iou),
            mean_iou_before=float(b_iou.mean()),
            mean_iou_after=float(a_iou.mean()),
            improved_fraction=float((a_iou > b_iou).float().mean()),
        )
    if correct:
        ok, lab = torch.cat(correct), torch.cat(labels)
        fg, bg = lab > 0, lab == 0
        result.update(
            cls_samples=len(ok),
            foreground_samples=int(fg.sum()),
            cls_accuracy=float(ok.float().mean()),
            fg_recall=float(ok[fg].float().mean()) if fg.any() else None,
            bg_recall=float(ok[bg].float().mean()) if bg.any() else None,
        )
    return result
