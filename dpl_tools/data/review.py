"""Pseudo labels handed to a human for review, and the corrected labels read back.

Two review tools' own formats:

- Label Studio (JSON import): one task per image, ``data.image`` the image's URL (by
  default Label Studio's local-files URL of the file name), the pseudo labels as
  ``predictions`` of ``rectanglelabels`` results in percent of the image, each with its
  teacher score. Label Studio's JSON export of the reviewed tasks adds ``annotations``.
- CVAT for images 1.1 (XML): one ``<image>`` per image with a ``<box>`` per pseudo label
  (pixel corners, ``source="auto"``, the score as an attribute).

A review queue orders the images by how much a human look is worth (``review_priority``)
and keeps the first ``top``. Reading back (``dpl convert --format label-studio | cvat``)
gives a COCO set: for Label Studio the latest human annotation of a task, or its
predictions when it has none (so an unchanged file reads back as exported).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path, write_json

REVIEW_FORMATS = ("label-studio", "cvat")
LOCAL_FILES = "/data/local-files/?d="  # Label Studio's URL of a file in local storage
FROM_NAME, TO_NAME = "label", "image"  # the control and object tags of LABEL_CONFIG


def label_config(names: list[str]) -> str:
    """The Label Studio labeling config (XML) the exported tasks fit: an image and a
    rectangle label per class."""
    labels = "".join(f'\n    <Label value="{n}"/>' for n in names)
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">{labels}\n'
        "  </RectangleLabels>\n</View>"
    )


def review_priority(table: pa.Table) -> dict[str, float]:
    """Per image (file name), how much a human look is worth: the sum over its teacher
    boxes of the box's uncertainty ``1 - |2p - 1|`` (p the polisher's probability, else
    the teacher's score: 1 at 0.5, 0 when sure), plus 1 for each box whose polished class
    differs from the teacher's, plus 1 for each box left out of classification (the
    ignore band). Images without boxes get 0."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    names = ok["file_name"].to_pylist()
    has_box = np.asarray(ok["teacher_x1"].is_valid().to_numpy(zero_copy_only=False), bool)

    def numbers(name: str, fill: float) -> np.ndarray:
        if name not in ok.column_names:
            return np.full(len(names), fill)
        values = ok[name].to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(np.isnan(values), fill, values)

    prob, score = numbers("polisher_prob", math.nan), numbers("teacher_score", 0.5)
    p = np.where(np.isnan(prob), score, prob)
    changed = numbers("polished_label", -1) != numbers("teacher_label", -1)
    use_cls = ok["use_cls"].fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    worth = (1 - np.abs(2 * p - 1)) + changed + ~use_cls
    out: dict[str, float] = {}
    for name, box, w in zip(names, has_box, worth, strict=True):
        out[name] = out.get(name, 0.0) + (float(w) if box else 0.0)
    return out


def review_queue(view: dict[str, Any], priority: dict[str, float], top: int | None) -> list:
    """The view's images, most worth a look first (ties by file name), the first ``top``."""
    images = sorted(view["images"], key=lambda im: (-priority.get(im[1], 0.0), im[1]))
    return images if top is None else images[:top]


def _boxes_by_image(view: dict[str, Any]) -> dict[int, list[tuple]]:
    out: dict[int, list[tuple]] = {}
    for image_id, box, label, score in zip(
        view["image_id"], view["boxes"], view["labels"], view["scores"], strict=True
    ):
        out.setdefault(int(image_id), []).append((box, int(label), float(score)))
    return out


