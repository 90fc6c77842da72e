"""The polishers trained jointly in the online loop (``student.online_polisher``, the
paper's form): pairs drawn on the fly around the truth, one SGD step per iteration on the
batch's labeled images with the EMA teacher's features, an EMA copy that labels and is
saved tied to the EMA teacher, and a resumed run that ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from test_online import CONFIG, _weights, teacher_and_polisher
from typer.testing import CliRunner

from dpl_tools import api
from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco
from dpl_tools.engine.train_online import teacher_path_of
from dpl_tools.models.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def trained(synth_dataset, module_dir) -> dict:
    return teacher_and_polisher(synth_dataset, module_dir("online-joint"))


def test_truth_pairs_are_noisy_copies_around_the_truth() -> None:
    """The joint polishers' pairs, drawn on the fly: the truth boxes and Gaussian copies
    of them, regression targets the best-IoU truth box, classification labels its class
    at IoU >= fg_iou and background below; the same seed draws the same pairs."""
    import numpy as np

    from dpl_tools.data.polisher_pairs import CLS, REG, PairSettings, truth_pairs
    from dpl_tools.evaluation.matching import box_iou_np

    truth = np.array([[10, 10, 50, 40], [60, 20, 90, 80]], np.float32)
    labels = np.array([2, 3])
    settings = PairSettings(reg_copies=5, reg_scale=0.1, cls_copies=[4, 4], cls_scales=[0.1, 0.6])
    pairs = truth_pairs(truth, labels, settings, np.random.default_rng(0))
    noisy, target, _ = pairs[REG]
    assert 2 < len(noisy) <= 2 + 2 * 5 and (noisy[:2] == truth).all()
    iou = box_iou_np(noisy.astype(np.float64), truth.astype(np.float64))
    assert (target == truth[iou.argmax(1)]).all() and np.median(iou.max(1)) > 0.6
    boxes, _, cls_labels = pairs[CLS]
    best = box_iou_np(boxes.astype(np.float64), truth.astype(np.float64))
    want = np.where(best.max(1) >= settings.fg_iou, labels[best.argmax(1)], 0)
    assert (cls_labels == want).all() and (cls_labels == 0).any() and (cls_labels > 0).any()
    again = truth_pairs(truth, labels, settings, np.random.default_rng(0))
    assert all((a == b).all() for k in (REG, CLS) for a, b in zip(pairs[k], again[k], strict=True))


def test_joint_polishers_train_in_the_loop_and_polish_with_the_ema_teacher(
    trained, tmp_path
) -> None:
    """``student.online_polisher``: the polishers step on each batch's labeled images (the
    log shows their losses), the EMA copy labels and is saved tied to the EMA teacher,
    with the keep rule it started from; dpl polish takes the pair."""
    import json

    from dpl_tools.engine.online_polisher import polisher_path_of
    from dpl_tools.io import sha256_file
    from dpl_tools.models.polisher import load_polisher, read_polisher_checkpoint

    config = {**CONFIG, "student": {**CONFIG["student"], "iters": 2, "online_polisher": True,
                                    "online_polisher_lr": 0.05}}  # fmt: skip
    out, before = tmp_path / "student.pt", sha256_file(trained["polisher"])
    result = api.train_student_online(
        trained["ann"], trained["images"], trained["images"], trained["teacher"],
        trained["polisher"], out, config, device="cpu",
    )  # fmt: skip
    saved = polisher_path_of(out)
    assert result.extra["polisher"] == str(saved)
    joint = load_polisher(saved, teacher_sha=sha256_file(teacher_path_of(out)))
    start = load_polisher(trained["polisher"])
    a, b = joint.state_dict(), start.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "the polishers did not learn"
    assert joint.fitted_thresholds == start.fitted_thresholds
    record = read_polisher_checkpoint(saved)["extra"]
    assert record["online_of"] == str(out) and record["iterations"] == 2
    for line in result.extra["log"]:  # a step per iteration: both losses, finite
        assert line["polisher_reg"] >= 0 and line["polisher_cls"] > 0
    shown = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert shown.exit_code == 0, shown.output
    assert "joint polishers: reg loss" in (tmp_path / "report/index.html").read_text()
    gt, labels, listed = load_coco(trained["ann"]), tmp_path / "labels.parquet", tmp_path / "4.json"
    listed.write_text(json.dumps({"images": gt.images[:4], "annotations": [],
                                  "categories": gt.categories}))  # fmt: skip
    api.polish(listed, labels, teacher_path_of(out), saved, config, image_root=trained["images"],
               device="cpu", progress=False)  # fmt: skip
    assert labels.is_file()
    assert sha256_file(trained["polisher"]) == before, "the given polishers' file changed"


def test_killed_joint_online_run_resumes_to_the_uninterrupted_weights(trained, tmp_path) -> None:
    """Killed after its periodic checkpoint, a resumed online run ends with the student,
    the EMA teacher, the in-loop log and the jointly trained polishers of the run that was
    never stopped (the student's resume without joint polishers is the same loop, less the
    polishers' state)."""
    from test_loop import StopAt

    from dpl_tools.config import load_config
    from dpl_tools.engine.online_polisher import polisher_path_of
    from dpl_tools.engine.train_online import train_student_online
    from dpl_tools.models.polisher import read_polisher_checkpoint

    student = {**CONFIG["student"], "iters": 3, "checkpoint_every": 2, "ema_momentum": 0.9,
               "online_polisher": True, "online_eval_images": 4}  # fmt: skip
    cfg = load_config(None, {**CONFIG, "student": student})
    args = (trained["ann"], trained["images"], trained["images"])
    kwargs = {"config": cfg, "teacher": trained["teacher"], "polisher": trained["polisher"],
              "unlabeled_gt": trained["ann"], "device": "cpu", "seed": 3}  # fmt: skip
    whole, once = tmp_path / "whole.pt", tmp_path / "resumed.pt"
    *_, log = train_student_online(*args, whole, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        train_student_online(*args, once, **kwargs, hooks=[StopAt(2)])
    assert not once.exists() and (tmp_path / "resumed.last.pt").is_file()
    _, _, result, resumed_log = train_student_online(*args, once, **kwargs, resume=True)
    assert (result.iterations, result.iterations_run) == (3, 1)
    for a, b in ((whole, once), (teacher_path_of(whole), teacher_path_of(once))):
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name
    assert [e["iteration"] for e in resumed_log.history] == [0, 1, 2, 3]
    assert resumed_log.history == log.history
    wa, wb = (read_polisher_checkpoint(polisher_path_of(p))["state_dict"]
              for p in (whole, once))  # fmt: skip
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert log.history[-1]["polisher_reg"] is not None
    assert read_checkpoint(once)["spec"]["extra"]["online_log"] == log.history
