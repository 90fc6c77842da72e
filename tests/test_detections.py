"""External detections (any labeler's boxes): the reader, and `dpl polish --detections`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_polish import invoke, make_run

from dpl_tools.data.detections import load_detections
from dpl_tools.data.image_list import load_image_list
from dpl_tools.data.pseudo_labels import META_BOXES, read_pseudo_labels
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file

CATS = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "triangle"}]
FLAGS = ["--workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_setup(module_dir) -> tuple[Path, Path, dict]:
    """(images folder, run dir, the images' COCO ground truth)."""
    root = module_dir("detections")
    images, run = make_run(root)
    return images, run, json.loads((images.parent / "annotations.json").read_text())


def _results(gt: dict, key: str = "file_name", score: float = 0.8) -> list[dict]:
    """The ground truth as a labeler's COCO results, plus one low-score box per image."""
    names = {im["id"]: im["file_name"] for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        ref = (
            {"file_name": names[a["image_id"]]}
            if key == "file_name"
            else {"image_id": a["image_id"]}
        )
        out.append({**ref, "category_id": a["category_id"], "bbox": a["bbox"], "score": score})
    for im in gt["images"]:
        ref = {"file_name": im["file_name"]} if key == "file_name" else {"image_id": im["id"]}
        out.append({**ref, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.3})
    return out


def _yolo(gt: dict, folder: Path, names: list[str], rename: dict | None = None) -> None:
    """The ground truth as ultralytics save_txt + save_conf files, classes indexed in ``names``."""
    folder.mkdir(parents=True)
    cat_name = {c["id"]: c["name"] for c in gt["categories"]}
    by_image: dict[int, list[str]] = {}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        im = next(i for i in gt["images"] if i["id"] == a["image_id"])
        W, H = im["width"], im["height"]
        name = cat_name[a["category_id"]]
        cls = names.index((rename or {}).get(name, name))
        line = f"{cls} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f} 0.75"
        by_image.setdefault(a["image_id"], []).append(line)
    for im in gt["images"]:
        lines = by_image.get(im["id"], [])
        (folder / Path(im["file_name"]).with_suffix(".txt").name).write_text("\n".join(lines))


def test_coco_results_by_id_and_name(run_setup, tmp_path):
    images, _, gt = run_setup
    by_id = tmp_path / "by_id.json"
    by_id.write_text(json.dumps(_results(gt, "image_id")))
    coco_list = load_image_list(images.parent / "annotations.json", images)
    dets = load_detections(by_id, coco_list, CATS)
    assert dets.count == len(gt["annotations"]) + len(gt["images"])
    assert dets.source["sha256"] == sha256_file(by_id) and dets.source["file"] == "by_id.json"
    first = gt["annotations"][0]
    name = next(i["file_name"] for i in gt["images"] if i["id"] == first["image_id"])
    d = dets.for_image(name)
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(d.boxes[0], [x, y, x + w, y + h])
    assert d.category_ids[0] == first["category_id"] and d.scores[0] == 0.8
    # image_id means nothing against a folder (dpl numbers folder images itself)
    with pytest.raises(DplError, match="--images is a folder"):
        load_detections(by_id, load_image_list(images), CATS)
    by_name = tmp_path / "by_name.json"
    by_name.write_text(json.dumps(_results(gt)))
    assert load_detections(by_name, load_image_list(images), CATS).count == dets.count


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"file_name": "nope.png", "bbox": [1, 1, 5, 5]}, "unknown image"),
        ({"bbox": [1, 1, 0, 5]}, "no area"),
        ({"bbox": [1, 1, float("nan"), 5]}, "not four finite numbers"),
        ({"bbox": [1, 1, 5]}, "not four finite numbers"),
        ({"score": float("inf")}, "score Infinity is not a finite number"),
        ({"category_id": 9}, "unknown category_id 9"),
        ({"category_id": "1"}, 'category_id "1" is not an integer'),
    ],
)
def test_bad_coco_results_name_file_and_record(run_setup, tmp_path, record, message):
    images, _, gt = run_setup
    good = {"file_name": gt["images"][0]["file_name"], "category_id": 1, "bbox": [1, 1, 5, 5]}
    path = tmp_path / "preds.json"
    path.write_text(json.dumps([good | {"score": 0.9}, {**good, "score": 0.5, **record}]))
    with pytest.raises(DplError, match=message) as e:
        load_detections(path, load_image_list(images), CATS)
    assert str(e.value).startswith(f"{path}: detection #1")


