"""`dpl report` and `dpl show` on a small synthetic polish run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    META_THRESHOLDS,
    SCHEMA,
    encode_metadata,
    read_pseudo_labels,
)
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.report.build import build_report

CHROMIUM = Path("/usr/bin/chromium")


def fake_polish_run(ann_path: Path, seed: int = 0) -> tuple[pa.Table, dict]:
    """Pseudo labels made from the truth with teacher-like noise: jittered boxes, a few
    wrong labels and false positives; polished boxes closer to the truth; the polisher
    fixes most wrong labels. One image is unreadable (skipped) and one holds no box."""
    coco = json.loads(ann_path.read_text())
    rng = np.random.default_rng(seed)
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    n_cls = len(coco["categories"])
    rows = []
    for k, im in enumerate(coco["images"]):
        base = {"image_id": im["id"], "file_name": im["file_name"], "width": im["width"],
                "height": im["height"], "status": "ok"}  # fmt: skip
        if k == 1:
            rows.append({**base, "status": "skipped", "error": "corrupt or truncated image"})
            continue
        anns = [] if k == 2 else by_image.get(im["id"], [])
        if not anns:
            rows.append(base)
            continue
        for a in anns:
            x, y, w, h = a["bbox"]
            gt = np.array([x, y, x + w, y + h])
            noise = rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
            teacher = gt + noise
            polished = gt + noise * 0.4
            true = a["category_id"]
            wrong = rng.random() < 0.3
            t_label = true % n_cls + 1 if wrong else true
            score = float(rng.uniform(0.5, 1.0))
            prob = 0.95 if wrong and rng.random() < 0.6 else float(rng.uniform(0.5, 1.0))
            p_class = true if prob >= 0.9 else t_label  # the polisher's own class
            p_label = p_class if (prob >= 0.9 and score < 0.9) else t_label
            rows.append(
                {**base, **dict(zip(("teacher_x1", "teacher_y1", "teacher_x2", "teacher_y2"),
                                    teacher.tolist(), strict=True)),
                 **dict(zip(("polished_x1", "polished_y1", "polished_x2", "polished_y2"),
                            polished.tolist(), strict=True)),
                 "teacher_label": t_label, "teacher_score": score, "polished_label": p_label,
                 "polisher_prob": prob, "polisher_label": p_class,
                 "use_cls": prob >= 0.9 or score > 0.9, "use_reg": True}
            )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    meta = {META_CATEGORIES: coco["categories"],
            META_THRESHOLDS: {"initial": 0.5, "cls_prob": 0.9, "teacher_score": 0.9}}  # fmt: skip
    return table.replace_schema_metadata(encode_metadata(meta)), coco


@pytest.fixture(scope="module")
def run(module_dir):
    root = module_dir("report")
    ann = make_synthetic_dataset(root, num_images=12, image_size=(128, 96), max_objects=4, seed=3)
    table, coco = fake_polish_run(ann)
    labels = root / "labels.parquet"
    pq.write_table(table, labels)
    return root, ann, labels, table


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: dict[str, str] = {}
        self._id: str | None = None
        self.figures = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.links.append(a["src"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "figure":
            self.figures += 1
        self._id = a.get("id")

    def handle_data(self, data):
        if self._id:
            self.ids[self._id] = self.ids.get(self._id, "") + data

    def handle_endtag(self, tag):
        self._id = None


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_report_cli_counts_links_and_pages(run, tmp_path):
    root, ann, labels, table = run
    out = tmp_path / "report"
    proc = _cli("report", str(labels), "--images", str(root / "images"), "--out", str(out),
                "--ann", str(ann), "--max-images", "7", "--page-size", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = _parse(out / "index.html")
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    boxed = [r for r in ok if r["teacher_x1"] is not None]
    expect = {
        "images-ok": len({r["file_name"] for r in ok}),
        "images-skipped": 1,
        "images-empty": len({r["file_name"] for r in ok if r["teacher_x1"] is None}),
        "boxes-teacher": len(boxed),
        "labels-changed": sum(r["polished_label"] != r["teacher_label"] for r in boxed),
        "kept-cls": sum(r["use_cls"] for r in boxed),
        "kept-reg": sum(r["use_reg"] for r in boxed),
        "gallery-images": 7,
    }
    assert {k: int(index.ids[k]) for k in expect} == expect
    assert expect["labels-changed"] > 0 and expect["kept-cls"] < expect["boxes-teacher"]
    for label in (1, 2, 3):
        before = sum(r["teacher_label"] == label for r in boxed)
        after = sum(r["polished_label"] == label for r in boxed if r["use_cls"])
        assert int(index.ids[f"before-{label}"]) == before
        assert int(index.ids[f"after-{label}"]) == after
    # every page and image linked from every page exists; 7 images in pages of 3
    pages = sorted(p.name for p in out.glob("page-*.html"))
    assert pages == ["page-001.html", "page-002.html", "page-003.html"]
    figures = 0
    for page in ["index.html", *pages]:
        parsed = _parse(out / page)
        assert parsed.links
        for link in parsed.links:
            assert (out / link).is_file(), f"{page} links missing {link}"
        figures += parsed.figures
    assert figures == 7
    assert {"plots/iou_to_truth.png", "plots/pr_curves.png", "plots/keep_rule.png"} <= set(
        index.links
    )
    # largest corrections first: the first page starts with a changed label
    first = (out / "page-001.html").read_text()
    assert 'data-changed="1"' in first.split("<figure", 2)[1]
    assert not list(tmp_path.glob(".report.*"))  # temp build folder renamed away


def test_report_lists_unreadable_images_and_replaces_old_report(run, tmp_path):
    root, ann, labels, table = run
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    first_ok = table.filter(pa.compute.is_valid(table["teacher_x1"]))["file_name"][0].as_py()
    (images / first_ok).write_bytes(b"not an image")
    out = tmp_path / "rep"
    build_report(labels, images, out, max_images=100)
    result = build_report(labels, images, out, max_images=100)  # rebuild over the old one
    assert result.unreadable == [(first_ok, "not a recognised image format")]
    text = (out / "index.html").read_text()
    assert "Unreadable images (2)" in text and first_ok in text
    assert not (out / "plots" / "pr_curves.png").exists()  # no --ann, no truth plots
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    proc = _cli("report", str(labels), "--images", str(images), "--out", str(tmp_path / "other"))
    assert proc.returncode == 2 and "not a dpl report" in " ".join(proc.stderr.split())
    assert (tmp_path / "other" / "keep.txt").exists()


def test_show_renders_boxes(run, tmp_path):
    root, ann, labels, table = run
    name = table.filter(pa.compute.is_valid(table["teacher_x1"]))["file_name"][0].as_py()
    out = tmp_path / "shown.png"
    proc = _cli("show", str(root / "images" / name), "--labels", str(labels), "--out", str(out),
                "--size", "256")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert shown.shape == (192, 256, 3)
    orange = (shown[..., 0] > 230) & (abs(shown[..., 1] - 150) < 25) & (shown[..., 2] < 40)
    cyan = (shown[..., 0] < 40) & (shown[..., 1] > 200) & (shown[..., 2] > 230)
    assert orange.sum() > 20 and cyan.sum() > 20
    proc = _cli("show", str(root / "nope.png"), "--labels", str(labels), "--out", str(out))
    assert proc.returncode == 2 and "no pseudo labels for this image" in " ".join(
        proc.stderr.split()
    )


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing and we are root."""
    if not CHROMIUM.exists() and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq chromium",
            shell=True, env=env, capture_output=True, timeout=900,
        )  # fmt: skip
    if not CHROMIUM.exists():
        pytest.skip("headless screenshot needs /usr/bin/chromium (not root or apt-get failed)")
    return CHROMIUM


