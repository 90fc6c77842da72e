"""`dpl export`: ground truth + pseudo labels as a training-ready COCO or YOLO dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pycocotools.coco import COCO
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.errors import DplError
from dpl_tools.outputs import MARKER

BOX = ("x1", "y1", "x2", "y2")


@pytest.fixture(scope="module")
def data(module_dir) -> dict[str, Path]:
    """10 images (80x64): 0-5 labeled, 5-9 pseudo-labeled (image 5 is both), plus a val set."""
    root = module_dir("export")
    ann = make_synthetic_dataset(root / "data", num_images=10, image_size=(80, 64), seed=3)
    full = json.loads(ann.read_text())
    keep = {im["id"] for im in full["images"][:6]}
    labeled = {
        **full,
        "images": [im for im in full["images"] if im["id"] in keep],
        "annotations": [a for a in full["annotations"] if a["image_id"] in keep],
    }
    (root / "split").mkdir()
    (root / "split" / "labeled.json").write_text(json.dumps(labeled))
    val = make_synthetic_dataset(root / "val", num_images=2, image_size=(80, 64), seed=4)
    rows = []
    for n, im in enumerate(full["images"][5:]):
        base = {"image_id": n + 1, "file_name": im["file_name"], "width": 80, "height": 64}
        base["status"] = "ok"
        if n == 4:  # an image where nothing was found
            rows.append(base)
            continue
        for k, (score, use_cls) in enumerate([(0.95, True), (0.6, True), (0.55, False)]):
            box = (5 + 10 * k, 4, 25 + 10 * k, 30)
            rows.append(
                {**base, **{f"teacher_{c}": v for c, v in zip(BOX, box, strict=True)},
                 **{f"polished_{c}": v + 1 for c, v in zip(BOX, box, strict=True)},
                 "teacher_label": 1 + k, "polished_label": 1 + k, "teacher_score": score,
                 "polisher_prob": 0.9, "use_cls": use_cls, "use_reg": True}
            )  # fmt: skip
    rows.append({"image_id": 9, "file_name": "gone.png", "status": "skipped", "error": "empty"})
    cols = {name: [r.get(name) for r in rows] for name in rows[0] | rows[1] | rows[-1]}
    meta = {META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in full["categories"]]}
    pq.write_table(rows_to_table(cols, meta), root / "labels.parquet")
    return {
        "root": root,
        "images": ann.parent / "images",
        "labeled": root / "split" / "labeled.json",
        "labels": root / "labels.parquet",
        "val": val,
        "val_images": val.parent / "images",
        "categories": full["categories"],
        "labeled_images": [im["file_name"] for im in labeled["images"]],
    }


def export(data: dict, out: Path, *extra: str):
    args = [
        "export", "--labels", str(data["labels"]), "--labeled", str(data["labeled"]),
        "--images", str(data["images"]), "--out", str(out), *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_coco_train_json_merges_without_id_collisions(data, tmp_path):
    out = tmp_path / "coco"
    result = export(
        data, out, "--format", "coco", "--val", str(data["val"]),
        "--val-images", str(data["val_images"]),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    train = COCO(str(out / "train.json"))
    raw = json.loads((out / "train.json").read_text())
    image_ids = [im["id"] for im in raw["images"]]
    ann_ids = [a["id"] for a in raw["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)
    assert len(train.imgs) == 6 + 4  # labeled 0-5, pseudo 6-9 (image 5: ground truth wins)
    names = [im["file_name"] for im in raw["images"]]
    assert len(set(names)) == len(names)
    assert all((out / name).is_file() for name in names)  # resolvable from DIR
    gt = [a for a in raw["annotations"] if not a.get("pseudo")]
    pseudo = [a for a in raw["annotations"] if a.get("pseudo")]
    labeled = json.loads(data["labeled"].read_text())
    assert len(gt) == len(labeled["annotations"])
    assert len(pseudo) == 3 * 2  # polished view: the use_cls rows of images 6-8, 9 has none
    assert min(a["id"] for a in pseudo) > max(a["id"] for a in labeled["annotations"])
    pseudo_images = {im["id"] for im in raw["images"] if im.get("pseudo")}
    assert min(pseudo_images) > max(im["id"] for im in labeled["images"])
    assert {a["image_id"] for a in pseudo} <= pseudo_images
    assert all(0 < a["score"] <= 1 for a in pseudo)
    assert [c["name"] for c in train.loadCats(train.getCatIds())] == [
        c["name"] for c in data["categories"]
    ]
    val = json.loads((out / "val.json").read_text())
    assert len(val["images"]) == 2 and all(
        (out / im["file_name"]).is_file() for im in val["images"]
    )
    figures = json.loads((out / "dpl_export.json").read_text())
    assert figures["images"] == {"labeled": 6, "pseudo": 4, "val": 2}
    assert figures["pseudo_images_in_labeled"] == 1
    assert sum(c["pseudo_boxes"] for c in figures["classes"]) == 6
    assert sum(c["gt_boxes"] for c in figures["classes"]) == len(gt)
    assert "pseudo boxes" in result.output and "also labeled" in result.output
    # --min-score and another view, re-exported into the same (dpl-owned) folder
    again = export(data, out, "--format", "coco", "--view", "teacher", "--min-score", "0.58")
    assert again.exit_code == 0, again.output
    raw = json.loads((out / "train.json").read_text())
    assert sum(bool(a.get("pseudo")) for a in raw["annotations"]) == 3 * 2
    assert not (out / "val.json").exists()  # written by the earlier export only: removed


def _label_of(out: Path, image: Path) -> Path:
    rel = image.relative_to(out / "images")
    return (out / "labels" / rel).with_suffix(".txt")


def test_yolo_layout_and_data_yaml(data, tmp_path):
    out = tmp_path / "yolo"
    result = export(
        data, out, "--format", "yolo", "--val", str(data["val"]),
        "--val-images", str(data["val_images"]),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load((out / "data.yaml").read_text())
    assert "path" not in spec  # relative to data.yaml's folder: the dataset can be moved
    root = out
    assert spec["names"] == {i: c["name"] for i, c in enumerate(data["categories"])}
    for split, count in (("train", 10), ("val", 2)):
        folder = root / spec[split]
        images = sorted(p for p in folder.rglob("*") if p.suffix == ".png")
        assert len(images) == count
        for image in images:
            assert image.is_symlink() and image.resolve().is_file()
            label = _label_of(out, image)
            assert label.is_file(), label
            for line in label.read_text().splitlines():
                cls, *box = line.split()
                assert 0 <= int(cls) < len(spec["names"])
                assert all(0 <= float(v) <= 1 for v in box)
    labeled = json.loads(data["labeled"].read_text())
    first = labeled["images"][0]
    lines = (out / "labels/train/labeled" / first["file_name"]).with_suffix(".txt").read_text()
    n_gt = sum(a["image_id"] == first["id"] for a in labeled["annotations"])
    assert len(lines.splitlines()) == n_gt
    # image 5 is labeled: only its ground truth is exported
    assert not (out / "images/train/pseudo" / data["labeled_images"][5]).exists()
    pseudo = sorted((out / "labels/train/pseudo").glob("*.txt"))
    assert [len(p.read_text().splitlines()) for p in pseudo] == [2, 2, 2, 0]
    # re-exported into its own folder without --val: the image links dpl wrote are its
    # own (not "outside the folder"), and the val links are removed, not their images
    val_links = [p for p in (root / spec["val"]).rglob("*.png")]
    again = export(data, out, "--format", "yolo")
    assert again.exit_code == 0, again.output
    assert not any(p.is_symlink() or p.exists() for p in val_links)
    assert all(p.is_file() for p in Path(data["val_images"]).iterdir())
    assert len([p for p in (out / "images").rglob("*.png") if p.is_symlink()]) == 10
    copied = tmp_path / "copied"
    assert export(data, copied, "--format", "yolo", "--copy-images").exit_code == 0
    files = [p for p in (copied / "images").rglob("*.png")]
    assert len(files) == 10 and not any(p.is_symlink() for p in files)
    assert yaml.safe_load((copied / "data.yaml").read_text())["val"] == "images/train"
    moved = tmp_path / "moved"
    copied.rename(moved)  # a copied dataset moved elsewhere still holds its images
    spec = yaml.safe_load((moved / "data.yaml").read_text())
    assert len(list((moved / spec["train"]).rglob("*.png"))) == 10


def test_yolo_export_loads_in_ultralytics(data, tmp_path):
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (optional)")
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    out = tmp_path / "yolo"
    result = export(
        data, out, "--format", "yolo", "--val", str(data["val"]),
        "--val-images", str(data["val_images"]),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = check_det_dataset(str(out / "data.yaml"))
    assert spec["nc"] == len(data["categories"])
    train = YOLODataset(img_path=spec["train"], data=spec, augment=False, imgsz=64)
    assert len(train.labels) == 10
    assert sum(len(label["cls"]) for label in train.labels) > 0


def test_refuses_foreign_or_input_folders(data, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = export(data, foreign, "--format", "yolo")
    assert isinstance(result.exception, DplError)
    assert "not empty" in str(result.exception)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    before = sorted(os.listdir(data["images"]))
    for out in (data["images"], data["labeled"].parent):
        result = export(data, out, "--format", "coco")
        assert isinstance(result.exception, DplError), result.output
        assert "--out is" in str(result.exception)
    assert sorted(os.listdir(data["images"])) == before
    assert not (data["labeled"].parent / MARKER).exists()
    assert not (data["labeled"].parent / "train.json").exists()
    result = export(data, data["labels"], "--format", "coco")
    assert "--out is the input --labels" in str(result.exception)
    # pseudo labels whose file name climbs out of the image folder are refused
    t = pq.read_table(data["labels"])
    first = t["file_name"][0].as_py()
    names = ["../escape.png" if n == first else n for n in t["file_name"].to_pylist()]
    bad = dict(data, labels=tmp_path / "bad.parquet")
    t = t.set_column(t.schema.get_field_index("file_name"), "file_name", [names])
    pq.write_table(t, bad["labels"])
    result = export(bad, tmp_path / "escape", "--format", "yolo")
    assert "outside its image folder" in str(result.exception)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "escape.png").exists()


def test_validation_images_are_not_trained_on_as_pseudo_labeled(data, tmp_path):
    """A pseudo-labeled image that is in --val is left out of the training set (it would
    leak the validation set); a labeled one in --val is the user's choice, kept and warned."""
    full = json.loads((data["images"].parent / "annotations.json").read_text())
    chosen = {full["images"][0]["id"], full["images"][6]["id"]}  # labeled 0, pseudo-labeled 6
    val = {**full, "images": [im for im in full["images"] if im["id"] in chosen],
           "annotations": [a for a in full["annotations"] if a["image_id"] in chosen]}  # fmt: skip
    val_path = tmp_path / "val.json"
    val_path.write_text(json.dumps(val))
    out = tmp_path / "ds"
    result = export(data, out, "--format", "coco", "--val", str(val_path),
                    "--val-images", str(data["images"]))  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads((out / "dpl_export.json").read_text())
    assert figures["images"] == {"labeled": 6, "pseudo": 3, "val": 2}
    assert figures["pseudo_images_in_val"] == 1 and figures["labeled_images_in_val"] == 1
    train = json.loads((out / "train.json").read_text())
    pseudo_names = {Path(im["file_name"]).name for im in train["images"] if im.get("pseudo")}
    assert full["images"][6]["file_name"] not in pseudo_names
    assert "left out of the training set" in result.output and "warning" in result.output
