"""Human review: pseudo labels out to Label Studio / CVAT in their own formats, most
uncertain images first, and the corrected labels back in as ground truth."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.errors import DplError

BOX = ("x1", "y1", "x2", "y2")
# per image: (teacher box, teacher label, polished label, score, polisher prob, use_cls)
IMAGES = [
    [((5.25, 4.5, 25.125, 30.0), 1, 1, 0.98, 0.99, True)],  # sure: worth little
    [((10.5, 8.0, 40.75, 50.5), 2, 3, 0.55, 0.5, False),  # unsure, relabelled, left out
     ((1.0, 2.0, 20.0, 22.0), 1, 1, 0.9, 0.95, True)],
    [((30.0, 10.0, 70.0, 60.0), 3, 3, 0.7, 0.6, True)],  # somewhat unsure
    [],  # nothing found
]  # fmt: skip


@pytest.fixture(scope="module")
def data(module_dir) -> dict:
    root = module_dir("review")
    ann = make_synthetic_dataset(root / "data", num_images=4, image_size=(80, 64), seed=5)
    full = json.loads(ann.read_text())
    rows = []
    for n, (im, boxes) in enumerate(zip(full["images"], IMAGES, strict=True)):
        base = {"image_id": n + 1, "file_name": im["file_name"], "width": 80, "height": 64,
                "status": "ok"}  # fmt: skip
        if not boxes:
            rows.append(base)
        for box, label, polished, score, prob, use_cls in boxes:
            rows.append(
                {**base, **{f"teacher_{c}": v for c, v in zip(BOX, box, strict=True)},
                 **{f"polished_{c}": v for c, v in zip(BOX, box, strict=True)},
                 "teacher_label": label, "polished_label": polished, "teacher_score": score,
                 "polisher_prob": prob, "use_cls": use_cls, "use_reg": True}
            )  # fmt: skip
    cols = {name: [r.get(name) for r in rows] for name in rows[1]}
    meta = {META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in full["categories"]]}
    pq.write_table(rows_to_table(cols, meta), root / "labels.parquet")
    return {"root": root, "images": ann.parent / "images", "labels": root / "labels.parquet",
            "names": {c["id"]: c["name"] for c in full["categories"]},
            "files": [im["file_name"] for im in full["images"]]}  # fmt: skip


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def _boxes(coco: dict) -> dict[str, list[tuple[str, list[float]]]]:
    """file name -> sorted (class name, xyxy) of a COCO dict."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out: dict[str, list] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        out[files[a["image_id"]]].append((names[a["category_id"]], [x, y, x + w, y + h]))
    return {k: sorted(v) for k, v in out.items()}


def _expected(data: dict, view_teacher: bool = True) -> dict[str, list]:
    out = {}
    for name, boxes in zip(data["files"], IMAGES, strict=True):
        out[name] = sorted(
            (data["names"][label if view_teacher else polished], list(box))
            for box, label, polished, *_ in boxes
        )
    return out


@pytest.mark.parametrize("fmt, suffix", [("label-studio", "json"), ("cvat", "xml")])
def test_export_then_read_back_unchanged_gives_the_same_boxes(data, tmp_path, fmt, suffix):
    out = tmp_path / f"review.{suffix}"
    result = run("export", "--format", fmt, "--labels", data["labels"], "--out", out,
                 "--view", "teacher")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 image(s), 4 teacher pseudo boxes" in result.output
    coco = tmp_path / "back.json"
    result = run("convert", "--format", fmt, str(out), "--out", coco, "--images", data["images"],
                 "--classes", ",".join(data["names"].values()))  # fmt: skip
    assert result.exit_code == 0, result.output
    back = json.loads(coco.read_text())
    assert [c["name"] for c in back["categories"]] == list(data["names"].values())
    got, want = _boxes(back), _expected(data)
    assert got.keys() == want.keys()
    for name in want:
        assert [c for c, _ in got[name]] == [c for c, _ in want[name]], name
        for (_, g), (_, w) in zip(got[name], want[name], strict=True):
            assert np.allclose(g, w, atol=1e-6, rtol=0), (name, g, w)