def test_report_renders_in_headless_chromium(run, tmp_path, chromium):
    root, ann, labels, table = run
    out = tmp_path / "report"
    build_report(labels, root / "images", out, ann=ann, max_images=20)
    shot = tmp_path / "shot.png"
    cmd = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,900", (out / "index.html").resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=90)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1200)
    assert pixels.std() > 20  # text, tables and plots, not a blank page


def test_truth_marks_true_false_positives_and_misses() -> None:
    from dpl_tools.report.truth_marks import FP, ROW_MARK, TP, mark_rows

    def row(box, label, score, use_cls):
        xyxy = dict(zip(("x1", "y1", "x2", "y2"), box, strict=True))
        return {**{f"teacher_{k}": v for k, v in xyxy.items()},
                **{f"polished_{k}": v for k, v in xyxy.items()},
                "teacher_label": label, "polished_label": label, "teacher_score": score,
                "use_cls": use_cls}  # fmt: skip

    truth = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 40, 60, 60]], np.float64)
    labels = np.array([1, 2, 1])
    rows = [
        row((0, 0, 10, 9), 1, 0.9, True),  # right class, IoU .9: true positive
        row((20, 0, 30, 10), 1, 0.8, True),  # on a truth of class 2 but labelled 1: FP
        row((40, 40, 60, 60), 1, 0.6, False),  # not kept (uncertain): neither
    ]
    marks = mark_rows(rows, truth, labels)
    assert [r.get(ROW_MARK) for r in rows] == [TP, FP, None]
    assert marks.missed == [1, 2]  # class 2's truth and the truth only the unkept box found
    assert marks.counts(rows) == {"tp": 1, "fp": 1, "fn": 2, "uncertain": 1}


