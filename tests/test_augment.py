"""Training augmentation: every box set moves with its image, erased boxes leave the loss,
seeded runs repeat, mixup / mosaic keep their boxes, and ``dpl show --augment`` draws it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpl_tools.config import load_config
from dpl_tools.data.augment import (
    AugmentSettings,
    DetectionAugment,
    box_sets,
    erased_fraction,
    mix_samples,
    mixup,
    mosaic,
    training_augment,
)
from dpl_tools.errors import DplError

ROOT = Path(__file__).resolve().parents[1]
H, W = 96, 128
# three box sets, one object each, drawn in distinct grey levels on a black image
OBJECTS = {
    "boxes": ([[10.0, 12.0, 40.0, 50.0], [70.0, 20.0, 100.0, 40.0]], 1.0),
    "reg_boxes": ([[50.0, 55.0, 80.0, 85.0]], 0.8),
    "ignore_boxes": ([[100.0, 60.0, 120.0, 90.0]], 0.65),
}


def _scene() -> tuple[torch.Tensor, dict]:
    image = torch.zeros(3, H, W)
    target = {"labels": torch.tensor([1, 2]), "reg_labels": torch.tensor([3]), "image_id": 7}
    for key, (boxes, level) in OBJECTS.items():
        target[key] = torch.tensor(boxes)
        for x1, y1, x2, y2 in boxes:
            image[:, int(y1) : int(y2), int(x1) : int(x2)] = level
    return image, target


NO_COLOUR_NO_ERASE = AugmentSettings(colour_prob=0.0, erase_patches=(0, 0))


def _pixels_box(image: torch.Tensor, level: float, box: list[float]) -> list[float]:
    """Tight box of the pixels of ``level`` (+-0.04) near ``box`` (its 6 px margin)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    y0, x0 = max(0, y1 - 6), max(0, x1 - 6)
    window = image[0, y0 : y2 + 6, x0 : x2 + 6]
    ys, xs = torch.nonzero((window - level).abs() < 0.04, as_tuple=True)
    assert len(ys), f"no pixels of level {level} near {box}"
    return [float(xs.min() + x0), float(ys.min() + y0), float(xs.max() + x0 + 1),
            float(ys.max() + y0 + 1)]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_every_box_set_stays_on_its_pixels_after_strong_geometry(seed: int) -> None:
    augment = DetectionAugment("strong", NO_COLOUR_NO_ERASE)
    torch.manual_seed(seed)
    image, target = augment(*_scene())
    assert image.shape[-2:] == (H, W) and target["image_id"] == 7
    moved = False
    for key, (boxes, level) in OBJECTS.items():
        assert len(target[key]) <= len(boxes)
        for box in target[key].tolist():
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            found = _pixels_box(image, level, box)
            # the box covers the drawn object's pixels (interpolation blurs edges by ~1 px)
            assert max(abs(a - b) for a, b in zip(found, box, strict=True)) <= 2.5, (key, box)
        moved |= not torch.equal(target[key], torch.tensor(boxes)[: len(target[key])])
    assert len(target["labels"]) == len(target["boxes"])
    assert len(target["reg_labels"]) == len(target["reg_boxes"])
    assert moved  # the affine always acts (geometric_prob 1)


def test_boxes_pushed_out_of_the_image_are_dropped_with_their_labels() -> None:
    # scale 1, shift by a fixed 60% of the side: the left-hand objects leave the image
    settings = dataclasses.replace(NO_COLOUR_NO_ERASE, hflip=False, scale=(1.0, 1.0),
                                   translate=0.6)  # fmt: skip
    augment = DetectionAugment("strong", settings)
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = augment(*_scene())
        for key, (_, level) in OBJECTS.items():
            for box in target[key].tolist():
                visible = _pixels_box(image, level, box)
                area = (visible[2] - visible[0]) * (visible[3] - visible[1])
                full = (box[2] - box[0]) * (box[3] - box[1])
                assert area >= 0.9 * full  # a kept box was clipped to what is visible
        if len(target["boxes"]) < 2:
            assert len(target["labels"]) == len(target["boxes"])
            return
    pytest.fail("no seed shifted a box out of the image")


def test_student_boxes_mostly_pushed_out_become_ignore_regions() -> None:
    settings = dataclasses.replace(NO_COLOUR_NO_ERASE, hflip=False, scale=(1.0, 1.0),
                                   translate=0.6)  # fmt: skip
    teacher, student = (
        DetectionAugment("strong", settings),
        DetectionAugment("strong", settings, cut_to_ignore=True),
    )
    slivers = 0
    for seed in range(30):
        torch.manual_seed(seed)
        _, dropped = teacher(*_scene())
        torch.manual_seed(seed)
        image, kept = student(*_scene())
        # the same draw: the same boxes kept; every extra ignore region lies on what is left
        # of a classification or regression object (its grey level, 1.0 or 0.8)
        assert torch.equal(kept["boxes"], dropped["boxes"])
        assert torch.equal(kept["reg_boxes"], dropped["reg_boxes"])
        extra = kept["ignore_boxes"][len(dropped["ignore_boxes"]) :]
        for x1, y1, x2, y2 in extra.round().int().tolist():
            patch = image[0, y1:y2, x1:x2]
            assert patch.numel() and (
                torch.allclose(patch, torch.ones_like(patch))
                or torch.allclose(patch, torch.full_like(patch, 0.8))
            )
        slivers += len(extra)
    assert slivers > 0  # some draws left an object partly, and too little, in the image