def to_label_studio(
    view: dict[str, Any], names: dict[int, str], queue: list, priority: dict[str, float],
    image_prefix: str = LOCAL_FILES,
) -> list[dict[str, Any]]:  # fmt: skip
    """Label Studio tasks of the ``queue`` images with the view's boxes as predictions."""
    by_image = _boxes_by_image(view)
    tasks = []
    for image_id, file_name, width, height in queue:
        results, scores = [], []
        for n, ((x1, y1, x2, y2), label, score) in enumerate(by_image.get(image_id, [])):
            results.append({
                "id": f"dpl-{image_id}-{n}", "type": "rectanglelabels",
                "from_name": FROM_NAME, "to_name": TO_NAME,
                "original_width": width, "original_height": height, "image_rotation": 0,
                "value": {"x": 100 * x1 / width, "y": 100 * y1 / height,
                          "width": 100 * (x2 - x1) / width, "height": 100 * (y2 - y1) / height,
                          "rotation": 0, "rectanglelabels": [names[label]]},
                "score": score,
            })  # fmt: skip
            scores.append(score)
        tasks.append({
            "data": {"image": f"{image_prefix}{file_name}", "file_name": file_name,
                     "width": width, "height": height,
                     "dpl_priority": round(priority.get(file_name, 0.0), 4)},
            "predictions": [{"model_version": "dpl", "result": results,
                             "score": float(np.mean(scores)) if scores else 0.0}],
        })  # fmt: skip
    return tasks


def to_cvat(view: dict[str, Any], names: dict[int, str], queue: list) -> ET.Element:
    """CVAT for images 1.1 XML of the ``queue`` images with the view's boxes."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "size").text = str(len(queue))
    labels = ET.SubElement(task, "labels")
    for name in names.values():
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "attributes")
    by_image = _boxes_by_image(view)
    for n, (image_id, file_name, width, height) in enumerate(queue):
        image = ET.SubElement(root, "image", id=str(n), name=file_name,
                              width=str(width), height=str(height))  # fmt: skip
        for (x1, y1, x2, y2), label, score in by_image.get(image_id, []):
            box = ET.SubElement(image, "box", label=names[label], source="auto", occluded="0",
                                xtl=repr(float(x1)), ytl=repr(float(y1)),
                                xbr=repr(float(x2)), ybr=repr(float(y2)), z_order="0")  # fmt: skip
            ET.SubElement(box, "attribute", name="score").text = f"{score:.6f}"
    ET.indent(root)
    return root


def write_review(
    view: dict[str, Any], categories: list[dict], priority: dict[str, float], out: str | Path,
    fmt: str, top: int | None = None, image_prefix: str = LOCAL_FILES,
) -> int:  # fmt: skip
    """Write the review file ``out`` (``fmt``: label-studio or cvat) atomically; returns
    the number of images in it."""
    if fmt not in REVIEW_FORMATS:
        raise DplError(f"--format {fmt!r}: choose from {', '.join(REVIEW_FORMATS)}")
    names = {int(c["id"]): str(c["name"]) for c in categories}
    queue = review_queue(view, priority, top)
    if fmt == "label-studio":
        write_json(out, to_label_studio(view, names, queue, priority, image_prefix), indent=1)
    else:
        with atomic_path(out) as tmp:
            ET.ElementTree(to_cvat(view, names, queue)).write(
                tmp, encoding="utf-8", xml_declaration=True
            )
    return len(queue)


# ------------------------------------------------------------------ reading back


def _coco(images: list[dict], boxes: list[tuple[int, str, list[float]]], names: list[str]):
    """A raw COCO dict from images and (image id, class name, xyxy) boxes; categories in
    the order given (``names``), then any other name in order of appearance."""
    order = list(dict.fromkeys([*names, *(name for _, name, _ in boxes)]))
    cat_id = {name: i + 1 for i, name in enumerate(order)}
    annotations = []
    for n, (image_id, name, (x1, y1, x2, y2)) in enumerate(boxes, start=1):
        w, h = x2 - x1, y2 - y1
        annotations.append({"id": n, "image_id": image_id, "category_id": cat_id[name],
                            "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    categories = [{"id": i, "name": name} for name, i in cat_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _task_results(task: dict[str, Any]) -> list[dict[str, Any]]:
    """A task's latest human annotation (not cancelled), else its first prediction."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if done:
        return list(done[-1].get("result") or [])
    predictions = task.get("predictions") or []
    return list(predictions[0].get("result") or []) if predictions else []


