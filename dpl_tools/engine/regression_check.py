"""Does the regression polisher improve the teacher's real boxes? Checked, not assumed.

The polisher's own validation uses synthetic noise pairs; when the noise is fitted on weak
fold teachers' large errors it can look excellent there and still move the real teacher's
small errors the wrong way. So after training, the (EMA) polisher refines the out-of-fold
detections of the images held out from its training (``polisher.val_fraction``), and each
detection that matches a true box (IoU >= 0.5, class-agnostic) is a real pair: its IoU
before and after polishing. If polishing lowers their mean IoU, or improves fewer than
half of them, the regression pseudo labels fall back to the teacher's own boxes
(``dpl polish`` then uses ``reg_steps`` 0). With fewer than ``min_pairs`` pairs nothing
can be told: the polisher stays, and the record says it was not validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from dpl_tools.engine.fit_thresholds import HeldOutImage

MIN_PAIRS = 10
MATCH_IOU = 0.5
POLISHER, TEACHER = "polisher", "teacher boxes"


def real_pair_ious(images: Sequence[HeldOutImage]) -> tuple[np.ndarray, np.ndarray]:
    """(IoU before, IoU after polishing) with its best-matching true box, for every
    detection of ``images`` that matches one at IoU >= 0.5."""
    before, after = [], []
    for im in images:
        if not len(im.boxes) or not len(im.gt_boxes) or im.polished_boxes is None:
            continue
        gt = torch.as_tensor(im.gt_boxes, dtype=torch.float64).reshape(-1, 4)
        iou = box_iou(torch.as_tensor(im.boxes, dtype=torch.float64).reshape(-1, 4), gt)
        best, which = iou.max(dim=1)
        m = best >= MATCH_IOU
        if not m.any():
            continue
        polished = torch.as_tensor(im.polished_boxes, dtype=torch.float64).reshape(-1, 4)[m]
        after.append(box_iou(polished, gt[which[m]]).diagonal().numpy())
        before.append(best[m].numpy())
    if not before:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(before), np.concatenate(after)


def check_regression(images: Sequence[HeldOutImage], min_pairs: int = MIN_PAIRS) -> dict[str, Any]:
    """The regression check's record (module docstring): ``choice`` (``polisher`` or
    ``teacher boxes``), ``reg_steps`` for ``dpl polish``, ``validated``, ``reason`` and
    the figures behind it (``pairs``, mean IoU before / after, improved fraction)."""
    before, after = real_pair_ious(images)
    record: dict[str, Any] = {"images": len(images), "pairs": int(len(before))}
    if len(before) < min_pairs:
        why = f"{len(before)} real pair(s) on {len(images)} held-out image(s) < {min_pairs}"
        return {**record, "choice": POLISHER, "reg_steps": 1, "validated": False, "reason": why}
    mean_b, mean_a = float(before.mean()), float(after.mean())
    improved = float((after > before).mean())
    record.update(
        mean_iou_before=round(mean_b, 4), mean_iou_after=round(mean_a, 4),
        improved_fraction=round(improved, 4), validated=True,
    )  # fmt: skip
    if mean_a < mean_b or improved < 0.5:
        why = (
            f"polishing made the real boxes worse: mean IoU {mean_b:.3f} -> {mean_a:.3f}, "
            f"{improved:.0%} improved"
        )
        return {**record, "choice": TEACHER, "reg_steps": 0, "reason": why}
    why = f"mean IoU {mean_b:.3f} -> {mean_a:.3f}, {improved:.0%} improved"
    return {**record, "choice": POLISHER, "reg_steps": 1, "reason": why}


def resolve_reg_steps(given: int | None, check: dict[str, Any] | None) -> tuple[int, str]:
    """The regression passes ``dpl polish`` uses and where they came from: the user's
    (flag or config), else the polisher's regression check (``reg_steps`` 0 when it found
    polishing worse), else 1."""
    if given is not None:
        return int(given), "user"
    if check is None:
        return 1, "default (polisher not checked on real pairs)"
    source = f"regression check: {check['choice']} ({check['reason']})"
    return int(check.get("reg_steps", 1)), source
