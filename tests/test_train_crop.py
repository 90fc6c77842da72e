"""Training crops (``train_crop``): every box set moves with the random window and stays on
its pixels, mostly-cut boxes leave with their labels, inference sees whole images, seeded
crops repeat, and the teacher trains on crops end to end."""

from __future__ import annotations

import pytest
import torch

from dpl_tools.config import load_config
from dpl_tools.engine.train_detector import train_teacher
from dpl_tools.engine.train_student import train_student
from dpl_tools.errors import DplError
from dpl_tools.models.detector import build_detector
from dpl_tools.models.student_criterion import make_student
from dpl_tools.models.transform import DetectorTransform, set_train_crop
from dpl_tools.pipeline import load_run_config
from dpl_tools.report.augment_preview import training_samples

SIZE = 100  # test images are 100 x 100 and the transform's size is 100: resize is identity


def _transform(crop: int | None) -> DetectorTransform:
    t = DetectorTransform(SIZE, SIZE, [0.0] * 3, [1.0] * 3)
    t.train_crop = crop
    return t.train()


def _painted(boxes: list[list[float]]) -> torch.Tensor:
    """A black image with each box's pixels painted in its own grey level (1-based)."""
    image = torch.zeros(3, SIZE, SIZE)
    for i, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        image[:, int(y0) : int(y1), int(x0) : int(x1)] = i / 10
    return image


def test_crop_moves_every_box_set_onto_its_pixels() -> None:
    cls = [[10.0, 10.0, 30.0, 30.0], [60.0, 55.0, 90.0, 80.0]]
    reg = [[40.0, 10.0, 55.0, 40.0]]
    ignore = [[15.0, 60.0, 35.0, 95.0]]
    image = _painted(cls + reg + ignore)
    target = {
        "boxes": torch.tensor(cls),
        "labels": torch.tensor([1, 2]),
        "reg_boxes": torch.tensor(reg),
        "reg_labels": torch.tensor([3]),
        "ignore_boxes": torch.tensor(ignore),
    }
    transform = _transform(48)
    seen = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = transform.resize(image.clone(), {k: v.clone() for k, v in target.items()})
        assert out.shape == (3, 48, 48)
        assert len(t["labels"]) == len(t["boxes"]) and len(t["reg_labels"]) == len(t["reg_boxes"])
        # each box's painted grey: classification boxes by label, then regression, ignore
        greys = {"boxes": [g / 10 for g in t["labels"].tolist()],
                 "reg_boxes": [0.3] * len(t["reg_boxes"]),
                 "ignore_boxes": [0.4] * len(t["ignore_boxes"])}  # fmt: skip
        for key, levels in greys.items():
            for box, grey in zip(t[key], levels, strict=True):
                x0, y0, x1, y1 = box.round().int().tolist()
                assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
                patch = out[0, y0:y1, x0:x1]
                assert torch.allclose(patch, torch.full_like(patch, grey)), (seed, key)
                seen += 1
    assert seen > 40  # the windows kept many boxes


@pytest.mark.parametrize("student", [False, True])
def test_mostly_cut_boxes_leave_with_their_labels_for_ignore_regions(student: bool) -> None:
    # the image's pixels hold their own coordinates, so each output tells its window
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    image = torch.stack([xs, ys, xs]).float() / 1000
    boxes = torch.tensor(
        [[5.0, 5.0, 25.0, 25.0], [30.0, 30.0, 70.0, 70.0], [60.0, 10.0, 95.0, 40.0]]
    )
    labels = torch.tensor([1, 2, 3])
    transform = _transform(40)
    transform.cut_to_ignore = student  # the student's transform (make_student sets it)
    kinds = set()
    for seed in range(60):
        torch.manual_seed(seed)
        target = {"boxes": boxes.clone(), "labels": labels, "ignore_boxes": boxes.clone()}
        out, t = transform.resize(image, target)
        left, top = round(float(out[0, 0, 0]) * 1000), round(float(out[1, 0, 0]) * 1000)
        window = torch.tensor([left, top, left, top])
        inside = (boxes - window).clamp(0, 40)
        width, height = inside[:, 2] - inside[:, 0], inside[:, 3] - inside[:, 1]
        wide = (width >= 1) & (height >= 1)
        visible = width * height / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        kept = wide & (visible >= 0.3)
        assert t["labels"].tolist() == labels[kept].tolist(), seed
        torch.testing.assert_close(t["boxes"], inside[kept])
        # ignore regions stay while any of them is in the window; the student's boxes cut
        # to less than min_visible join them
        ignore = [inside[wide], inside[wide & ~kept]] if student else [inside[wide]]
        torch.testing.assert_close(t["ignore_boxes"], torch.cat(ignore))
        kinds.update(
            ("kept" if k else "cut" if w else "gone", bool(0 < v < 1))
            for k, w, v in zip(kept, wide, visible, strict=True)
        )
    # the draws covered whole boxes, boxes cut but kept, and boxes cut too much
    assert {("kept", False), ("kept", True), ("cut", True)} <= kinds


