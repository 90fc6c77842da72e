"""The classification keep rule (paper: relabel if p >= cls_prob and s < teacher_score; keep
if p >= cls_prob or s > teacher_score), alone and inside polishing's second step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import resize_boxes

from dpl_tools.engine.keep_rule import select_pseudo_labels
from dpl_tools.engine.polish import PolishSettings, detect, detect_and_polish, polish_boxes
from dpl_tools.models.detector import build_detector, set_test_settings
from dpl_tools.models.polisher import Polisher

CP, TS = 0.9, 0.9  # the paper's thresholds
BELOW, ABOVE = np.nextafter(np.float32(0.9), np.float32(0)), np.nextafter(np.float32(0.9), 1)


def paper_rule(p: np.float32, s: np.float32) -> tuple[bool, bool]:
    """(kept, relabelled) of one box, written from the paper's sentence (compared in the
    scores' float32, as polishing does)."""
    cp, ts = np.float32(CP), np.float32(TS)
    return bool(p >= cp or s > ts), bool(p >= cp and s < ts)


# p and s at, just below and just above the thresholds, and far from them
VALUES = [0.0, 0.5, float(BELOW), 0.9, float(ABOVE), 1.0]
CASES = list(itertools.product(VALUES, VALUES))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_rule_is_the_papers_exactly_at_and_around_the_thresholds(backend) -> None:
    p = np.array([c[0] for c in CASES], np.float32)
    s = np.array([c[1] for c in CASES], np.float32)
    teacher_labels = np.full(len(CASES), 1)
    polisher_labels = np.full(len(CASES), 2)
    args = (teacher_labels, s, polisher_labels, p)
    if backend == "torch":
        args = tuple(torch.from_numpy(a) for a in args)
    choice = select_pseudo_labels(*args, cls_prob=CP, teacher_score=TS)
    use_cls, relabelled = np.asarray(choice.use_cls), np.asarray(choice.relabelled)
    labels = np.asarray(choice.labels)
    for k, (pk, sk) in enumerate(CASES):
        kept, relabel = paper_rule(np.float32(pk), np.float32(sk))
        assert (bool(use_cls[k]), bool(relabelled[k])) == (kept, relabel), (pk, sk)
        assert labels[k] == (2 if relabel else 1)


def test_boundary_cases_spelled_out() -> None:
    def verdict(p: float, s: float) -> tuple[bool, bool, int]:
        c = select_pseudo_labels(
            torch.tensor([3]), torch.tensor([s]), torch.tensor([5]), torch.tensor([p]), CP, TS
        )
        return bool(c.use_cls[0]), bool(c.relabelled[0]), int(c.labels[0])

    assert verdict(0.9, 0.5) == (True, True, 5)  # p == cls_prob counts as confident
    assert verdict(0.89, 0.5) == (False, False, 3)  # not confident, low score: dropped
    assert verdict(0.95, 0.9) == (True, False, 3)  # s == teacher_score: not relabelled
    assert verdict(0.5, 0.9) == (False, False, 3)  # ... and not kept on its score alone
    assert verdict(0.5, 0.91) == (True, False, 3)  # s > teacher_score: kept, teacher's label
    assert verdict(0.95, 0.95) == (True, False, 3)  # both sure: the teacher's label stays
    # relabelling to the class the teacher already gave is no change of label
    c = select_pseudo_labels(torch.tensor([5]), torch.tensor([0.5]), torch.tensor([5]),
                             torch.tensor([0.99]), CP, TS)  # fmt: skip
    assert bool(c.relabelled[0]) and int(c.labels[0]) == 5


def test_thresholds_are_arguments_not_constants() -> None:
    labels, scores = np.array([1, 1, 1]), np.array([0.55, 0.65, 0.95])
    c = select_pseudo_labels(labels, scores, np.array([2, 2, 2]), np.array([0.6, 0.4, 0.4]),
                             cls_prob=0.5, teacher_score=0.6)  # fmt: skip
    np.testing.assert_array_equal(c.use_cls, [True, True, True])
    np.testing.assert_array_equal(c.labels, [2, 1, 1])
    c = select_pseudo_labels(labels, scores, np.array([2, 2, 2]), np.array([0.6, 0.4, 0.4]),
                             cls_prob=0.7, teacher_score=0.7)  # fmt: skip
    np.testing.assert_array_equal(c.use_cls, [False, False, True])
    np.testing.assert_array_equal(c.labels, [1, 1, 1])