def test_yolo_folder_classes_and_category_map(run_setup, tmp_path):
    images, _, gt = run_setup
    folder = tmp_path / "labels"
    names = ["disc", "box", "triangle"]  # another order, and "box" for square
    _yolo(gt, folder, names, {"square": "box"})
    (tmp_path / "data.yaml").write_text("names:\n  0: disc\n  1: box\n  2: triangle\n")
    records = load_image_list(images)
    with pytest.raises(DplError, match=r"class name\(s\) box are not among .*--category-map"):
        load_detections(folder, records, CATS, tmp_path / "data.yaml")
    (tmp_path / "map.yaml").write_text("box: square\n")
    dets = load_detections(folder, records, CATS, tmp_path / "data.yaml", tmp_path / "map.yaml")
    assert dets.count == len(gt["annotations"]) and dets.source["format"] == "yolo-txt"
    a = gt["annotations"][0]
    im = next(i for i in gt["images"] if i["id"] == a["image_id"])
    d = dets.for_image(im["file_name"])
    boxes, scores, cats = d.pixel_boxes(im["width"], im["height"])
    x, y, w, h = a["bbox"]
    np.testing.assert_allclose(boxes[0], [x, y, x + w, y + h], atol=1e-3)
    assert cats[0] == a["category_id"] and scores[0] == 0.75
    (tmp_path / "drop.json").write_text(json.dumps({"box": None}))
    dropped = load_detections(folder, records, CATS, tmp_path / "data.yaml", tmp_path / "drop.json")
    squares = sum(a["category_id"] == 1 for a in gt["annotations"])
    assert dropped.dropped_classes == squares and dropped.count == dets.count - squares
    # bad lines name the file and line
    bad = folder / Path(gt["images"][0]["file_name"]).with_suffix(".txt").name
    bad.write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DplError, match=rf"{bad}: line 1: no confidence column"):
        load_detections(folder, records, CATS)
    bad.write_text("0 0.5 0.5 0.2 0.2 0.9\n0 0.5 nan 0.2 0.2 0.9\n")
    with pytest.raises(DplError, match=rf"{bad}: line 2: non-finite"):
        load_detections(folder, records, CATS)
    (folder / "stranger.txt").write_text("")
    with pytest.raises(DplError, match="stranger.txt: unknown image"):
        load_detections(folder, records, CATS)


def test_polish_detections_end_to_end(run_setup, tmp_path):
    images, run, gt = run_setup
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(_results(gt)))
    out = tmp_path / "labels.parquet"
    common = ["--images", str(images), "--run-dir", str(run), *FLAGS]
    result = invoke(*common, "--out", str(out), "--detections", str(preds))
    assert result.exit_code == 0, result.output
    assert "labeler boxes kept" in result.output
    # a polisher trained on the teacher's mistakes says so (train-polisher --detections)
    assert "this polisher learned the teacher's mistakes" in " ".join(result.output.split())
    table, meta = read_pseudo_labels(out)
    assert meta[META_BOXES] == {
        "source": "detections", "format": "coco-results", "file": "preds.json",
        "sha256": sha256_file(preds),
    }  # fmt: skip
    rows = [r for r in table.to_pylist() if r["teacher_x1"] is not None]
    # the 0.3-score boxes fall below the initial threshold (0.5): only the truth is kept
    assert len(rows) == len(gt["annotations"])
    names = {im["id"]: im["file_name"] for im in gt["images"]}
    truth = sorted(
        (names[a["image_id"]], a["category_id"], round(a["bbox"][0], 2), round(a["bbox"][1], 2))
        for a in gt["annotations"]
    )
    got = sorted(
        (r["file_name"], r["teacher_label"], round(r["teacher_x1"], 2), round(r["teacher_y1"], 2))
        for r in rows
    )
    assert got == truth
    assert all(r["teacher_score"] == pytest.approx(0.8) for r in rows)
    assert all(r["polished_x1"] is not None and r["use_reg"] for r in rows)
    assert len({r["file_name"] for r in table.to_pylist()}) == len(gt["images"])

    # the same --out with other boxes is another job: refused, not mixed
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_results(gt, score=0.9)))
    again = invoke(*common, "--out", str(out), "--detections", str(other))
    assert isinstance(again.exception, DplError) and "different boxes" in str(again.exception)
    teacher_run = invoke(*common, "--out", str(out))
    assert "different boxes" in str(teacher_run.exception)

    # a YOLO folder (dpl's categories by index) gives the same boxes
    folder = tmp_path / "yolo"
    _yolo(gt, folder, [c["name"] for c in CATS])
    yolo_out = tmp_path / "yolo.parquet"
    assert invoke(*common, "--out", str(yolo_out), "--detections", str(folder)).exit_code == 0
    yolo_rows = [r for r in pq.read_table(yolo_out).to_pylist() if r["teacher_x1"] is not None]
    got_yolo = sorted(
        (r["file_name"], r["teacher_label"], round(r["teacher_x1"]), round(r["teacher_y1"]))
        for r in yolo_rows
    )
    assert got_yolo == sorted((n, c, round(x), round(y)) for n, c, x, y in truth)
    assert read_pseudo_labels(yolo_out)[1][META_BOXES]["format"] == "yolo-txt"

    # names the polisher does not know: one error naming them
    (tmp_path / "classes.txt").write_text("cat\ndog\ntriangle\n")
    bad = invoke(
        *common, "--out", str(tmp_path / "bad.parquet"), "--detections", str(folder),
        "--detection-classes", str(tmp_path / "classes.txt"),
    )  # fmt: skip
    message = str(bad.exception)
    assert "are not among the polisher's categories" in message
    assert "cat" in message and "dog" in message and "triangle," not in message
    assert not (tmp_path / "bad.parquet").exists()