def test_windows_reach_the_image_border() -> None:
    # centre drawn over the image, window pushed inside: a 40 px window of 100 px touches
    # each border in about 40 / (2 x 100) = 20% of draws (uniform corners: 1 in 61)
    transform = _transform(40)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    image = torch.stack([xs, ys, xs]).float() / 1000
    torch.manual_seed(0)
    lefts = []
    for _ in range(400):
        out, _ = transform.resize(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        lefts.append(round(float(out[0, 0, 0]) * 1000))
    at_left = sum(x == 0 for x in lefts) / len(lefts)
    at_right = sum(x == SIZE - 40 for x in lefts) / len(lefts)
    assert 0.14 < at_left < 0.26 and 0.14 < at_right < 0.26
    assert len(set(lefts)) > 40  # and every position in between


def test_no_crop_at_inference_or_on_a_small_image_and_seeded_crops_repeat() -> None:
    image = torch.rand(3, SIZE, SIZE)
    target = {"boxes": torch.tensor([[10.0, 10.0, 90.0, 90.0]]), "labels": torch.tensor([1])}
    transform = _transform(200)  # larger than the image: the whole image
    out, t = transform.resize(image, dict(target))
    assert out.shape == image.shape and torch.equal(t["boxes"], target["boxes"])
    transform = _transform(50).eval()
    out, _ = transform.resize(image, dict(target))
    assert out.shape == image.shape
    transform.train()
    crops = []
    for _ in range(2):
        torch.manual_seed(7)
        crops.append(transform.resize(image, dict(target))[0])
    assert crops[0].shape == (3, 50, 50) and torch.equal(crops[0], crops[1])


def _teacher_config(crop: int | None) -> dict:
    return load_config(
        None,
        {
            "model": {"arch": "mobilenet_v2_fpn", "min_size": 96, "max_size": 128,
                      "detector_kwargs": {"rpn_pre_nms_top_n_train": 200,
                                          "rpn_post_nms_top_n_train": 100,
                                          "box_batch_size_per_image": 32}},
            "teacher": {"iters": 2, "batch_size": 2, "workers": 0, "warmup_iters": 1,
                        "checkpoint_every": 0, "multiscale": None, "train_crop": crop},
        },
    )  # fmt: skip


def test_teacher_trains_on_crops_and_infers_on_whole_images(synth_dataset, tmp_path, monkeypatch):
    images = synth_dataset.parent / "images"
    shapes: list[tuple[int, int]] = []
    crop = DetectorTransform.crop

    def spy(self, image, target):
        out, t = crop(self, image, target)
        shapes.append(tuple(out.shape[-2:]))
        return out, t

    monkeypatch.setattr(DetectorTransform, "crop", spy)
    model, spec, result = train_teacher(
        synth_dataset, images, tmp_path / "t.pt", _teacher_config(64), "cpu", seed=0
    )
    assert result.iterations == 2
    # 128 x 96 images resized to 128 x 96 (min_size 96), then 64 x 64 windows, 2 per step
    assert shapes == [(64, 64)] * 4
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform([torch.rand(3, 96, 128)])
    assert batch.image_sizes == [(96, 128)]


def test_soft_negatives_and_crops_are_refused_when_the_config_is_read(tmp_path) -> None:
    with pytest.raises(DplError, match="negatives soft cannot train on crops"):
        load_config(None, {"student": {"negatives": "soft", "train_crop": 64}})
    # a dpl run config: refused when it is read, naming the file, before any stage
    run = tmp_path / "run.yaml"
    run.write_text(
        f"data: {{ann: {tmp_path}/a.json, images: {tmp_path}}}\n"
        "student: {negatives: soft, train_crop: 320}\n"
    )
    with pytest.raises(DplError, match=r"run.yaml: student.negatives soft cannot train on crops"):
        load_run_config(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # and a config that did not come through load_config, at the student's start
    config = load_config()
    config = {**config, "student": {**config["student"], "negatives": "soft", "train_crop": 64}}
    with pytest.raises(DplError, match="train_crop"):
        train_student(tmp_path / "a.json", tmp_path, None, tmp_path / "s.pt", config, "imagenet")


def test_reversed_pairs_are_refused_naming_the_file(tmp_path) -> None:
    with pytest.raises(DplError, match=r"--set: student.aug_scale: expected \[low, high\]"):
        load_config(None, None, {"student": {"aug_scale": [1.4, 0.6]}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {aug_erase_size: [0.3, 0.1]}\n")
    with pytest.raises(DplError, match=r"bad.yaml: teacher.aug_erase_size: expected \[low, high\]"):
        load_config(bad)
    with pytest.raises(DplError, match=r"aug_erase_patches: expected \[low, high\]"):
        load_config(None, None, {"student": {"aug_erase_patches": [1, 2, 3]}})


def test_the_student_keeps_ignore_regions_for_cut_boxes_when_crops_are_set() -> None:
    teacher = build_detector("mobilenet_v2_fpn", 2, "none", min_size=64, max_size=64)
    set_train_crop(teacher, 32)
    assert teacher.transform.train_crop == 32 and not teacher.transform.cut_to_ignore
    student = make_student(build_detector("mobilenet_v2_fpn", 2, "none", min_size=64, max_size=64))
    set_train_crop(student, 32, 0.5)  # what train_detector does after make_student
    t = student.transform
    assert (t.train_crop, t.min_visible, t.cut_to_ignore) == (32, 0.5, True)


def test_show_augment_draws_the_training_windows(synth_dataset) -> None:
    config = _teacher_config(48)
    samples, _ = training_samples(
        synth_dataset, synth_dataset.parent / "images", config, "teacher", count=4
    )
    assert len(samples) == 4
    for image, target in samples:
        assert tuple(image.shape[-2:]) == (48, 48)  # 128 x 96 images at min_size 96
        boxes = target["boxes"]
        assert len(target["labels"]) == len(boxes)
        assert bool((boxes >= 0).all() and (boxes[:, 2:] <= 48).all())