def _confident_polisher(num_classes: int, fg_class: int, prob: float) -> Polisher:
    """A real polisher whose regression keeps every box and whose classifier gives every
    box the foreground class ``fg_class`` (1..C) with probability ``prob``."""
    polisher = Polisher(num_classes)
    with torch.no_grad():
        polisher.regression.delta.weight.zero_()
        polisher.regression.delta.bias.zero_()
        polisher.classification.cls.weight.zero_()
        rest = (1 - prob) / num_classes
        logits = torch.full((num_classes + 1,), float(np.log(rest)))
        logits[fg_class] = float(np.log(prob))
        polisher.classification.cls.bias.copy_(logits)
    return polisher.eval()


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = build_detector("mobilenet_v2_fpn", 3, "none", min_size=64, max_size=96,
                           rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20)  # fmt: skip
    set_test_settings(model, 0.0, 0.5, 5)
    return model.eval()


def test_external_boxes_enter_at_the_second_step(teacher) -> None:
    """polish_boxes takes any detector's boxes on the teacher's features: the rule decides
    use_cls and the labels, boxes come back in original pixels."""
    torch.manual_seed(0)
    image = torch.rand(3, 48, 64)  # resized by the teacher to 64 x 85
    settings = PolishSettings(initial_thresh=0.0)
    d = detect(teacher, [image], settings)
    to_features = resize_boxes  # external boxes: original pixels -> the features' coords
    boxes = torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 10.0, 60.0, 40.0], [8, 20, 40, 44]])
    scores = torch.tensor([0.95, 0.9, 0.5])
    labels = torch.tensor([1, 1, 1])
    for prob, expected_use, expected_labels in (
        (0.95, [True, True, True], [1, 1, 3]),  # confident: kept; low score relabelled
        (0.5, [True, False, False], [1, 1, 1]),  # unsure: only s > 0.9 kept
    ):
        polisher = _confident_polisher(3, fg_class=3, prob=prob)
        (out,) = polish_boxes(
            d.features, [to_features(boxes, d.original_sizes[0], d.image_sizes[0])], [scores],
            [labels], d.image_sizes, d.original_sizes, polisher, settings,
        )  # fmt: skip
        assert out["use_cls"].tolist() == expected_use
        assert out["polished_labels"].tolist() == expected_labels
        assert out["labels"].tolist() == [1, 1, 1] and out["use_reg"].all()
        torch.testing.assert_close(out["probs"], torch.full((3,), prob), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["boxes"], boxes, atol=1e-4, rtol=0)
        torch.testing.assert_close(out["polished_boxes"], boxes, atol=1e-3, rtol=0)


def test_detect_then_polish_boxes_is_detect_and_polish(teacher) -> None:
    torch.manual_seed(1)
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 40)]
    settings = PolishSettings(initial_thresh=0.0, cls_prob=0.5, teacher_score=0.3)
    polisher = Polisher(3).eval()
    d = detect(teacher, images, settings)
    for b, s, lab in zip(d.boxes, d.scores, d.labels, strict=True):
        assert len(b) == len(s) == len(lab)
    split = polish_boxes(d.features, d.boxes, d.scores, d.labels, d.image_sizes,
                         d.original_sizes, polisher, settings)  # fmt: skip
    whole = detect_and_polish(teacher, polisher, images, settings)
    for a, b in zip(split, whole, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) or (a[key].isnan().all() and b[key].isnan().all())
    # without a polisher, the polished view is the teacher's and every box is kept
    (plain, _) = polish_boxes(d.features, d.boxes, d.scores, d.labels, d.image_sizes,
                              d.original_sizes, None, settings)  # fmt: skip
    assert torch.equal(plain["polished_boxes"], plain["boxes"]) and plain["use_cls"].all()
    assert plain["probs"].isnan().all()
