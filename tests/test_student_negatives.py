"""The unlabeled images' negatives (``--negatives``): ignore regions add no background
loss, ``hard`` is torchvision's (the old) behaviour, ``soft`` weights background by the
teacher's background probability; the reg-only / cls-only ablation views; and the one
table of pseudo-label sets that export, quality and the student read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from test_student_criterion import box, image_rows
from test_train_student import SHIFT, _config, _truth, write_student_inputs
from torchvision.ops import box_iou

from dpl_tools.config import load_config
from dpl_tools.data import export
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_targets import PseudoImage
from dpl_tools.data.pseudo_views import LABEL_SETS
from dpl_tools.engine.train_student import load_student_data, train_student
from dpl_tools.errors import DplError
from dpl_tools.evaluation import pseudo_quality
from dpl_tools.models.detector import build_detector
from dpl_tools.models.student_criterion import (
    IGNORE_KEY,
    SUPERVISION,
    VIEW_SETS,
    StudentCriterion,
    TeacherBackground,
    make_student,
    soft_classification_loss,
    student_target,
    supervision,
)

FAST = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
        "box_batch_size_per_image": 32}  # fmt: skip
KEPT = [8.0, 8.0, 32.0, 32.0]  # a classification pseudo label (use_cls)
UNSURE = [40.0, 36.0, 62.0, 60.0]  # a teacher box not kept for classification


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _student(seed: int = 0):
    torch.manual_seed(seed)
    return make_student(build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)).train()


def _image() -> PseudoImage:
    """One 64x64 image: a kept box (class 1) and an unkept teacher box (class 2)."""
    rows = [
        {**box("teacher", *KEPT), **box("polished", *KEPT), "teacher_label": 1,
         "polished_label": 1, "use_cls": True, "use_reg": True},
        {**box("teacher", *UNSURE), **box("polished", *UNSURE), "teacher_label": 2,
         "polished_label": 2, "use_cls": False, "use_reg": True},
    ]  # fmt: skip
    return image_rows(rows, width=64, height=64)


def _features(model, size: int = 64):
    torch.manual_seed(3)
    with torch.no_grad():
        return model.backbone(torch.rand(1, 3, size, size))


def _proposals() -> torch.Tensor:
    """Proposals: the unsure box itself, near the kept box, and clear background."""
    return torch.tensor(
        [UNSURE, [9.0, 8, 33, 31], [7.0, 9, 31, 33], [0.0, 40, 20, 63], [44.0, 0, 63, 20],
         [20.0, 44, 34, 63], [0.0, 0, 6, 6]]
    )  # fmt: skip


def test_targets_carry_ignore_boxes_only_under_ignore() -> None:
    image = _image()
    full = supervision("polished", True)
    ignore, _ = student_target(image, full, {1: 1, 2: 2}, "ignore")
    hard, _ = student_target(image, full, {1: 1, 2: 2}, "hard")
    soft, _ = student_target(image, full, {1: 1, 2: 2}, "soft")
    torch.testing.assert_close(ignore[IGNORE_KEY], torch.tensor([UNSURE]))
    assert IGNORE_KEY not in hard and IGNORE_KEY not in soft
    assert hard.keys() == soft.keys() == {k for k in ignore if k != IGNORE_KEY}
    for key in hard:
        assert torch.equal(hard[key], ignore[key])
    # a set of every row (raw) leaves nothing out: no ignore region
    raw, _ = student_target(image, supervision("raw"), {1: 1, 2: 2}, "ignore")
    assert raw[IGNORE_KEY].shape == (0, 4)
    with pytest.raises(DplError, match="unknown negatives"):
        student_target(image, full, {1: 1, 2: 2}, "sometimes")


@pytest.mark.parametrize("disentangle", [True, False])
def test_a_proposal_on_an_ignore_box_adds_no_background_loss(disentangle: bool) -> None:
    model = _student()
    heads = model.roi_heads
    features, shapes = _features(model), [(64, 64)]
    chosen = supervision("polished", disentangle)
    target, _ = student_target(_image(), chosen, {1: 1, 2: 2}, "ignore")
    hard = {k: v for k, v in target.items() if k != IGNORE_KEY}
    props = _proposals()

    # hard: the unsure box is a background sample; ignore: it is not sampled at all
    cls_target = {k: target[k] for k in ("boxes", "labels", IGNORE_KEY)}
    sampled, _, labels, _ = heads.select_training_samples([props.clone()], [cls_target])
    on_unsure = (sampled[0] == torch.tensor(UNSURE)).all(dim=1)
    assert not on_unsure.any()
    sampled, _, labels, _ = heads.select_training_samples([props.clone()], [hard])
    on_unsure = (sampled[0] == torch.tensor(UNSURE)).all(dim=1)
    assert on_unsure.sum() == 1 and labels[0][on_unsure].item() == 0

    # the classification loss with the ignore region is the hard loss without that
    # proposal: it contributes nothing (every proposal is sampled here, so no randomness)
    torch.manual_seed(0)
    _, with_ignore = heads(features, [props.clone()], shapes, [target])
    torch.manual_seed(0)
    _, without = heads(features, [props[1:].clone()], shapes, [hard])
    torch.manual_seed(0)
    _, as_background = heads(features, [props.clone()], shapes, [hard])
    torch.testing.assert_close(with_ignore["loss_classifier"], without["loss_classifier"])
    assert not torch.allclose(with_ignore["loss_classifier"], as_background["loss_classifier"])


def test_rpn_leaves_out_anchors_on_ignore_boxes() -> None:
    rpn = _student().rpn
    anchors = [torch.tensor([UNSURE, [0.0, 40, 20, 63], KEPT])]
    target = {"boxes": torch.tensor([KEPT]), "labels": torch.tensor([1])}
    (hard,), _ = rpn.assign_targets_to_anchors(anchors, [target])
    (ignore,), _ = rpn.assign_targets_to_anchors(
        anchors, [{**target, IGNORE_KEY: torch.tensor([UNSURE])}]
    )
    assert hard.tolist() == [0.0, 0.0, 1.0]
    assert ignore.tolist() == [-1.0, 0.0, 1.0]  # -1: not sampled by the RPN


def test_rpn_ignores_every_anchor_a_pseudo_label_would_keep_from_background() -> None:
    """An ignore box leaves out the anchors that the same box as a pseudo label would not
    teach as background: IoU 0.3-0.7 (ignored next to a pseudo label) and its best anchor
    (a low-quality foreground match); far anchors stay background, claimed ones foreground."""
    rpn = _student().rpn
    x1, y1, x2, y2 = UNSURE  # 22 x 24 px
    anchors = torch.tensor([
        [x1, y1, x2 + 12, y2 + 12],  # IoU ~0.43 with UNSURE
        [x1 + 14, y1 + 14, x2 + 14, y2 + 14],  # IoU ~0.09: background either way
        [0.0, 40, 20, 63],  # clear background
        KEPT,  # a pseudo label's own anchor
    ])  # fmt: skip
    iou = box_iou(torch.tensor([UNSURE]), anchors)[0]
    assert 0.3 <= iou[0] < 0.7 and iou[1] < 0.3
    kept = {"boxes": torch.tensor([KEPT]), "labels": torch.tensor([1])}
    (as_label,), _ = rpn.assign_targets_to_anchors(
        [anchors], [{"boxes": torch.tensor([KEPT, UNSURE]), "labels": torch.tensor([1, 2])}]
    )
    (ignored,), _ = rpn.assign_targets_to_anchors(
        [anchors], [{**kept, IGNORE_KEY: torch.tensor([UNSURE])}]
    )
    assert as_label.tolist() == [1.0, 0.0, 0.0, 1.0]  # anchor 0: UNSURE's best (low quality)
    assert ignored.tolist() == [-1.0, 0.0, 0.0, 1.0]


def test_hard_is_torchvision_and_ignore_without_regions_is_hard() -> None:
    """``hard`` (and ``ignore`` on an image with nothing left out) trains exactly as
    torchvision's Faster R-CNN: same losses from the same weights and seed."""
    student = _student()
    torch.manual_seed(0)
    plain = build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST).train()
    images = [torch.rand(3, 64, 64)]
    raw = supervision("raw")
    hard, _ = student_target(_image(), raw, {1: 1, 2: 2}, "hard")
    ignore, _ = student_target(_image(), raw, {1: 1, 2: 2}, "ignore")
    results = []
    for model, target in ((plain, hard), (student, hard), (student, ignore)):
        torch.manual_seed(5)
        results.append(model(images, [dict(target)]))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key in results[0]:
            assert torch.equal(other[key], results[0][key]), key


