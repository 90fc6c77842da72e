"""The student criterion: the view table, the target builder's dropped rows, heads built
without re-classing, the per-batch weighting, and refusing a student with no usable pseudo
label (train-student --allow-empty)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_train_student import _config, write_student_inputs
from torchvision.models.detection.roi_heads import RoIHeads
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.pseudo_targets import ROW_COLUMNS, PseudoImage
from dpl_tools.engine.train_student import load_student_data
from dpl_tools.errors import DplError
from dpl_tools.models.detector import build_detector
from dpl_tools.models.student_criterion import (
    SUPERVISION,
    VIEWS,
    StudentCriterion,
    StudentRoIHeads,
    make_student,
    student_target,
    supervision,
)

FAST = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
        "box_batch_size_per_image": 32}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image_rows(rows: list[dict], width: int = 100, height: int = 80) -> PseudoImage:
    """A PseudoImage from row dicts (missing numbers NaN, missing flags False)."""
    cols = {}
    for c in ROW_COLUMNS:
        if c.startswith("use_"):
            cols[c] = np.array([bool(r.get(c, False)) for r in rows], bool)
        else:
            cols[c] = np.array([r.get(c, np.nan) for r in rows], np.float64)
    return PseudoImage("a.png", width, height, cols)


def box(prefix: str, x1, y1, x2, y2) -> dict:
    return dict(
        zip([f"{prefix}_{c}" for c in ("x1", "y1", "x2", "y2")], (x1, y1, x2, y2), strict=True)
    )


def test_every_view_and_flag_has_a_supervision() -> None:
    assert {(v, d) for v in VIEWS for d in (True, False)} == set(SUPERVISION)
    paper = supervision("polished", True)
    assert (paper.cls.rows, paper.cls.boxes, paper.cls.labels) == (
        "use_cls", "teacher", "polished_label")  # fmt: skip
    assert (paper.reg.rows, paper.reg.boxes, paper.reg.labels) == (
        "use_reg", "polished", "teacher_label")  # fmt: skip
    assert supervision("raw", True).reg is None and supervision("polished", False).reg is None
    with pytest.raises(DplError, match="unknown pseudo-label view"):
        supervision("sharp")


def test_unusable_rows_are_dropped_and_counted_once() -> None:
    good = {**box("teacher", 10, 10, 30, 30), **box("polished", 11, 11, 31, 31),
            "teacher_label": 1, "polished_label": 2, "use_cls": True, "use_reg": True}  # fmt: skip
    rows = [
        good,
        {**good, "polished_x1": np.nan},  # regression box NaN: dropped from regression
        {**good, "teacher_x1": 40, "teacher_x2": 20},  # inverted teacher box
        {**good, **box("teacher", 200, 10, 220, 30)},  # outside the image: empty once clipped
        {**good, "teacher_y2": np.inf},  # infinite: not stretched to the image edge
        {**good, "polished_label": np.nan},  # no classification label
        {**good, **box("teacher", -5, 70, 50, 95)},  # partly outside: clipped, kept
        {**good, "use_cls": False, "use_reg": False, "teacher_x1": np.nan},  # in no set
    ]
    image = image_rows(rows)
    target, dropped = student_target(image, supervision("polished", True), {1: 1, 2: 2})
    assert dropped == 5  # rows 1-5, each once although row 1 is fine for classification
    torch.testing.assert_close(
        target["boxes"],
        torch.tensor([[10.0, 10, 30, 30], [10, 10, 30, 30], [0, 70, 50, 80]]),
    )
    assert target["labels"].tolist() == [2, 2, 2]
    assert len(target["reg_boxes"]) == 6 and target["reg_labels"].tolist() == [1] * 6
    # the raw view reads every row's teacher box and label: the polished NaNs do not
    # matter, the last row's NaN teacher box does
    raw, dropped = student_target(image, supervision("raw"), {1: 1, 2: 2})
    assert dropped == 4 and len(raw["boxes"]) == 4 and "reg_boxes" not in raw


def test_student_heads_share_the_modules_without_reclassing() -> None:
    torch.manual_seed(0)
    plain = build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)
    heads = plain.roi_heads
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    student = make_student(plain)
    assert type(heads) is RoIHeads  # the original object is left as it was
    assert isinstance(student.roi_heads, StudentRoIHeads)
    assert student.roi_heads.box_predictor is heads.box_predictor
    after = student.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    h = student.roi_heads
    assert (h.proposal_matcher.high_threshold, h.proposal_matcher.low_threshold) == (
        heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold)  # fmt: skip
    assert h.fg_bg_sampler.batch_size_per_image == 32
    assert (h.score_thresh, h.nms_thresh, h.detections_per_img) == (
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img)  # fmt: skip
    assert make_student(student).roi_heads is h  # idempotent
    # inference is the plain detector's
    image = [torch.rand(3, 64, 80)]
    reference = build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)
    reference.load_state_dict(before)
    student.eval()
    reference.eval()
    with torch.no_grad():
        (a,), (b,) = student(image), reference(image)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key])


def test_criterion_weights_and_skips_the_unlabeled_set() -> None:
    torch.manual_seed(0)
    model = make_student(build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    labeled = {"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([1])}
    pseudo = {"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([2]),
              "reg_boxes": torch.tensor([[12.0, 10, 50, 52]]), "reg_labels": torch.tensor([2]),
              "pseudo": True}  # fmt: skip
    torch.manual_seed(1)
    one = StudentCriterion(1.0)(model, images, [labeled, pseudo])
    torch.manual_seed(1)
    half = StudentCriterion(0.5)(model, images, [labeled, pseudo])
    assert {k.split("_", 1)[0] for k in one} == {"labeled", "unlabeled"}
    for key in one:
        factor = 0.5 if key.startswith("unlabeled_") else 1.0
        torch.testing.assert_close(half[key], one[key] * factor)
    off = StudentCriterion(0.0)(model, images, [labeled, pseudo])
    assert off and all(k.startswith("labeled_") for k in off)
    assert StudentCriterion(1.0)(model, images[:1], [labeled]).keys() == {
        k for k in one if k.startswith("labeled_")
    }


def _pseudo_file(inputs: dict, tmp_path, change) -> str:
    """A copy of the test's pseudo-label file with ``change(row)`` applied to every box row."""
    table = pq.read_table(inputs["pseudo"])
    rows = [change(dict(r)) for r in table.to_pylist()]
    cols = {name: [r[name] for r in rows] for name in table.column_names}
    out = tmp_path / "labels.parquet"
    pq.write_table(rows_to_table(cols, {META_CATEGORIES: inputs["raw"]["categories"]}), out)
    return str(out)