def test_erased_boxes_leave_the_loss_and_the_rest_stay() -> None:
    patches = torch.tensor([[0.0, 0.0, 45.0, 55.0]])  # covers the first box whole
    image, target = _scene()
    covered = erased_fraction(target["boxes"], patches, (H, W))
    assert covered[0] == pytest.approx(1.0) and covered[1] == pytest.approx(0.0)
    box, patch = torch.tensor([[0.0, 0.0, 20.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    half = erased_fraction(box, patch, (H, W))
    assert half[0] == pytest.approx(0.5)

    # one patch the size of the image: every box is erased, so it leaves its set (an ignore
    # region stays one)
    whole = dataclasses.replace(NO_COLOUR_NO_ERASE, erase_patches=(1, 1), erase_size=(1.0, 1.0),
                                geometric_prob=0.0, erase_fill="grey")  # fmt: skip
    out_image, out = DetectionAugment("strong", whole)(image, target)
    assert torch.allclose(out_image, torch.full_like(out_image, 0.5))
    assert len(out["boxes"]) == len(out["reg_boxes"]) == 0
    assert len(out["labels"]) == 0 and len(out["reg_labels"]) == 0
    assert out["ignore_boxes"].tolist() == OBJECTS["ignore_boxes"][0]
    # the student's augmentation makes the erased boxes ignore regions instead
    _, out = DetectionAugment("strong", whole, cut_to_ignore=True)(image, target)
    assert len(out["boxes"]) == len(out["reg_boxes"]) == len(out["labels"]) == 0
    every = [b for boxes, _ in OBJECTS.values() for b in boxes]
    assert sorted(out["ignore_boxes"].tolist()) == sorted(every)

    # small patches: a box stays unless at least erase_drop of it is grey
    some = dataclasses.replace(whole, erase_patches=(3, 3), erase_size=(0.2, 0.3))
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out = DetectionAugment("strong", some)(*_scene())
        for box in out["boxes"].tolist():
            x1, y1, x2, y2 = (int(v) for v in box)
            grey = ((out_image[0, y1:y2, x1:x2] - 0.5).abs() < 1e-6).float().mean()
            assert grey < some.erase_drop

    # the default fill is noise: the erased image is random pixels, not a flat colour
    noisy = dataclasses.replace(whole, erase_fill="noise")
    out_image, out = DetectionAugment("strong", noisy)(image, target)
    assert out_image.std() > 0.2 and 0.0 <= float(out_image.min()) <= float(out_image.max()) <= 1.0
    assert len(out["boxes"]) == 0


def test_seeded_augmentation_repeats_and_seeds_differ() -> None:
    augment = DetectionAugment("strong")
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(augment(*_scene()))
    assert torch.equal(runs[0][0], runs[1][0])
    for key in OBJECTS:
        assert torch.equal(runs[0][1][key], runs[1][1][key])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_strong_augmentation_is_float32_inside_a_training_steps_autocast() -> None:
    """The online loop augments inside the training step's autocast: the result (image,
    every box set, what is dropped) is the one outside it, in float32. Under float16
    autocast torchvision's affine rounded the image to 0/1 and a large box's area
    overflowed, which dropped the box."""
    image, target = _scene()
    image = image * 0.8 + 0.1 * torch.rand_like(image)  # not a two-level image
    target["boxes"] = torch.cat([target["boxes"], torch.tensor([[0.0, 0.0, 127.0, 95.0]])])
    target["labels"] = torch.cat([target["labels"], torch.tensor([4])])
    big = torch.zeros(3, 2 * 300, 2 * 300)  # a box of 600 x 600 px: 360,000 > float16's max
    big_target = {"boxes": torch.tensor([[0.0, 0.0, 600.0, 600.0]]), "labels": torch.tensor([1])}
    augment = DetectionAugment("strong", AugmentSettings(scale=(0.9, 1.1), translate=0.02))
    for picture, boxes in ((image, target), (big, big_target)):
        torch.manual_seed(5)
        want = augment(picture, boxes)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.float16):
            got = augment(picture, boxes)
        assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
        for key in box_sets(want[1]):
            assert got[1][key].dtype == torch.float32
            assert torch.equal(got[1][key], want[1][key])
    assert len(want[1]["boxes"]) == 1  # the large box is kept


def test_weak_is_a_flip_only() -> None:
    image, target = _scene()
    flips = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out = DetectionAugment("weak")(image, target)
        if torch.equal(out_image, image):
            assert all(torch.equal(out[k], target[k]) for k in OBJECTS)
        else:
            flips += 1
            assert torch.equal(out_image, image.flip(-1))
            for key in OBJECTS:
                expected = target[key][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1])
                torch.testing.assert_close(out[key], expected + torch.tensor([W, 0, W, 0]))
    assert 0 < flips < 10


def test_mosaic_tiles_four_images_and_shifts_their_boxes() -> None:
    parts = [_scene() for _ in range(4)]
    canvas, target = mosaic(parts)
    assert canvas.shape == (3, 2 * H, 2 * W)
    assert len(target["boxes"]) == 8 and len(target["labels"]) == 8
    assert len(target["reg_boxes"]) == 4 and len(target["ignore_boxes"]) == 4
    # the fourth tile (bottom right) holds the first box shifted by (W, H)
    first = torch.tensor(OBJECTS["boxes"][0][0])
    torch.testing.assert_close(target["boxes"][6], first + torch.tensor([W, H, W, H]))
    for box in target["boxes"].tolist():
        assert _pixels_box(canvas, 1.0, box) == pytest.approx(box, abs=0.5)


def test_mixup_blends_images_and_keeps_both_box_sets() -> None:
    a, b = _scene(), _scene()
    b = (b[0].flip(-1), {**b[1], "boxes": b[1]["boxes"][:1], "labels": b[1]["labels"][:1]})
    image, target = mixup(a, b, 0.6)
    torch.testing.assert_close(image, 0.6 * a[0] + 0.4 * b[0])
    assert len(target["boxes"]) == 3 and len(target["labels"]) == 3
    torch.manual_seed(0)
    unchanged = mix_samples(a, lambda n: [b] * n, 0.0, 0.0)
    assert unchanged is a
    always, _ = mix_samples(a, lambda n: [b] * n, 0.0, 1.0)
    assert always.shape == (3, 2 * H, 2 * W)


def test_config_builds_the_augmentation_and_checks_pairs() -> None:
    sets = {"student": {"aug_scale": [0.8, 1.2], "pseudo_augment": "weak", "augment": "strong"}}
    cfg = load_config("demo", None, sets)
    assert cfg["teacher"]["augment"] == "weak" and cfg["student"]["augment"] == "strong"
    assert load_config()["student"]["augment"] == "weak"  # the default until strong is fixed
    labeled = training_augment(cfg["student"], "student")
    pseudo = training_augment(cfg["student"], "student", "pseudo_augment")
    assert labeled.kind == "strong" and labeled.settings.scale == (0.8, 1.2)
    assert pseudo.kind == "weak"
    with pytest.raises(DplError, match=r"student.aug_scale: expected \[low, high\]"):
        training_augment({**cfg["student"], "aug_scale": [1.4, 0.6]}, "student")
    with pytest.raises(DplError, match="student.augment"):
        load_config(None, None, {"student": {"augment": "medium"}})


def test_show_augment_draws_what_the_student_sees(synth_dataset, tmp_path) -> None:
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "dpl_tools.cli", "show", "--augment", "--ann", str(synth_dataset),
           "--images", str(synth_dataset.parent / "images"), "--count", "5", "--size", "100",
           "--out", str(out), "--set", "student.aug_scale=[0.9, 1.1]",
           "--set", "student.augment=strong"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "5 student training sample(s) (strong)" in proc.stdout
    with Image.open(out) as grid:
        assert grid.size == (4 * 104 + 4, 2 * (75 + 4) + 4)  # 4 columns, 100 x 75 cells
        assert grid.getpixel((4 + 50, 4 + 37)) != (30, 30, 30)
    bad = subprocess.run(cmd[:5] + ["--out", str(tmp_path / "x.png")], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--augment needs --ann and --images" in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_photometric_colour_ops_are_the_default_and_randaugment_adds_stac_ops() -> None:
    from torchvision.transforms import v2

    from dpl_tools.data.augment import colour_ops

    photometric = colour_ops("photometric")
    assert all(isinstance(op, v2.ColorJitter) for op in photometric) and len(photometric) == 4
    rand = colour_ops("randaugment")
    assert len(rand) > len(photometric)
    assert any(isinstance(op, v2.RandomSolarize) for op in rand)
    assert AugmentSettings().colour_ops == "photometric"
    # a photometric op keeps the image's geometry and value range, and changes its colours
    image, target = _scene()
    settings = dataclasses.replace(NO_COLOUR_NO_ERASE, colour_prob=1.0, geometric_prob=0.0)
    torch.manual_seed(0)
    out_image, out = DetectionAugment("strong", settings)(image, target)
    assert out_image.shape == image.shape and 0.0 <= float(out_image.min())
    assert float(out_image.max()) <= 1.0 and not torch.equal(out_image, image)
