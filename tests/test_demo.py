"""dpl demo: the whole method on built-in synthetic data, with its table and --json figures."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from test_pipeline import TINY, _dpl

from dpl_tools.data.pseudo_labels import META_THRESHOLDS, read_pseudo_labels

KEYS = ("teacher_ap", "student_labeled_only_ap", "student_raw_ap", "student_polished_ap",
        "pseudo_iou_before", "pseudo_iou_after", "pseudo_teacher_boxes", "pseudo_kept",
        "pseudo_recall_lost", "labels_changed", "labels_changed_right", "pseudo_kept_fraction",
        "keep_rule_source", "reg_steps_source")  # fmt: skip


def _demo(tmp_path: Path, *extra: str):
    """``dpl demo`` on the tiny test preset, run as a user would (a subprocess)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    small = ["--train-images", "40", "--test-images", "12", "--percent", "25"]
    return _dpl("demo", "--config", str(config), "--device", "cpu", *small, *extra, cwd=tmp_path)


def test_demo_runs_the_method_and_writes_its_figures(tmp_path):
    run_dir = tmp_path / "run"
    figures_path = tmp_path / "figures.json"
    done = _demo(tmp_path, "--out", str(run_dir), "--json", str(figures_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    figures = json.loads(figures_path.read_text())
    assert set(figures) == set(KEYS)
    # the figures are the stage outputs' own numbers, not made up by the summary
    for key, name in (("teacher_ap", "teacher"), ("student_raw_ap", "student-raw"),
                      ("student_labeled_only_ap", "student-labeled-only"),
                      ("student_polished_ap", "student")):  # fmt: skip
        assert 0.0 <= figures[key] <= 1.0
        assert figures[key] == json.loads((run_dir / "eval" / f"{name}.json").read_text())["AP"]
    quality = json.loads((run_dir / "pseudo_quality.json").read_text())["box_quality"]
    assert figures["pseudo_iou_before"] == quality["mean_iou_before"]
    assert figures["pseudo_iou_after"] == quality["mean_iou_after"]
    if quality["boxes"]:  # a 2-iteration teacher may match no truth box (IoU then n/a)
        assert 0.0 < figures["pseudo_iou_after"] <= 1.0
    pseudo = json.loads((run_dir / "pseudo_quality.json").read_text())
    kept, changes = pseudo["keep_rule"], pseudo["label_changes"]
    assert (figures["pseudo_teacher_boxes"], figures["pseudo_kept"]) == (
        kept["teacher_boxes"], kept["kept"])  # fmt: skip
    assert figures["pseudo_recall_lost"] == kept["recall_lost"]
    assert (figures["labels_changed"], figures["labels_changed_right"]) == (
        changes["changed"], changes["right"])  # fmt: skip
    assert 0 <= figures["labels_changed_right"] <= figures["labels_changed"]
    # the kept share and where the keep rule and regression labels came from (issue 26)
    if kept["teacher_boxes"]:
        assert figures["pseudo_kept_fraction"] == kept["kept"] / kept["teacher_boxes"]
    thresholds = read_pseudo_labels(run_dir / "labels.parquet")[1][META_THRESHOLDS]
    assert figures["keep_rule_source"] == thresholds["keep_rule_source"]
    assert figures["reg_steps_source"] == thresholds["reg_steps_source"]
    assert "share of teacher" in done.stdout
    for artifact in ("teacher.pt", "polisher.pt", "labels.parquet", "student.pt",
                     "student_raw.pt", "student_labeled_only.pt", "split/labeled.json",
                     "data/train/annotations.json"):  # fmt: skip
        assert (run_dir / artifact).is_file(), artifact
    assert "student AP, polished pseudo labels" in done.stdout
    assert "student AP, labeled images only" in done.stdout
    # the data asked for: 40 training images (25% = 10 labeled), 12 test, 6 texture classes
    train = json.loads((run_dir / "data/train/annotations.json").read_text())
    test = json.loads((run_dir / "data/test/annotations.json").read_text())
    labeled = json.loads((run_dir / "split/labeled.json").read_text())
    assert (len(train["images"]), len(test["images"]), len(labeled["images"])) == (40, 12, 10)
    assert [c["name"] for c in train["categories"]][3:] == [
        "striped square", "striped disc", "striped triangle"]  # fmt: skip

    # --out keeps a run directory: a second demo skips every finished stage
    mtime = (run_dir / "student.pt").stat().st_mtime_ns
    again = _demo(tmp_path, "--out", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "student.pt").stat().st_mtime_ns == mtime
    for stage in (
        "train-teacher",
        "polish",
        "train-student",
        "train-student-raw",
        "train-student-labeled-only",
    ):
        assert f"- {stage}: up to date" in again.stdout
        assert f"> {stage}:" not in again.stdout


def test_demo_rejects_a_missing_config_before_making_anything(tmp_path):
    missing = tmp_path / "nope.yaml"
    done = _dpl("demo", "--config", str(missing), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode != 0
    assert "nope.yaml: config file not found" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
