"""Perfect pseudo labels (a ground truth in the pseudo-label format, the benchmarks' ceiling
of what polishing can give a student): scored against their own truth they are exact, and
the student's dataset learns exactly the truth from them, crowd regions ignored."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_train_student import _config

from dpl_tools.data.coco import load_coco
from dpl_tools.data.pseudo_labels import META_BOXES, read_pseudo_labels
from dpl_tools.data.truth_labels import TRUTH_SOURCE, write_truth_pseudo_labels
from dpl_tools.engine.train_student import load_student_data
from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality
from dpl_tools.models.student_criterion import IGNORE_KEY


def _truth_with_crowd_and_empty(synth_dataset, tmp_path):
    """The synthetic set's first 8 images, the first box of image 0 marked crowd and
    image 1's boxes removed."""
    raw = json.loads(synth_dataset.read_text())
    raw["images"] = raw["images"][:8]
    ids = [im["id"] for im in raw["images"]]
    anns = [a for a in raw["annotations"] if a["image_id"] in ids[:1] + ids[2:]]
    first = next(a for a in anns if a["image_id"] == ids[0])
    first["iscrowd"] = 1
    raw["annotations"] = anns
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(raw))
    return path, raw, first


def test_truth_pseudo_labels_are_the_truth(synth_dataset, tmp_path) -> None:
    path, raw, crowd = _truth_with_crowd_and_empty(synth_dataset, tmp_path)
    gt = load_coco(path)
    out = write_truth_pseudo_labels(gt, tmp_path / "perfect.parquet")
    table, meta = read_pseudo_labels(out)
    assert meta[META_BOXES]["source"] == TRUTH_SOURCE
    assert sorted(set(table["file_name"].to_pylist())) == sorted(
        im["file_name"] for im in raw["images"]
    )  # every image, the empty one as its one row
    assert table.num_rows == len(raw["annotations"]) + 1
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left

    quality = pseudo_label_quality(table, gt)
    kept = quality["views"]["cls"]
    assert kept["precision50"] == 1.0 and kept["recall50"] == 1.0
    every = quality["views"]["teacher"]  # every row, the crowd region too: not a true box
    boxes = len(raw["annotations"]) - 1
    assert every["recall50"] == 1.0 and every["precision50"] == boxes / (boxes + 1)
    # ... while COCO AP, as pycocotools scores a crowd region, does not count it as false
    assert every["AP"] == kept["AP"] == 1.0
    ious = quality["box_quality"]  # teacher and polished views are both the truth
    assert ious["mean_iou_after"] == ious["mean_iou_before"] and ious["improved_fraction"] == 0

    rows = pq.read_table(out).to_pylist()
    x, y = crowd["bbox"][:2]
    crowd_rows = [r for r in rows if r["image_id"] == crowd["image_id"]
                  and np.allclose([r["teacher_x1"], r["teacher_y1"]], [x, y])]  # fmt: skip
    assert len(crowd_rows) == 1 and not crowd_rows[0]["use_cls"] and not crowd_rows[0]["use_reg"]


def test_a_student_learns_exactly_the_truth_from_them(synth_dataset, tmp_path) -> None:
    path, raw, crowd = _truth_with_crowd_and_empty(synth_dataset, tmp_path)
    gt = load_coco(path)
    pseudo = write_truth_pseudo_labels(gt, tmp_path / "perfect.parquet")
    scfg = _config()["student"]
    dataset, stats = load_student_data(synth_dataset, synth_dataset.parent / "images", pseudo,
                                       None, scfg, console=None)  # fmt: skip
    boxes = [a for a in raw["annotations"] if not a.get("iscrowd")]
    assert stats.cls_boxes == stats.reg_boxes == len(boxes) and stats.dropped_rows == 0
    assert stats.ignore_boxes == 1  # the crowd region, under the default negatives (ignore)
    unlabeled = dataset.unlabeled
    cat_to_label = gt.cat_to_label
    for item, target in zip(unlabeled.items, unlabeled.targets, strict=True):
        image_id = next(im["id"] for im in raw["images"] if im["file_name"] == item.file_name)
        mine = [a for a in boxes if a["image_id"] == image_id]
        want = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in mine)],
                            dtype=torch.float32).reshape(-1, 4)  # fmt: skip
        torch.testing.assert_close(target["boxes"].float(), want)
        labels = [cat_to_label[a["category_id"]] for a in mine]
        assert target["labels"].tolist() == labels
        torch.testing.assert_close(target.get("reg_boxes", target["boxes"]).float(), want)
        ignored = target.get(IGNORE_KEY, torch.zeros(0, 4))
        assert len(ignored) == int(image_id == crowd["image_id"])
        if len(ignored):
            x, y, w, h = crowd["bbox"]
            assert np.allclose(ignored[0].tolist(), [x, y, x + w, y + h])


def _first_six_images(synth_dataset, tmp_path):
    """The synthetic set's first 6 images and their boxes: (raw COCO dict, loaded truth)."""
    raw = json.loads(synth_dataset.read_text())
    raw["images"] = raw["images"][:6]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in
                          {im["id"] for im in raw["images"]}]  # fmt: skip
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(raw))
    return raw, load_coco(path)


