"""The classification keep rule: which teacher boxes become classification pseudo labels.

The paper's rule (DESIGN, "Polishing unlabeled images", step 3), with p the classification
polisher's highest foreground probability and s the teacher's score of a box:

* relabel: the label becomes the polisher's class if ``p >= cls_prob`` and ``s < teacher_score``;
* keep: the box is a classification pseudo label if ``p >= cls_prob`` or ``s > teacher_score``.

So a box the teacher scores exactly ``teacher_score`` is neither relabelled nor kept on its
score alone. Comparisons happen in the scores' precision (float32 in polishing: torch and
numpy cast a Python float threshold to the array's dtype). ``select_pseudo_labels`` is
pure (no model, no settings object): it works on torch tensors or numpy arrays alike, so
polishing, threshold fitting and tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)

# The paper's thresholds (set for a strong COCO teacher): ``dpl polish --keep-rule paper``,
# and the fallback when a polisher holds no fitted thresholds.
PAPER_CLS_PROB = 0.9
PAPER_TEACHER_SCORE = 0.9


@dataclass(frozen=True)
class PseudoLabelChoice(Generic[Array]):
    """The rule's verdict on N boxes: the classification label of each (the polisher's
    class where relabelled), whether it is kept (``use_cls``) and whether it was relabelled
    (where the polisher's class equals the teacher's, the label does not change)."""

    labels: Array
    use_cls: Array
    relabelled: Array


def select_pseudo_labels(
    teacher_labels: Array,
    teacher_scores: Array,
    polisher_labels: Array,
    polisher_probs: Array,
    cls_prob: float,
    teacher_score: float,
) -> PseudoLabelChoice[Array]:
    """The paper's keep/relabel rule for N boxes (see the module docstring).

    ``teacher_labels`` / ``polisher_labels`` in one label space (the polisher's best
    foreground class), ``polisher_probs`` its probability, ``teacher_scores`` the teacher's.
    """
    confident = polisher_probs >= cls_prob
    relabelled = confident & (teacher_scores < teacher_score)
    use_cls = confident | (teacher_scores > teacher_score)
    if isinstance(teacher_labels, torch.Tensor):
        labels = torch.where(relabelled, polisher_labels, teacher_labels)
    else:
        labels = np.where(relabelled, polisher_labels, teacher_labels)
    return PseudoLabelChoice(labels=labels, use_cls=use_cls, relabelled=relabelled)