def test_soft_loss_weights_background_by_the_teacher_probability() -> None:
    logits = torch.tensor([[0.2, 1.0, -0.5], [1.5, 0.1, 0.0], [0.3, 0.3, 2.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 2, 0])
    background = torch.tensor([0.9, 0.25, 0.1, 0.5])  # teacher P(background) per proposal
    ce = F.cross_entropy(logits, labels, reduction="none")
    weights = torch.tensor([1.0, 0.25, 1.0, 0.5])  # foreground 1, background the teacher's
    expected = (weights * ce).sum() / weights.sum()
    torch.testing.assert_close(soft_classification_loss(logits, labels, background), expected)
    # teacher sure of background everywhere: the plain (hard) mean cross-entropy
    torch.testing.assert_close(
        soft_classification_loss(logits, labels, torch.ones(4)), F.cross_entropy(logits, labels)
    )
    # tiny weights: normalised by at least 1, as Soft Teacher's code
    only_bg = torch.tensor([0, 0])
    small = soft_classification_loss(logits[:2], only_bg, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(
        small, (0.1 * F.cross_entropy(logits[:1], only_bg[:1]) + 0.2 * ce[1]) / 1.0
    )


def test_teacher_background_is_its_box_head_softmax_at_its_own_scale() -> None:
    teacher = build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)
    scorer = TeacherBackground(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(1)
    image = torch.rand(3, 48, 48)  # the teacher sees it at 64 px (its test size)
    props = torch.tensor([[4.0, 4, 30, 30], [30.0, 20, 60, 60], [0.0, 0, 64, 64]])
    in_teacher_frame = scorer([image], [props], [(64, 64)])
    # the same proposals in a student frame twice as large: the same probabilities
    in_student_frame = scorer([image], [props * 2], [(128, 128)])
    torch.testing.assert_close(in_student_frame, in_teacher_frame)
    # = softmax class 0 of the teacher's box head on those boxes
    batch, _ = teacher.transform([image])
    heads = teacher.roi_heads
    with torch.no_grad():
        pooled = heads.box_roi_pool(teacher.backbone(batch.tensors), [props], batch.image_sizes)
        logits, _ = heads.box_predictor(heads.box_head(pooled))
    torch.testing.assert_close(in_teacher_frame, logits.softmax(-1)[:, 0])
    assert (
        in_teacher_frame.shape == (3,) and ((in_teacher_frame >= 0) & (in_teacher_frame <= 1)).all()
    )


def test_criterion_uses_the_teacher_only_for_pseudo_labeled_images() -> None:
    model = _student()
    teacher = build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    labeled = {"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([1])}
    pseudo, _ = student_target(_image(), supervision("polished", True), {1: 1, 2: 2}, "soft")
    pseudo = {**pseudo, "pseudo": True}
    calls = []

    class Recording(TeacherBackground):
        def __call__(self, imgs, proposals, shapes):
            calls.append(len(imgs))
            return super().__call__(imgs, proposals, shapes)

    torch.manual_seed(0)
    soft = StudentCriterion(1.0, Recording(teacher))(model, images, [labeled, pseudo])
    torch.manual_seed(0)
    hard = StudentCriterion(1.0)(model, images, [labeled, pseudo])
    assert calls == [1]  # once, for the one pseudo-labeled image
    assert model.roi_heads.background_prob is None  # only set during that forward
    for key in soft:
        if key != "unlabeled_loss_classifier":
            torch.testing.assert_close(soft[key], hard[key])
    assert torch.isfinite(soft["unlabeled_loss_classifier"])
    assert soft["unlabeled_loss_classifier"] != hard["unlabeled_loss_classifier"]


@pytest.fixture(scope="module")
def inputs(synth_dataset, module_dir) -> dict:
    return write_student_inputs(synth_dataset, module_dir("negatives"))


def _first_target(inputs: dict, **student) -> dict:
    scfg = _config(hflip=False, augment="weak", **student)["student"]
    dataset, _ = load_student_data(
        inputs["ann"], inputs["images"], inputs["pseudo"], None, scfg, console=None
    )
    return dataset.unlabeled.targets[0], dataset.unlabeled.items[0].file_name


def test_ablation_views_pick_their_boxes_and_labels(inputs) -> None:
    """Teacher boxes = truth shifted right, polished boxes = truth; the first box of the
    first image is not use_cls (see write_student_inputs)."""
    target, name = _first_target(inputs, pseudo_view="reg-only")
    truth = _truth(inputs["raw"], name)
    shifted = truth + np.array([SHIFT, 0, SHIFT, 0], dtype=np.float32)
    shifted[:, 0::2] = shifted[:, 0::2].clip(0, 128)
    # reg-only: classification from every raw teacher box, regression from polished boxes
    np.testing.assert_allclose(target["boxes"].numpy(), shifted, atol=1e-4)
    np.testing.assert_allclose(target["reg_boxes"].numpy(), truth, atol=1e-4)
    assert target[IGNORE_KEY].shape == (0, 4)  # every teacher box is a pseudo label
    # cls-only: classification pseudo labels (use_cls teacher boxes), regression from raw
    target, _ = _first_target(inputs, pseudo_view="cls-only")
    np.testing.assert_allclose(target["boxes"].numpy(), shifted[1:], atol=1e-4)
    np.testing.assert_allclose(target["reg_boxes"].numpy(), shifted, atol=1e-4)
    np.testing.assert_allclose(target[IGNORE_KEY].numpy(), shifted[:1], atol=1e-4)
    # the full method's ignore region is the same unkept teacher box; hard has none
    target, _ = _first_target(inputs)
    np.testing.assert_allclose(target[IGNORE_KEY].numpy(), shifted[:1], atol=1e-4)
    target, _ = _first_target(inputs, negatives="hard")
    assert IGNORE_KEY not in target
    assert (SUPERVISION[("reg-only", True)].cls, SUPERVISION[("reg-only", True)].reg) == (
        LABEL_SETS["teacher"], LABEL_SETS["reg"])  # fmt: skip
    assert (SUPERVISION[("cls-only", True)].cls, SUPERVISION[("cls-only", True)].reg) == (
        LABEL_SETS["cls"], LABEL_SETS["teacher"])  # fmt: skip


def test_one_table_of_pseudo_label_sets() -> None:
    # the student's pairs name sets of the table; a pair of one set trains as one set
    for (view, disentangle), (cls_set, reg_set) in VIEW_SETS.items():
        chosen = SUPERVISION[(view, disentangle)]
        assert chosen.cls is LABEL_SETS[cls_set]
        assert chosen.reg is (None if reg_set == cls_set else LABEL_SETS[reg_set])
    assert VIEW_SETS[("polished", True)] == ("cls", "reg")
    assert VIEW_SETS[("polished", False)] == ("polished", "polished")
    assert VIEW_SETS[("raw", True)] == ("teacher", "teacher")
    # export and quality read the same table
    assert export.LABEL_SETS is LABEL_SETS and pseudo_quality.LABEL_SETS is LABEL_SETS
    assert set(export.VIEWS) == set(LABEL_SETS) and set(pseudo_quality.VIEWS) <= set(LABEL_SETS)
    assert pseudo_quality.VIEW_TITLES["cls"] == LABEL_SETS["cls"].title
    # behaviour: each export view holds its set's rows, boxes and labels
    rows = {"image_id": [1, 1, 1], "file_name": ["a.png"] * 3, "width": [64] * 3,
            "height": [64] * 3, "status": ["ok"] * 3, "teacher_score": [0.9, 0.6, 0.7],
            "use_cls": [True, False, True], "use_reg": [True, True, False],
            "teacher_label": [1, 2, 3], "polished_label": [4, 5, 6],
            "polisher_prob": [0.9] * 3}  # fmt: skip
    for prefix, shift in (("teacher", 0.0), ("polished", 1.0)):
        for k, c in enumerate(("x1", "y1", "x2", "y2")):
            rows[f"{prefix}_{c}"] = [10.0 * r + k * 5 + shift for r in range(3)]
    table = rows_to_table(rows, {})
    for name, chosen in LABEL_SETS.items():
        take = [i for i in range(3) if chosen.rows is None or rows[chosen.rows][i]]
        got = export.view_boxes(table, name)
        want = [[rows[c][i] for c in chosen.box_columns] for i in take]
        assert got["boxes"].tolist() == want, name
        assert got["labels"].tolist() == [rows[chosen.labels][i] for i in take], name


def test_negatives_setting_and_soft_training(inputs, tmp_path) -> None:
    assert load_config()["student"]["negatives"] == "ignore"
    with pytest.raises(DplError, match="negatives"):
        load_config(None, {"student": {"negatives": "sometimes"}})
    # soft: the --init teacher is loaded, frozen, and scores the unlabeled proposals
    out = tmp_path / "soft.pt"
    args = (inputs["ann"], inputs["images"], inputs["pseudo"], out)
    console = Console(record=True, width=200)
    _, spec, result, stats = train_student(
        *args, _config(1, negatives="soft"), inputs["teacher"], device="cpu", seed=0,
        console=console,
    )  # fmt: skip
    assert np.isfinite(result.last_loss) and spec.extra["negatives"] == "soft"
    assert "unlabeled_loss_classifier" in result.last_losses
    assert "not on a weak view" not in console.export_text()  # weak augmentation: no warning
    strong = _config(1, negatives="soft", pseudo_augment="strong")
    train_student(*args, strong, inputs["teacher"], device="cpu", seed=0, console=console)
    assert "not on a weak view as Soft Teacher does" in console.export_text()
    # ignore (default): the unkept teacher box is counted as an ignore region
    _, _, _, stats = train_student(*args, _config(1), inputs["teacher"], device="cpu", seed=0)
    assert stats.ignore_boxes == 1
    with pytest.raises(DplError, match="--negatives soft needs the teacher"):
        train_student(*args, _config(1, negatives="soft"), "imagenet", device="cpu", seed=0)
