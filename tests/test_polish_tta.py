"""Iterated polishing (--reg-steps), teacher TTA fused by weighted box fusion (--tta), and
the per-score / per-size box-quality breakdown of `dpl evaluate --pseudo`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_THRESHOLDS, read_pseudo_labels
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.engine.box_fusion import _iou_one, weighted_box_fusion
from dpl_tools.engine.polish import PolishSettings, detect, polish_boxes
from dpl_tools.engine.tta import Augmentation, augmented_detections, hflip_images, unflip_boxes
from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality
from dpl_tools.evaluation.quality_tables import format_box_quality_table, format_quality_table
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector, set_test_settings
from dpl_tools.models.polisher import Polisher, save_polisher


def _tiny_teacher(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector("mobilenet_v2_fpn", num_classes, "none", min_size=64, max_size=96,
                          rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20)  # fmt: skip


@pytest.fixture(scope="module")
def teacher():
    model = _tiny_teacher()
    set_test_settings(model, 0.0, 0.5, 5)
    return model.eval()


# --- weighted box fusion ---------------------------------------------------------------


def _wbf(passes, iou=0.55):
    boxes = [torch.tensor(p[0], dtype=torch.float32).reshape(-1, 4) for p in passes]
    scores = [torch.tensor(p[1], dtype=torch.float32) for p in passes]
    labels = [torch.tensor(p[2], dtype=torch.long) for p in passes]
    return weighted_box_fusion(boxes, scores, labels, iou)


def test_wbf_of_identical_boxes_is_that_box():
    box = [4.0, 6.0, 30.0, 40.0]
    boxes, scores, labels = _wbf([([box], [0.8], [2])] * 3)
    torch.testing.assert_close(boxes, torch.tensor([box]))
    torch.testing.assert_close(scores, torch.tensor([0.8]))
    assert labels.tolist() == [2]


def test_wbf_overlapping_boxes_fuse_to_the_score_weighted_mean():
    a, b = [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]  # IoU 81/119 = 0.68
    boxes, scores, labels = _wbf([([a], [0.9], [1]), ([b], [0.3], [1])])
    expected = (0.9 * torch.tensor(a) + 0.3 * torch.tensor(b)) / 1.2
    torch.testing.assert_close(boxes, expected[None])
    torch.testing.assert_close(scores, torch.tensor([0.6]))  # mean score, both passes found it
    # a third pass that found nothing: the fused score is scaled by 2 of 3 passes
    _, scores3, _ = _wbf([([a], [0.9], [1]), ([b], [0.3], [1]), ([], [], [])])
    torch.testing.assert_close(scores3, torch.tensor([0.4]))
    # below the fusion IoU the two stay apart, by descending score
    apart, s, _ = _wbf([([a], [0.9], [1]), ([b], [0.3], [1])], iou=0.7)
    torch.testing.assert_close(apart, torch.tensor([a, b]))
    torch.testing.assert_close(s, torch.tensor([0.45, 0.15]))


def test_wbf_iou_is_torchvisions():
    torch.manual_seed(2)
    xy = torch.rand(20, 2) * 50
    boxes = torch.cat([xy, xy + torch.rand(20, 2) * 30 + 1], 1).double()
    expected = box_iou(boxes[:1], boxes)[0].numpy()
    np.testing.assert_allclose(_iou_one(boxes[0].numpy(), boxes.numpy()), expected, atol=1e-12)


def test_wbf_never_fuses_different_classes():
    box = [0.0, 0.0, 10.0, 10.0]
    boxes, scores, labels = _wbf([([box], [0.9], [1]), ([box], [0.7], [2])])
    assert sorted(labels.tolist()) == [1, 2] and len(boxes) == 2
    torch.testing.assert_close(boxes, torch.tensor([box, box]))
    torch.testing.assert_close(scores, torch.tensor([0.45, 0.35]))


# --- flip TTA ----------------------------------------------------------------------------


def test_unflip_maps_a_box_found_on_the_flipped_image_back():
    image = torch.zeros(3, 48, 64)  # not square: width and height must not be confused
    image[:, 10:30, 5:20] = 1.0  # an object at x 5..20, y 10..30 (xyxy [5, 10, 20, 30])
    (flipped,) = hflip_images([image])
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert found.tolist() == [[44.0, 10.0, 59.0, 30.0]]  # where it sits on the flipped image
    torch.testing.assert_close(unflip_boxes(found, 64), torch.tensor([[5.0, 10.0, 20.0, 30.0]]))


def test_flip_pass_detections_come_back_in_original_coordinates(teacher):
    torch.manual_seed(3)
    image = torch.rand(3, 48, 64)
    with torch.inference_mode():
        (plain,) = teacher([image])
        # the flip pass over the mirrored image sees the original image; its boxes must be
        # the plain detections mirrored into the mirrored image's coordinates
        (mirrored,) = augmented_detections(teacher, hflip_images([image]), Augmentation(hflip=True))
    assert len(plain["boxes"]) > 0
    x1, y1, x2, y2 = plain["boxes"].unbind(-1)
    torch.testing.assert_close(mirrored["boxes"], torch.stack([64 - x2, y1, 64 - x1, y2], -1))
    torch.testing.assert_close(mirrored["scores"], plain["scores"])


def test_scaled_pass_restores_the_teacher_sizes_and_tta_detect_fuses(teacher):
    torch.manual_seed(4)
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 40)]
    sizes = (teacher.transform.min_size, teacher.transform.max_size)
    with torch.inference_mode():
        (scaled, _) = augmented_detections(teacher, images, Augmentation(scale=1.2))
    assert (teacher.transform.min_size, teacher.transform.max_size) == sizes
    assert (scaled["boxes"][:, 2] <= 64 + 1e-4).all() and (scaled["boxes"][:, 3] <= 48 + 1e-4).all()
    settings = PolishSettings(initial_thresh=0.0, detections_per_img=5, tta=True)
    d = detect(teacher, images, settings)
    plain = detect(teacher, images, PolishSettings(initial_thresh=0.0, detections_per_img=5))
    assert d.image_sizes == plain.image_sizes  # the features are the plain pass's
    for b, s, (h, w) in zip(d.boxes, d.scores, d.image_sizes, strict=True):
        assert 0 < len(b) <= 5 and len(s) == len(b)
        assert (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert (s <= 1).all() and torch.all(s[:-1] >= s[1:])
    assert any(not torch.equal(a, b) for a, b in zip(d.boxes, plain.boxes, strict=True))


# --- iterated polishing --------------------------------------------------------------------


def _old_polish_boxes(d, polisher):
    """polish_boxes' regression output as it was before --reg-steps: one refine pass."""
    refined, _ = polisher.refine(d.features, d.boxes, d.image_sizes)
    sizes = zip(refined, d.image_sizes, d.original_sizes, strict=True)
    return [resize_boxes(r, t, o) for r, t, o in sizes]