def test_label_studio_tasks_follow_its_json_import(data, tmp_path):
    out = tmp_path / "tasks.json"
    result = run("export", "--format", "label-studio", "--labels", data["labels"],
                 "--out", out, "--view", "teacher")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '<RectangleLabels name="label" toName="image">' in result.output  # the config
    tasks = json.loads(out.read_text())
    assert isinstance(tasks, list) and len(tasks) == 4
    for task in tasks:
        assert task["data"]["image"] == "/data/local-files/?d=" + task["data"]["file_name"]
        (prediction,) = task["predictions"]
        for r in prediction["result"]:
            assert r["type"] == "rectanglelabels" and r["from_name"] == "label"
            assert r["to_name"] == "image" and (r["original_width"], r["original_height"]) == (
                80, 64)  # fmt: skip
            v = r["value"]
            assert 0 <= v["x"] <= 100 and 0 < v["width"] <= 100 and 0 <= r["score"] <= 1
            assert v["rectanglelabels"][0] in data["names"].values()
    # image 1's box (1, 2, 20, 22) px of 80 x 64: in percent of the image
    values = [r["value"] for t in tasks for r in t["predictions"][0]["result"]]
    (box,) = [v for v in values if v["x"] == pytest.approx(100 * 1.0 / 80)]
    assert box["y"] == pytest.approx(100 * 2.0 / 64) and box["width"] == pytest.approx(
        100 * 19 / 80
    )
    assert box["height"] == pytest.approx(100 * 20 / 64)


def test_label_studios_own_converter_reads_the_exported_tasks(data, tmp_path):
    """Label Studio's converter package (label-studio-converter, what Label Studio runs to
    export a project as COCO) reads dpl's tasks once a reviewer accepted the predictions:
    the same boxes to 1e-6 px and the same classes, under the labeling config dpl printed."""
    from label_studio_converter import Converter

    from dpl_tools.data.review import LOCAL_FILES, label_config

    out = tmp_path / "tasks.json"
    assert run("export", "--format", "label-studio", "--labels", data["labels"], "--out", out,
               "--view", "teacher").exit_code == 0  # fmt: skip
    tasks = json.loads(out.read_text())
    for i, task in enumerate(tasks):  # what Label Studio adds: task ids, accepted results
        task["id"] = i + 1
        task["annotations"] = [{"id": i + 1, "result": task["predictions"][0]["result"]}]
    accepted = tmp_path / "accepted.json"
    accepted.write_text(json.dumps(tasks))
    names = list(data["names"].values())
    converter = Converter(config=label_config(names), project_dir=str(tmp_path),
                          download_resources=False)  # fmt: skip
    converter.convert_to_coco(str(accepted), str(tmp_path / "ls"), is_dir=False)
    coco = json.loads((tmp_path / "ls/result.json").read_text())
    for image in coco["images"]:
        image["file_name"] = image["file_name"].removeprefix(LOCAL_FILES)
    got, want = _boxes(coco), _expected(data)
    assert got.keys() == want.keys() and sum(map(len, got.values())) == 4
    for name in want:
        assert [c for c, _ in got[name]] == [c for c, _ in want[name]], name
        for (_, g), (_, w) in zip(got[name], want[name], strict=True):
            assert np.allclose(g, w, atol=1e-6, rtol=0), (name, g, w)