@pytest.fixture(scope="module")
def inputs(synth_dataset, module_dir) -> dict:
    return write_student_inputs(synth_dataset, module_dir("criterion"))


def _load(inputs: dict, pseudo, **student):
    scfg = _config(**student)["student"]
    return load_student_data(inputs["ann"], inputs["images"], pseudo, None, scfg, console=None)


def test_no_usable_pseudo_label_is_refused_unless_allowed(inputs, tmp_path, capsys) -> None:
    def nan_box(row: dict) -> dict:
        return {**row, "teacher_x1": float("nan"), "polished_y2": float("nan")}

    broken = _pseudo_file(inputs, tmp_path, nan_box)
    with pytest.raises(DplError, match="no usable pseudo label") as info:
        _load(inputs, broken)
    message = str(info.value)
    assert broken in message and "--allow-empty" in message and "\n" not in message
    assert f", {len(pq.read_table(broken))} row(s) dropped" in message

    _, stats = _load(inputs, broken, allow_empty=True)
    assert stats.cls_boxes == stats.reg_boxes == 0 and stats.dropped_rows > 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "no usable pseudo label" in printed and "training anyway" in printed
    # labeled images only (--unlabeled-ratio 0): the pseudo labels are not used, no error
    _, stats = _load(inputs, broken, unlabeled_ratio=0.0)
    assert stats.cls_boxes == 0

    # a few broken rows are dropped, counted and reported; the run goes on
    def some_broken(row: dict) -> dict:
        return nan_box(row) if row["image_id"] % 2 else row

    partial = _pseudo_file(inputs, tmp_path, some_broken)
    _, stats = _load(inputs, partial)
    assert 0 < stats.dropped_rows < len(pq.read_table(partial)) and stats.reg_boxes > 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{stats.dropped_rows} pseudo-label row(s) dropped" in printed


def test_cli_allow_empty_trains_and_reports(inputs, tmp_path) -> None:
    broken = _pseudo_file(inputs, tmp_path, lambda r: {**r, "teacher_x2": -1.0, "use_reg": False})
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        json.dumps({"model": _config()["model"].to_dict(), "student": {"warmup_iters": 1}})
    )
    args = ["train-student", "--images", str(inputs["images"]), "--ann", str(inputs["ann"]),
            "--pseudo", broken, "--init", str(inputs["teacher"]), "--config", str(preset),
            "--device", "cpu", "--iters", "1", "--batch-size", "1", "--workers", "0",
            "--out", str(tmp_path / "s.pt")]  # fmt: skip
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, DplError) and not (tmp_path / "s.pt").exists()
    assert "no usable pseudo label" in str(refused.exception)
    allowed = CliRunner().invoke(app, [*args, "--allow-empty"])
    assert allowed.exit_code == 0, allowed.output
    printed = " ".join(allowed.output.split())
    assert "training anyway" in printed and "pseudo-label row(s) dropped" in printed
    assert "dropped rows" in printed  # the summary table counts them too
    assert (tmp_path / "s.pt").is_file()