def test_reg_steps_one_is_the_old_output_and_two_applies_the_polisher_twice(teacher):
    torch.manual_seed(5)
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 40)]
    settings = PolishSettings(initial_thresh=0.0, cls_prob=0.5, teacher_score=0.3)
    d = detect(teacher, images, settings)
    torch.manual_seed(6)
    polisher = Polisher(3).eval()  # random fixed weights: deltas depend on the features
    with torch.no_grad():
        polisher.regression.delta.weight.mul_(100)  # visible deltas
    args = (d.features, d.boxes, d.scores, d.labels, d.image_sizes, d.original_sizes, polisher)
    one = polish_boxes(*args, settings)
    two = polish_boxes(*args, dataclasses.replace(settings, reg_steps=2))
    with torch.inference_mode():
        old = _old_polish_boxes(d, polisher)
        first = polisher.regress(d.features, d.boxes, d.image_sizes)
        second = polisher.regress(d.features, first, d.image_sizes)  # re-pooled at new boxes
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a["polished_boxes"], old[i])  # bit-identical to the old path
        t, o = d.image_sizes[i], d.original_sizes[i]
        torch.testing.assert_close(b["polished_boxes"], resize_boxes(second[i], t, o))
        assert not torch.allclose(b["polished_boxes"], a["polished_boxes"])
        for key in ("boxes", "scores", "labels", "polished_labels", "probs", "use_cls"):
            assert torch.equal(a[key], b[key]), key  # classification reads the input box


def test_reg_steps_shift_accumulates_with_constant_deltas(teacher):
    """A polisher whose only output is dx = 0.1 moves a box by 0.1 of its width per step."""
    image = torch.rand(3, 64, 64)
    d = detect(teacher, [image], PolishSettings(initial_thresh=0.0))
    polisher = Polisher(3).eval()
    with torch.no_grad():
        polisher.regression.delta.weight.zero_()
        polisher.regression.delta.bias.copy_(torch.tensor([0.1, 0.0, 0.0, 0.0]))
    box = torch.tensor([[10.0, 10.0, 30.0, 40.0]])
    for steps in (1, 3):
        (out,) = polish_boxes(d.features, [box], [torch.tensor([0.8])], [torch.tensor([1])],
                              d.image_sizes, d.original_sizes, polisher,
                              PolishSettings(reg_steps=steps))  # fmt: skip
        torch.testing.assert_close(
            out["polished_boxes"], torch.tensor([[10.0 + 2 * steps, 10.0, 30.0 + 2 * steps, 40.0]])
        )


