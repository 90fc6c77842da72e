"""Fitting the keep rule's thresholds on held-out detections (issue: classification
pseudo labels that keep the objects)."""

from __future__ import annotations

import numpy as np

from dpl_tools.engine.fit_thresholds import HeldOutImage, fit_keep_thresholds
from dpl_tools.engine.keep_rule import select_pseudo_labels


def _image(rng: np.random.Generator, n_true: int = 3, n_false: int = 2) -> HeldOutImage:
    """True objects: teacher score 0.6-0.8, polisher sure (0.7); false boxes elsewhere with
    the same teacher scores and a doubtful polisher (0.2). One true object has the wrong
    teacher label, which the polisher has right."""
    gt = np.array([[10 + 40 * i, 10, 40 + 40 * i, 40] for i in range(n_true)], float)
    gt_labels = np.array([1 + i % 2 for i in range(n_true)])
    false = np.array([[10 + 40 * i, 200, 40 + 40 * i, 230] for i in range(n_false)], float)
    boxes = np.concatenate([gt + rng.uniform(-1, 1, gt.shape), false])
    teacher_labels = np.concatenate([gt_labels, np.ones(n_false, int)])
    teacher_labels[0] = 3  # a confusion the polisher fixes
    scores = rng.uniform(0.6, 0.8, n_true + n_false)
    probs = np.concatenate([np.full(n_true, 0.7), np.full(n_false, 0.2)])
    polisher_labels = np.concatenate([gt_labels, teacher_labels[n_true:]])
    return HeldOutImage(boxes, teacher_labels, scores, polisher_labels, probs, gt, gt_labels)


def test_paper_rule_is_exact_at_its_boundaries():
    labels, scores = np.array([1, 1, 1, 1, 1]), np.array([0.95, 0.9, 0.5, 0.5, 0.89])
    plabels, probs = np.array([2, 2, 2, 2, 2]), np.array([0.1, 0.9, 0.9, 0.89, 0.95])
    choice = select_pseudo_labels(labels, scores, plabels, probs, 0.9, 0.9)
    kept, out = choice.use_cls, choice.labels
    # s > 0.9 keeps; p >= 0.9 keeps; s == 0.9 alone does not; relabel needs s < 0.9
    assert kept.tolist() == [True, True, True, False, True]
    assert out.tolist() == [1, 1, 2, 1, 2]


def test_fitted_point_keeps_true_objects_the_paper_rule_drops():
    rng = np.random.default_rng(0)
    images = [_image(rng) for _ in range(8)]
    # nothing clears 0.9 / 0.9: best F1 0, so the fit falls back to keeping every box
    paper = fit_keep_thresholds(
        images, cls_prob_grid=[0.9], teacher_score_grid=[0.9], min_matches=0
    )
    assert paper.is_fallback and "best F1 0" in paper.source
    assert paper.kept == paper.detections == sum(len(im.teacher_scores) for im in images)
    fitted = fit_keep_thresholds(images, min_matches=0)
    assert fitted.source == "fitted" and not fitted.is_fallback
    assert 0.2 < fitted.cls_prob <= 0.7  # separates the polisher's 0.7 from its 0.2
    assert fitted.precision == 1.0 and fitted.recall == 1.0  # relabelled confusions count
    assert fitted.kept == 24 and fitted.gt_boxes == 24 and fitted.images == 8
    assert fitted.to_dict()["f1"] == 1.0


def test_precision_target_picks_the_best_recall_that_reaches_it():
    rng = np.random.default_rng(1)
    images = [_image(rng, n_true=2, n_false=2) for _ in range(4)]
    for im in images:  # one false box looks true to the polisher, but not to the teacher
        im.polisher_probs[-1] = 0.7
        im.teacher_scores[:2] = [0.8, 0.85]
        im.teacher_scores[-1] = 0.62
    loose = fit_keep_thresholds(images, precision_target=0.5, min_matches=0)
    strict = fit_keep_thresholds(images, precision_target=0.99, min_matches=0)
    assert loose.precision >= 0.5 and loose.recall == 1.0
    assert strict.precision >= 0.99 and strict.recall < loose.recall
    assert strict.objective.startswith("recall at precision")


def test_duplicates_count_once():
    gt = np.array([[0, 0, 10, 10]], float)
    im = HeldOutImage(np.array([[0, 0, 10, 10], [0, 0, 10, 10.5]]), np.array([1, 1]),
                      np.array([0.8, 0.7]), np.array([1, 1]), np.array([0.95, 0.95]),
                      gt, np.array([1]))  # fmt: skip
    fitted = fit_keep_thresholds([im], cls_prob_grid=[0.9], teacher_score_grid=[0.9], min_matches=0)
    assert fitted.kept == 2 and fitted.precision == 0.5 and fitted.recall == 1.0


def test_too_few_matches_fall_back_to_keeping_every_box():
    rng = np.random.default_rng(0)
    images = [_image(rng) for _ in range(8)]  # 3 true boxes each: 24 matched < 30
    fallback = fit_keep_thresholds(images)
    assert fallback.is_fallback and fallback.matched == 24
    assert fallback.source == "fallback keep_all (24 matched box(es) < 30)"
    assert (fallback.cls_prob, fallback.teacher_score) == (1.0, 0.0)
    total = sum(len(im.teacher_scores) for im in images)
    assert fallback.kept == total and fallback.recall == 2 / 3  # no relabel: 1 of 3 wrong
    record = fallback.to_dict()
    assert record["keep_rule_source"] == fallback.source and record["matched"] == 24
    paper = fit_keep_thresholds(images, fallback="paper")
    assert (paper.cls_prob, paper.teacher_score) == (0.9, 0.9) and paper.source.startswith(
        "fallback paper"
    )
    assert not fit_keep_thresholds(images, min_matches=24).is_fallback