def test_truth_corrected_pseudo_labels_fix_one_kind_of_error(synth_dataset, tmp_path) -> None:
    """Pseudo labels with a dropped box (missed), a box shrunk to IoU 0.3 with its object
    and one relabelled (false positives, whose objects are then missed too): correcting the
    false positives gives precision 1 at the same recall, the shrunk and relabelled rows
    kept as ignore regions; correcting the misses gives recall 1 at the same precision."""
    from dpl_tools.data.truth_labels import truth_corrected_pseudo_labels, truth_pseudo_labels

    raw, gt = _first_six_images(synth_dataset, tmp_path)
    rows = truth_pseudo_labels(gt).to_pylist()
    boxes = len(rows)
    assert boxes >= 6 and all(r["teacher_x1"] is not None for r in rows)
    del rows[0]  # missed
    for view in ("teacher", "polished"):
        shrunk = rows[1]
        x1, x2 = shrunk[f"{view}_x1"], shrunk[f"{view}_x2"]
        shrunk[f"{view}_x2"] = x1 + 0.3 * (x2 - x1)
    # IoU 0.3 with its object: a false positive, its object missed
    other = next(c["id"] for c in raw["categories"] if c["id"] != rows[2]["polished_label"])
    rows[2]["polished_label"] = other  # wrong class: a false positive, its object missed
    import pyarrow as pa

    table = pa.Table.from_pylist(rows, schema=truth_pseudo_labels(gt).schema)
    meta = {"categories": [{"id": c["id"], "name": c["name"]} for c in raw["categories"]],
            META_BOXES: {"source": "teacher"}}  # fmt: skip
    before = pseudo_label_quality(table, gt)["views"]["cls"]
    assert before["recall50"] == (boxes - 3) / boxes
    assert before["precision50"] == (boxes - 3) / (boxes - 1)  # 2 false of boxes - 1 kept

    no_fp = truth_corrected_pseudo_labels(table, meta, gt, "false-positives")
    after = pseudo_label_quality(no_fp, gt)["views"]["cls"]
    assert after["precision50"] == 1.0 and after["recall50"] == before["recall50"]
    assert no_fp.num_rows == table.num_rows  # the false positives stay, as ignore regions
    demoted = [r for r in no_fp.to_pylist() if not r["use_cls"]]
    assert len(demoted) == 2 and not any(r["use_reg"] for r in demoted)

    no_miss = truth_corrected_pseudo_labels(table, meta, gt, "missed")
    after = pseudo_label_quality(no_miss, gt)["views"]["cls"]
    assert after["recall50"] == 1.0
    assert after["precision50"] == boxes / (boxes + 2)  # 3 true boxes added, 2 false kept
    assert no_miss.num_rows == table.num_rows + 3
    assert b"missed" in no_miss.schema.metadata[META_BOXES.encode()]


def test_truth_corrected_pseudo_labels_fix_boxes_and_combinations(synth_dataset, tmp_path) -> None:
    """The "boxes" correction moves a box that lies on its object (IoU .5 or more) onto the
    true box, in both views, and leaves one below IoU .5 and every class as they were;
    all three corrections together leave only the wrong-class row, as an ignore region."""
    import pyarrow as pa

    from dpl_tools.data.truth_labels import truth_corrected_pseudo_labels, truth_pseudo_labels

    raw, gt = _first_six_images(synth_dataset, tmp_path)
    truth = truth_pseudo_labels(gt)
    rows = truth.to_pylist()
    boxes = len(rows)
    for view in ("teacher", "polished"):  # rows[0]: IoU 0.8 with its object; rows[1]: 0.3
        for i, share in ((0, 0.8), (1, 0.3)):
            x1, x2 = rows[i][f"{view}_x1"], rows[i][f"{view}_x2"]
            rows[i][f"{view}_x2"] = x1 + share * (x2 - x1)
    other = next(c["id"] for c in raw["categories"] if c["id"] != rows[2]["polished_label"])
    rows[2]["polished_label"] = other
    table = pa.Table.from_pylist(rows, schema=truth.schema)
    meta = {"categories": [{"id": c["id"], "name": c["name"]} for c in raw["categories"]],
            META_BOXES: {"source": "teacher"}}  # fmt: skip

    fixed = truth_corrected_pseudo_labels(table, meta, gt, "boxes").to_pylist()
    exact = truth.to_pylist()
    coords = [f"{v}_{c}" for v in ("teacher", "polished") for c in ("x1", "y1", "x2", "y2")]
    assert [fixed[0][k] for k in coords] == pytest.approx([exact[0][k] for k in coords])
    assert fixed[1]["teacher_x2"] == pytest.approx(rows[1]["teacher_x2"])  # float32 column
    assert fixed[1]["teacher_x2"] < exact[1]["teacher_x2"] - 1
    assert [r["polished_label"] for r in fixed] == [r["polished_label"] for r in rows]
    quality = pseudo_label_quality(table, gt)["views"]["cls"]
    assert quality["mean_iou"] < 1.0
    assert quality["recall50"] == (boxes - 2) / boxes

    every = truth_corrected_pseudo_labels(table, meta, gt, ("missed", "false-positives", "boxes"))
    after = pseudo_label_quality(every, gt)["views"]["cls"]
    assert after["precision50"] == after["recall50"] == 1.0
    assert after["mean_iou"] == pytest.approx(1.0)
    ignored = [r for r in every.to_pylist() if not r["use_cls"]]
    assert len(ignored) == 2 and {r["polished_label"] for r in ignored} >= {other}
    assert b"boxes+false-positives+missed" in every.schema.metadata[META_BOXES.encode()]
    with pytest.raises(ValueError, match="fix must be among"):
        truth_corrected_pseudo_labels(table, meta, gt, ("boxes", "classes"))