def read_label_studio(
    path: str | Path, image_prefix: str = LOCAL_FILES, classes: list[str] | None = None
) -> dict[str, Any]:
    """A Label Studio JSON file (dpl's export, or Label Studio's JSON export of the reviewed
    tasks) as a raw COCO dict: rectangle labels in pixels, file names from
    ``data.file_name`` or the image URL less ``image_prefix``; category ids in the order
    of ``classes``, then of appearance."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DplError(f"{path}: not a Label Studio JSON file ({e})") from None
    if not isinstance(tasks, list):
        raise DplError(f"{path}: a Label Studio file is a JSON list of tasks")
    images, boxes = [], []
    for n, task in enumerate(tasks, start=1):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise DplError(f"{path}: task {n} has no data.image")
        name = data.get("file_name") or data["image"].removeprefix(image_prefix)
        results = [r for r in _task_results(task) if r.get("type") == "rectanglelabels"]
        sizes = {(r.get("original_width"), r.get("original_height")) for r in results}
        width, height = (
            next(iter(sizes)) if len(sizes) == 1 else (data.get("width"), data.get("height"))
        )
        if not isinstance(width, int | float) or not isinstance(height, int | float):
            raise DplError(f"{path}: task {n} ({name}): no image size (original_width/height)")
        images.append({"id": n, "file_name": name, "width": int(width), "height": int(height)})
        for r in results:
            v = r.get("value") or {}
            try:
                x, y, w, h = (float(v[k]) for k in ("x", "y", "width", "height"))
                names = v["rectanglelabels"]
                if not isinstance(names, list) or not names or not isinstance(names[0], str):
                    raise TypeError("rectanglelabels is not a list of class names")
                label = names[0]
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise DplError(f"{path}: task {n} ({name}): a malformed rectangle ({e})") from None
            if float(v.get("rotation") or 0) != 0:
                raise DplError(f"{path}: task {n} ({name}): rotated boxes are not supported")
            x1, y1 = x / 100 * width, y / 100 * height
            boxes.append((n, label, [x1, y1, x1 + w / 100 * width, y1 + h / 100 * height]))
    return _coco(images, boxes, list(classes or []))


def read_cvat(path: str | Path, classes: list[str] | None = None) -> dict[str, Any]:
    """A CVAT for images 1.1 XML file as a raw COCO dict (boxes; other shapes ignored);
    category ids in the order of ``classes``, then of the file's labels."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DplError(f"{path}: not a CVAT XML file ({e})") from None
    if root.tag != "annotations":
        raise DplError(f"{path}: not a CVAT for images file (root <{root.tag}>)")
    names = list(classes or [])
    names += [n.text or "" for n in root.findall("./meta/task/labels/label/name")]
    names += [n.text or "" for n in root.findall("./meta/project/labels/label/name")]
    images, boxes = [], []
    for n, image in enumerate(root.findall("image"), start=1):
        try:
            name, width, height = (
                image.attrib["name"],
                image.attrib["width"],
                image.attrib["height"],
            )
            images.append({"id": n, "file_name": name, "width": int(width), "height": int(height)})
            for box in image.findall("box"):
                corners = [float(box.attrib[k]) for k in ("xtl", "ytl", "xbr", "ybr")]
                boxes.append((n, box.attrib["label"], corners))
        except (KeyError, ValueError) as e:
            raise DplError(f"{path}: image {n}: a malformed <image> or <box> ({e})") from None
    return _coco(images, boxes, names)


def convert_review(
    fmt: str,
    src: str | Path,
    classes: list[str] | None = None,
    images_dir: str | Path | None = None,
    allow_outside_root: bool = False,
) -> Any:
    """Read reviewed labels back (``dpl_tools.data.review``: a Label Studio JSON or a CVAT
    for images XML) as a validated COCO set (image files checked with ``images_dir``)."""
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DplError(f"{images_dir}: images folder not found")
    if not Path(src).is_file():
        raise DplError(f"{src}: file not found")
    raw = (
        read_label_studio(src, classes=classes)
        if fmt == "label-studio"
        else read_cvat(src, classes)
    )
    from dpl_tools.data.coco import validate_coco
    from dpl_tools.data.conversion import Conversion

    coco = validate_coco(raw, src, images_dir, allow_outside_root=allow_outside_root)
    return Conversion(coco, Path(images_dir) if images_dir else None,
                      input_boxes=len(raw["annotations"]))  # fmt: skip
