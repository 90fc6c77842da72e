"""Keep thresholds fitted to the data (issue 13, item 2): fitted by train-polisher on
cross-fitted detections, stored in the polisher, used and recorded by polish, overridable,
``--keep-rule paper`` exact; evaluate --pseudo counts changed / right labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco
from dpl_tools.data.crossfit_detections import read_crossfit_detections
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_FITTED, META_THRESHOLDS, read_pseudo_labels
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.engine.keep_rule import select_pseudo_labels
from dpl_tools.engine.keep_thresholds import fit_on_crossfit, resolve_keep_thresholds
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import DetectorSpec, load_detector, save_detector
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import load_polisher

FAST_TRAIN = ["--iters", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu",
              "--val-fraction", "0", "--reg-per-image", "16", "--cls-per-image", "16",
              "--max-proposals", "10"]  # fmt: skip
FAST_POLISH = ["--initial-threshold", "0.0", "--max-dets", "3", "--workers", "0",
               "--device", "cpu", "--no-progress"]  # fmt: skip


def _invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _write_crossfit(path: Path, ann: Path) -> int:
    """Out-of-fold detections in the agreed schema: per image each true box (jittered, the
    right class, score 0.6-0.95), one false box (score 0.55), one below 0.5; the last image
    a null row (seen, nothing detected). Returns the number of rows with score >= 0.5."""
    coco = load_coco(ann)
    rng = np.random.default_rng(0)
    cols: dict[str, list] = {k: [] for k in ("image_id", "file_name", "fold", "x1", "y1",
                                             "x2", "y2", "score", "label")}  # fmt: skip
    by_image = coco.annotations_by_image()

    def add(record, fold, box, score, label):
        for k, v in zip(("image_id", "file_name", "fold", "x1", "y1", "x2", "y2", "score",
                         "label"), (record["id"], record["file_name"], fold, *box, score,
                                    label), strict=True):  # fmt: skip
            cols[k].append(v)

    above = 0
    for i, record in enumerate(coco.images):
        fold = i % 3
        if i == len(coco.images) - 1:
            add(record, fold, (None,) * 4, None, None)
            continue
        for a in by_image.get(record["id"], []):
            x, y, w, h = a["bbox"]
            box = np.array([x, y, x + w, y + h]) + rng.uniform(-1, 1, 4)
            add(record, fold, box.tolist(), float(rng.uniform(0.6, 0.95)), a["category_id"])
            above += 1
        add(record, fold, (1.0, 1.0, 9.0, 9.0), 0.55, coco.categories[0]["id"])
        add(record, fold, (2.0, 2.0, 12.0, 12.0), 0.2, coco.categories[0]["id"])
        above += 1
    schema = pa.schema([("image_id", pa.int64()), ("file_name", pa.string()),
                        ("fold", pa.int32()), *((c, pa.float32()) for c in ("x1", "y1", "x2",
                        "y2", "score")), ("label", pa.int32())])  # fmt: skip
    pq.write_table(pa.table(cols, schema=schema), path)
    return above


@pytest.fixture(scope="module")
def run(module_dir) -> dict[str, Path]:
    """Tiny images, an untrained teacher, its noise pairs, and a crossfit.parquet."""
    root = module_dir("keep")
    ann = make_synthetic_dataset(root / "data", num_images=6, image_size=(80, 64), seed=1)
    categories = json.loads(ann.read_text())["categories"]
    torch.manual_seed(0)
    teacher = build_detector(
        "mobilenet_v2_fpn", len(categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20,
    )  # fmt: skip
    spec = DetectorSpec("mobilenet_v2_fpn", categories, 64, 96)
    save_detector(root / "teacher.pt", teacher, spec)
    _invoke("synth-noise", "--ann", ann, "--out", root / "noise.parquet", "--rounds", "1",
            "--reg-copies", "8", "--cls-copies", "4,4")  # fmt: skip
    crossfit = root / "cf" / "crossfit.parquet"
    crossfit.parent.mkdir()
    above = _write_crossfit(crossfit, ann)
    return {"root": root, "ann": ann, "images": ann.parent / "images", "crossfit": crossfit,
            "above": above}  # fmt: skip


def _train(run: dict, out: Path, *extra: str):
    r = run
    return _invoke(
        "train-polisher", "--teacher", r["root"] / "teacher.pt", "--noise",
        r["root"] / "noise.parquet", "--ann", r["ann"], "--images", r["images"], "--out", out,
        "--run-dir", r["root"] / "no-run-dir", *FAST_TRAIN, *extra,
    )  # fmt: skip


def _polish(run: dict, polisher: Path, out: Path, *extra: str):
    r = run
    result = _invoke("polish", "--images", r["images"], "--teacher", r["root"] / "teacher.pt",
                     "--polisher", polisher, "--out", out, *FAST_POLISH, *extra)  # fmt: skip
    table, meta = read_pseudo_labels(out)
    return result, table, meta


def test_fitted_thresholds_round_trip_through_checkpoint_and_parquet(run, tmp_path):
    # without cross-fitted detections: nothing fitted, the paper's stay, said in one line
    plain = tmp_path / "plain.pt"
    result = _train(run, plain)
    assert "keep thresholds not fitted: no cross-fitted detections" in result.output
    assert torch.load(plain, weights_only=True)["extra"]["keep_thresholds"] is None
    result, _, meta = _polish(run, plain, tmp_path / "plain.parquet")
    assert "holds no fitted keep thresholds" in result.output
    thresholds = meta[META_THRESHOLDS]
    assert (thresholds["cls_prob"], thresholds["teacher_score"]) == (0.9, 0.9)
    assert thresholds["cls_prob_source"] == thresholds["teacher_score_source"] == "paper"
    assert meta[META_FITTED] is None

    # with them: fitted after training, stored, printed
    fitted_pt = tmp_path / "fitted.pt"
    result = _train(run, fitted_pt, "--crossfit", run["crossfit"], "--keep-fit-min-matches", "0")
    record = torch.load(fitted_pt, weights_only=True)["extra"]["keep_thresholds"]
    assert record["crossfit"] == str(run["crossfit"]) and record["initial_thresh"] == 0.5
    assert record["images"] == 6 and record["detections"] == run["above"]
    assert record["gt_boxes"] == sum(1 for _ in load_coco(run["ann"]).annotations)
    assert "keep thresholds (fitted)" in result.output
    assert f"cls_prob {record['cls_prob']:g}, teacher_score {record['teacher_score']:g}" in (
        result.output
    )
    # the record is the fit of the saved polisher on the main teacher's features
    teacher, spec = load_detector(run["root"] / "teacher.pt", "cpu")
    polisher = load_polisher(fitted_pt, teacher_sha=sha256_file(run["root"] / "teacher.pt"))
    assert polisher.fitted_thresholds == record
    again = fit_on_crossfit(run["crossfit"], teacher.eval(), spec.label_to_cat, polisher,
                            load_coco(run["ann"]), run["images"], 0.5, min_matches=0)  # fmt: skip
    assert {k: record[k] for k in again.to_dict()} == again.to_dict()

    # polish uses and records them (Parquet metadata round trip)
    result, _, meta = _polish(run, fitted_pt, tmp_path / "fitted.parquet")
    thresholds = meta[META_THRESHOLDS]
    assert thresholds["cls_prob"] == record["cls_prob"]
    assert thresholds["teacher_score"] == record["teacher_score"]
    assert thresholds["keep_rule"] == "fitted"
    assert thresholds["cls_prob_source"] == thresholds["teacher_score_source"] == "fitted"
    assert meta[META_FITTED] == record
    assert f"cls_prob {record['cls_prob']:g} (fitted)" in result.output

    # an explicit --cls-prob overrides the fitted value (the other stays fitted)
    _, table, meta = _polish(run, fitted_pt, tmp_path / "user.parquet", "--cls-prob", "0.123")
    thresholds = meta[META_THRESHOLDS]
    assert thresholds["cls_prob"] == 0.123 and thresholds["cls_prob_source"] == "user"
    assert thresholds["teacher_score"] == record["teacher_score"]
    assert thresholds["teacher_score_source"] == "fitted"
    rows = table.to_pylist()
    probs = np.array([r["polisher_prob"] for r in rows], np.float32)
    scores = np.array([r["teacher_score"] for r in rows], np.float32)
    assert rows
    choice = select_pseudo_labels(np.zeros(len(rows)), scores, np.ones(len(rows)), probs,
                                  0.123, record["teacher_score"])  # fmt: skip
    assert [r["use_cls"] for r in rows] == choice.use_cls.tolist()

    # --keep-rule paper is exactly the paper's rule, whatever the polisher fitted
    _, table, meta = _polish(run, fitted_pt, tmp_path / "paper.parquet", "--keep-rule", "paper")
    thresholds = meta[META_THRESHOLDS]
    assert (thresholds["cls_prob"], thresholds["teacher_score"]) == (0.9, 0.9)
    assert thresholds["keep_rule"] == "paper" and thresholds["cls_prob_source"] == "paper"
    rows = table.to_pylist()
    probs = np.array([r["polisher_prob"] for r in rows], np.float32)
    scores = np.array([r["teacher_score"] for r in rows], np.float32)
    teacher_labels = np.array([r["teacher_label"] for r in rows])
    polished_labels = np.array([r["polished_label"] for r in rows])
    choice = select_pseudo_labels(teacher_labels, scores, polished_labels, probs, 0.9, 0.9)
    assert [r["use_cls"] for r in rows] == choice.use_cls.tolist()
    assert (choice.use_cls == ((probs >= np.float32(0.9)) | (scores > np.float32(0.9)))).all()
    changed = polished_labels != teacher_labels
    assert not (changed & ~choice.relabelled).any()  # labels change only where relabelled


def test_resolution_order_and_the_loader_checks(tmp_path):
    fitted = {"cls_prob": 0.55, "teacher_score": 0.8}
    keep = resolve_keep_thresholds("fitted", fitted)
    assert (keep.cls_prob, keep.teacher_score, keep.note) == (0.55, 0.8, "")
    keep = resolve_keep_thresholds("fitted", fitted, cls_prob=0.7)
    assert (keep.cls_prob, keep.teacher_score) == (0.7, 0.8)
    assert keep.sources == {"cls_prob": "user", "teacher_score": "fitted"}
    keep = resolve_keep_thresholds("paper", fitted)
    assert (keep.cls_prob, keep.teacher_score, keep.sources["cls_prob"]) == (0.9, 0.9, "paper")
    keep = resolve_keep_thresholds("fitted", None)
    assert (keep.cls_prob, keep.teacher_score) == (0.9, 0.9) and "paper" in keep.note
    both = resolve_keep_thresholds("fitted", None, cls_prob=0.3, teacher_score=0.4)
    assert both.note == "" and set(both.sources.values()) == {"user"}

    base = {"image_id": [1, 1], "file_name": ["a.png", "a.png"], "fold": [0, 1],
            "x1": [0.0, 0.0], "y1": [0.0, 0.0], "x2": [5.0, 5.0], "y2": [5.0, 5.0],
            "score": [0.9, 0.8], "label": [1, 1]}  # fmt: skip
    pq.write_table(pa.table(base), tmp_path / "two_folds.parquet")
    with pytest.raises(DplError, match="held out by folds 0 and 1"):
        read_crossfit_detections(tmp_path / "two_folds.parquet")
    pq.write_table(pa.table({k: v for k, v in base.items() if k != "fold"}), tmp_path / "nf.pq")
    with pytest.raises(DplError, match="missing column"):
        read_crossfit_detections(tmp_path / "nf.pq")
    base["fold"] = [2, 2]
    pq.write_table(pa.table(base), tmp_path / "ok.parquet")
    det = read_crossfit_detections(tmp_path / "ok.parquet")["a.png"]
    assert det.fold == 2 and det.scores.dtype == np.float32 and len(det.at_least(0.85).boxes) == 1


def test_evaluate_pseudo_counts_changed_and_right_labels(tmp_path):
    # truths: three objects of class 1, 1, 2 far apart
    gt_boxes = [[0, 0, 20, 20], [40, 0, 60, 20], [0, 40, 20, 60]]
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": c, "bbox": [b[0], b[1], 20, 20],
             "iscrowd": 0, "area": 400}
            for i, (b, c) in enumerate(zip(gt_boxes, (1, 1, 2), strict=True))
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
    }  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    # (box, teacher label, score, polished label, use_cls)
    boxes = [
        ([0, 0, 20, 20], 2, 0.8, 1, True),  # changed, right (truth class 1)
        ([40, 0, 60, 20], 1, 0.7, 2, True),  # changed, broke a right label (class 1)
        ([0, 40, 20, 60], 2, 0.6, 2, False),  # unchanged, true positive dropped
        ([70, 70, 90, 90], 1, 0.55, 2, True),  # changed, no truth there
        ([0, 0, 20, 21], 1, 0.3, 1, False),  # below 0.5: not in the reference set
    ]
    cols: dict[str, list] = {}
    for b, tl, s, pl, use in boxes:
        row = {"image_id": 1, "file_name": "a.png", "width": 100, "height": 100,
               "status": "ok", "teacher_label": tl, "teacher_score": s, "polished_label": pl,
               "polisher_prob": 0.5, "use_cls": use, "use_reg": True,
               **{f"teacher_{c}": float(v) for c, v in zip(("x1", "y1", "x2", "y2"), b,
                                                           strict=True)},
               **{f"polished_{c}": float(v) for c, v in zip(("x1", "y1", "x2", "y2"), b,
                                                            strict=True)}}  # fmt: skip
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    pq.write_table(rows_to_table(cols), tmp_path / "p.parquet")
    result = _invoke("evaluate", "--pseudo", tmp_path / "p.parquet", "--ann",
                     tmp_path / "gt.json", "--json", tmp_path / "q.json")  # fmt: skip
    figures = json.loads((tmp_path / "q.json").read_text())
    assert figures["label_changes"] == {"changed": 3, "right": 1, "broke": 1, "no_truth": 1}
    keep = figures["keep_rule"]
    assert (keep["teacher_boxes"], keep["kept"]) == (4, 3)
    # teacher >= 0.5: boxes 2 and 3 are right -> P 2/4, R 2/3; kept (polished labels):
    # only box 1 is right -> P 1/3, R 1/3: a third of the recall lost
    assert keep["teacher_precision50"] == pytest.approx(0.5)
    assert keep["teacher_recall50"] == pytest.approx(2 / 3)
    assert keep["kept_precision50"] == pytest.approx(1 / 3)
    assert keep["kept_recall50"] == pytest.approx(1 / 3)
    assert keep["recall_lost"] == pytest.approx(1 / 3)
    assert "kept for classification: 3 of 4 teacher boxes" in result.output
    assert "labels changed by the polisher: 3 (1 right" in result.output