def test_polish_cli_records_reg_steps_and_tta(tmp_path: Path):
    ann = make_synthetic_dataset(tmp_path / "data", num_images=2, image_size=(80, 64), seed=1)
    categories = json.loads(ann.read_text())["categories"]
    model = _tiny_teacher(len(categories))
    save_detector(tmp_path / "teacher.pt", model,
                  DetectorSpec("mobilenet_v2_fpn", categories, 64, 96))  # fmt: skip
    save_polisher(tmp_path / "polisher.pt", Polisher(len(categories)), tmp_path / "teacher.pt",
                  categories)  # fmt: skip
    out = tmp_path / "labels.parquet"
    result = CliRunner().invoke(app, [
        "polish", "--images", str(ann.parent / "images"), "--out", str(out),
        "--run-dir", str(tmp_path), "--initial-threshold", "0.0", "--max-dets", "3",
        "--workers", "0", "--device", "cpu", "--no-progress", "--reg-steps", "2", "--tta",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    table, meta = read_pseudo_labels(out)
    thresholds = meta[META_THRESHOLDS]
    assert thresholds["reg_steps"] == 2 and thresholds["tta"] == 1
    assert (thresholds["tta_scale_1"], thresholds["tta_scale_2"]) == (0.8, 1.2)
    assert table.num_rows > 0
    bad = CliRunner().invoke(app, ["polish", "--images", str(ann.parent), "--reg-steps", "11"])
    assert bad.exit_code == 2 and "--reg-steps" in bad.output


def test_default_metadata_says_one_step_and_no_tta():
    thresholds = PolishSettings().thresholds()
    assert thresholds["reg_steps"] == 1 and thresholds["tta"] == 0
    assert not any(k.startswith("tta_") for k in thresholds)


# --- evaluate --pseudo breakdowns ----------------------------------------------------------

GT = {
    "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 40, 40], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [50, 100, 100, 100], "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a category with a long name"}],
}  # small (area 100), medium (1600), large (10000)
# (teacher box, teacher score, polished box): IoU before -> after
BOXES = [
    ([0, 0, 10, 8], 0.55, [0, 0, 10, 10]),  # small, .8 -> 1
    ([20, 20, 60, 52], 0.9, [20, 20, 60, 44]),  # medium, .8 -> .6; 0.9 in float32 is [.9, 1]
    ([50, 100, 150, 190], 0.75, [50, 100, 150, 200]),  # large, .9 -> 1
    ([160, 0, 190, 30], 0.65, [160, 0, 190, 30]),  # no truth: not in the breakdown
]


def _write_pseudo(path: Path) -> None:
    cols: dict[str, list] = {}
    for teacher_box, score, polished in BOXES:
        row = {"image_id": 1, "file_name": "a.png", "width": 200, "height": 200, "status": "ok",
               "teacher_label": 1, "teacher_score": score, "polished_label": 1,
               "polisher_prob": 0.95, "use_cls": True, "use_reg": True}  # fmt: skip
        for c, t, p in zip(("x1", "y1", "x2", "y2"), teacher_box, polished, strict=True):
            row[f"teacher_{c}"], row[f"polished_{c}"] = float(t), float(p)
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    pq.write_table(rows_to_table(cols), path)


def test_evaluate_pseudo_breaks_box_iou_down_by_score_and_size(tmp_path: Path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    _write_pseudo(tmp_path / "p.parquet")
    result = CliRunner().invoke(app, [
        "evaluate", "--pseudo", str(tmp_path / "p.parquet"), "--ann", str(tmp_path / "gt.json"),
        "--json", str(tmp_path / "q.json"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "q.json").read_text())
    bins = {b["bin"]: b for b in figures["box_quality_by_score"]}
    assert list(bins) == ["[0.0,0.5)", "[0.5,0.6)", "[0.6,0.7)", "[0.7,0.8)", "[0.8,0.9)",
                          "[0.9,1.0]"]  # fmt: skip
    assert [bins[b]["boxes"] for b in bins] == [0, 1, 0, 1, 0, 1]
    assert bins["[0.5,0.6)"]["mean_iou_before"] == pytest.approx(0.8)
    assert bins["[0.5,0.6)"]["mean_iou_after"] == pytest.approx(1.0)
    assert bins["[0.9,1.0]"]["mean_iou_after"] == pytest.approx(0.6)
    assert bins["[0.9,1.0]"]["improved_fraction"] == 0.0
    assert bins["[0.6,0.7)"]["mean_iou_before"] is None  # the box without truth is not counted
    sizes = figures["box_quality_by_size"]
    assert [sizes[s]["boxes"] for s in ("small", "medium", "large")] == [1, 1, 1]
    assert sizes["small"]["mean_iou_after"] == pytest.approx(1.0)
    assert sizes["medium"]["mean_iou_before"] == pytest.approx(0.8)
    assert sizes["large"]["mean_iou_before"] == pytest.approx(0.9)
    assert figures["box_quality"]["boxes"] == 3
    assert "score [0.9,1.0]" in result.output and "medium" in result.output


def test_tables_fit_an_80_column_terminal_without_cutting_a_cell(tmp_path: Path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    _write_pseudo(tmp_path / "p.parquet")
    from dpl_tools.data.coco import load_coco

    table, _ = read_pseudo_labels(tmp_path / "p.parquet")
    result = pseudo_label_quality(table, load_coco(tmp_path / "gt.json"))
    console = Console(width=80, record=True)
    console.print(format_quality_table(result))
    console.print(format_box_quality_table(result))
    text = console.export_text()
    assert "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in ("teacher", "classification", "regression", "P@.75", "mean IoU", "AP75"):
        assert word in text
    for label in ("score [0.5,0.6)", "score [0.9,1.0]", "small (area < 32^2)",
                  "large (area >= 96^2)", "IoU before", "improved"):  # fmt: skip
        assert label in text