def _figures(page: Path) -> list[dict[str, str]]:
    class Figures(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[dict[str, str]] = []

        def handle_starttag(self, tag, attrs):
            if tag == "figure":
                self.found.append(dict(attrs))

    parser = Figures()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.found


def test_report_with_truth_marks_every_truth_box_found_or_missed(run, tmp_path):
    root, ann, labels, table = run
    out = tmp_path / "report"
    build_report(labels, root / "images", out, ann=ann, max_images=20, page_size=50)
    coco = json.loads(ann.read_text())
    truths: dict[str, int] = {}
    ids = {im["id"]: im["file_name"] for im in coco["images"]}
    for a in coco["annotations"]:
        truths[ids[a["image_id"]]] = truths.get(ids[a["image_id"]], 0) + 1
    figures = _figures(out / "page-001.html")
    assert figures
    alts = re.findall(r'<img src="thumbs/[^"]+" alt="([^"]+)"', (out / "page-001.html").read_text())
    for fig, name in zip(figures, alts, strict=False):
        assert int(fig["data-tp"]) + int(fig["data-fn"]) == truths.get(name, 0), name
    assert sum(int(f["data-fp"]) for f in figures) > 0  # the fake teacher has wrong labels
    assert 'id="err"' in (out / "page-001.html").read_text()


def test_error_filter_works_in_headless_chromium(run, tmp_path, chromium):
    root, ann, labels, table = run
    out = tmp_path / "report"
    build_report(labels, root / "images", out, ann=ann, max_images=20)
    page = (out / "page-001.html").resolve().as_uri() + "#err=fp"
    cmd = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
    figures = re.findall(r"<figure[^>]*>", dom)
    assert figures, "chromium returned no page"
    with_fp = [f for f in figures if 'data-fp="0"' not in f]
    hidden = [f for f in figures if "display: none" in f]
    assert with_fp and len(hidden) == len(figures) - len(with_fp)
    assert all('data-fp="0"' in f for f in hidden)
    shown = re.search(r'<span id="shown">(\d+)</span>', dom)
    assert shown and int(shown.group(1)) == len(with_fp)


def test_keep_rule_sweep_replays_the_rule_as_the_quality_table_counts(run):
    from dpl_tools.data.coco import load_coco
    from dpl_tools.evaluation.keep_sweep import keep_rule_sweep
    from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality

    root, ann, labels, table = run
    gt = load_coco(ann)
    quality = pseudo_label_quality(table, gt)
    sweep = keep_rule_sweep(table, gt, 0.9, 0.9)
    assert sweep["exact"]
    # at the file's operating point: the classification view of the quality table
    point, cls = sweep["operating_point"], quality["views"]["cls"]
    assert point["kept"] == cls["boxes"]
    assert point["precision"] == pytest.approx(cls["precision50"])
    assert point["recall"] == pytest.approx(cls["recall50"])
    # teacher_score 0 keeps every box, relabels none: the teacher view
    curve, teacher = sweep["teacher_score"], quality["views"]["teacher"]
    i = curve["threshold"].index(0.0)
    assert curve["kept"][i] == teacher["boxes"]
    assert curve["precision"][i] == pytest.approx(teacher["precision50"])
    # cls_prob 1.0 relabels nothing and keeps only boxes scored above 0.9
    curve = sweep["cls_prob"]
    i = curve["threshold"].index(1.0)
    boxed = [r for r in table.to_pylist() if r["teacher_x1"] is not None]
    assert curve["kept"][i] == sum(r["teacher_score"] > 0.9 for r in boxed)


def test_keep_rule_sweep_of_an_older_file_without_the_polisher_class(run, tmp_path):
    from dpl_tools.data.coco import load_coco
    from dpl_tools.evaluation.keep_sweep import keep_rule_sweep

    root, ann, labels, table = run
    old = tmp_path / "old.parquet"
    pq.write_table(table.drop_columns(["polisher_label"]), old)
    read, _ = read_pseudo_labels(old)
    assert read["polisher_label"].null_count == read.num_rows
    sweep = keep_rule_sweep(read, load_coco(ann), 0.9, 0.9)
    assert not sweep["exact"]
    assert sweep["operating_point"]["kept"] == sum(r["use_cls"] for r in table.to_pylist()
                                                   if r["teacher_x1"] is not None)  # fmt: skip
    # with the polisher's class the sweep replays relabelling: at teacher_score 1 the boxes
    # scored above 0.9, kept as they were in the file, now take the polisher's (right) class
    exact = keep_rule_sweep(table, load_coco(ann), 0.9, 0.9)["teacher_score"]
    i = exact["threshold"].index(1.0)
    assert exact["kept"][i] == sweep["teacher_score"]["kept"][i]
    assert exact["precision"][i] > sweep["teacher_score"]["precision"][i]


def test_report_page_has_per_class_table_and_keep_rule(run, tmp_path):
    root, ann, labels, table = run
    out = tmp_path / "report"
    build_report(labels, root / "images", out, ann=ann, max_images=5)
    index = _parse(out / "index.html")
    text = (out / "index.html").read_text()
    assert "<h2>Per class</h2>" in text and "<h2>Keep rule</h2>" in text
    coco = json.loads(ann.read_text())
    for i, cat in enumerate(coco["categories"]):
        for view in ("teacher", "cls", "reg"):
            assert f"pc-{view}-AP-{i}" in index.ids, (view, cat["name"])
    kept = sum(r["use_cls"] for r in table.to_pylist() if r["teacher_x1"] is not None)
    assert int(index.ids["keep-kept"]) == kept
    assert 0 < float(index.ids["keep-p"]) <= 1 and 0 < float(index.ids["keep-r"]) <= 1
    assert (out / "plots/keep_rule.png").stat().st_size > 1000