def test_review_queue_puts_uncertain_images_first_and_top_keeps_n(data, tmp_path):
    out = tmp_path / "queue.xml"
    assert run("export", "--format", "cvat", "--labels", data["labels"], "--out", out,
               "--view", "teacher").exit_code == 0  # fmt: skip
    root = ET.parse(out).getroot()
    assert root.findtext("version") == "1.1"
    order = [im.attrib["name"] for im in root.findall("image")]
    # image 1: an unsure relabelled box left out (0 + 1 + 1 + 1) beats image 2 (0.8), which
    # beats the sure image 0 (0.02), which beats the empty image 3
    assert order == [data["files"][1], data["files"][2], data["files"][0], data["files"][3]]
    box = root.find("image/box")
    assert box.attrib["source"] == "auto" and box.find("attribute").attrib["name"] == "score"
    top = tmp_path / "top.json"
    result = run("export", "--format", "label-studio", "--labels", data["labels"],
                 "--out", top, "--top", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    (task,) = json.loads(top.read_text())
    assert task["data"]["file_name"] == data["files"][1]
    # the polished view: image 1's relabelled box is not kept for classification
    assert [r["value"]["rectanglelabels"] for r in task["predictions"][0]["result"]] == [
        [data["names"][1]]
    ]


def test_reviewed_label_studio_export_reads_the_human_annotation(data, tmp_path):
    out = tmp_path / "tasks.json"
    assert run("export", "--format", "label-studio", "--labels", data["labels"],
               "--out", out, "--view", "teacher").exit_code == 0  # fmt: skip
    tasks = json.loads(out.read_text())
    fixed = dict(tasks[0]["predictions"][0]["result"][0])
    fixed["value"] = {**fixed["value"], "x": 50.0, "rectanglelabels": [data["names"][2]]}
    tasks[0]["annotations"] = [
        {"result": [], "was_cancelled": True},
        {"result": [fixed], "was_cancelled": False},
    ]
    out.write_text(json.dumps(tasks))
    coco = tmp_path / "back.json"
    result = run("convert", "--format", "label-studio", out, "--out", coco)
    assert result.exit_code == 0, result.output
    back = _boxes(json.loads(coco.read_text()))
    name = tasks[0]["data"]["file_name"]
    ((label, box),) = back[name]
    assert label == data["names"][2] and box[0] == pytest.approx(40.0)  # 50% of 80 px
    # without --classes the ids follow first appearance: said in one warning
    assert "no --classes: category ids follow the order" in " ".join(result.output.split())
    result = run("convert", "--format", "label-studio", out, "--out", coco, "--classes",
                 ",".join(data["names"].values()))  # fmt: skip
    assert result.exit_code == 0 and "no --classes" not in result.output


ONE_RECT = (
    '[{"data": {"image": "a.png"}, "annotations": [{"result": [{"type": '
    '"rectanglelabels", "original_width": 80, "original_height": 60, "value": {"x": 10, '
    '"y": 10, "width": 20, "height": 20, "rectanglelabels": LABELS}}]}]}]'
)


@pytest.mark.parametrize("text, fmt", [("{not json", "label-studio"), ("<a><b>", "cvat"),
                                       ('[{"data": {}}]', "label-studio"),
                                       # a class name as a string, not a list: was class "s"
                                       (ONE_RECT.replace("LABELS", '"square"'), "label-studio"),
                                       (ONE_RECT.replace("LABELS", "[]"),
                                        "label-studio")])  # fmt: skip
def test_bad_review_file_is_one_line(tmp_path, text, fmt):
    bad = tmp_path / ("bad.json" if fmt == "label-studio" else "bad.xml")
    bad.write_text(text)
    result = run("convert", "--format", fmt, bad, "--out", tmp_path / "out.json")
    assert isinstance(result.exception, DplError)  # `dpl` prints it as one line, exit 2
    message = str(result.exception)
    assert message.startswith(str(bad)) and "\n" not in message
    assert not (tmp_path / "out.json").exists()


def test_review_output_is_not_an_input(data):
    result = run("export", "--format", "cvat", "--labels", data["labels"],
                 "--out", data["labels"])  # fmt: skip
    assert isinstance(result.exception, DplError) and "labels.parquet" in str(result.exception)
    assert Path(data["labels"]).stat().st_size > 0


def test_yolo_labels_with_confidence(data, tmp_path):
    yolo = tmp_path / "yolo"
    result = run("polish", "--out", data["labels"], "--export-only", "--yolo-out", yolo,
                 "--coco-view", "teacher", "--save-conf")  # fmt: skip
    assert result.exit_code == 0, result.output
    stem = Path(data["files"][1]).stem
    lines = [line.split() for line in (yolo / f"{stem}.txt").read_text().splitlines()]
    assert sorted(float(line[5]) for line in lines) == pytest.approx([0.55, 0.9])
    assert all(len(line) == 6 for line in lines)
    plain = tmp_path / "plain"
    assert run("polish", "--out", data["labels"], "--export-only", "--yolo-out", plain,
               "--coco-view", "teacher").exit_code == 0  # fmt: skip
    assert all(len(line.split()) == 5 for line in (plain / f"{stem}.txt").read_text().splitlines())
