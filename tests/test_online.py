"""Online polishing (train-student --online): the EMA teacher and the polishers label the
unlabeled images inside the loop, through dpl polish's code path; the EMA teacher moves
by the momentum after each step and is saved as a loadable detector."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dpl_tools import api
from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco
from dpl_tools.data.pseudo_label_writer import empty_columns, rows_to_table
from dpl_tools.data.pseudo_targets import pseudo_images
from dpl_tools.engine.online import pseudo_image
from dpl_tools.engine.polish_job import image_rows
from dpl_tools.engine.train_online import teacher_path_of
from dpl_tools.models.checkpoint import read_checkpoint
from dpl_tools.models.student_criterion import student_target, supervision

FAST = {
    "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}  # fmt: skip
RUN = {"batch_size": 2, "workers": 0, "warmup_iters": 1, "checkpoint_every": 0}
CONFIG = {
    "model": {"min_size": 64, "max_size": 96, "detector_kwargs": FAST},
    "teacher": {"iters": 2, **RUN},
    "polisher": {"iters": 2, "noise_model": "gaussian", "rounds": 1, **RUN},
    # a 2-iteration teacher scores low: polish its 20 best boxes per image, so there are labels
    "polish": {"workers": 0, "score_thresh": 0.0, "initial_thresh": 0.0, "detections_per_img": 20},
    "student": {"iters": 1, "ema_momentum": 0.5, "online_log_every": 1, **RUN},
}


@pytest.fixture(scope="module")
def trained(synth_dataset, module_dir) -> dict:
    return teacher_and_polisher(synth_dataset, module_dir("online"))


def teacher_and_polisher(synth_dataset, root) -> dict:
    """A 2-iteration teacher and its polisher (gaussian pairs) on the synthetic set."""
    images = synth_dataset.parent / "images"
    teacher = api.train_teacher(synth_dataset, images, root / "teacher.pt", CONFIG, device="cpu")
    polisher = api.train_polisher(teacher.checkpoint, synth_dataset, images,
                                  root / "polisher.pt", CONFIG, noise=root / "noise.parquet",
                                  device="cpu")  # fmt: skip
    return {"root": root, "ann": synth_dataset, "images": images,
            "teacher": teacher.checkpoint, "polisher": polisher.checkpoint}  # fmt: skip


def _weights(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def test_online_student_moves_its_ema_teacher_and_saves_both(trained, tmp_path) -> None:
    out = tmp_path / "student.pt"
    result = api.train_student_online(
        trained["ann"], trained["images"], trained["images"], trained["teacher"],
        trained["polisher"], out, CONFIG, unlabeled_gt=trained["ann"], device="cpu",
    )  # fmt: skip
    ema_path = teacher_path_of(out)
    assert out.is_file() and ema_path.is_file() and result.extra["teacher"] == str(ema_path)
    student, ema, start = _weights(out), _weights(ema_path), _weights(trained["teacher"])
    assert read_checkpoint(ema_path)["spec"]["kind"] == "teacher"
    assert read_checkpoint(out)["spec"]["kind"] == "student"
    # one step at momentum 0.5: the EMA teacher is halfway between the start and the student
    moved = [k for k in student if student[k].is_floating_point()
             and not torch.equal(student[k], start[k])]  # fmt: skip
    assert moved, "the student did not learn"
    for key in moved:
        assert torch.allclose(ema[key], 0.5 * start[key] + 0.5 * student[key], atol=1e-6), key
    # with the hidden truth: the evaluation slice before training (the teacher's), then
    # one line per iteration (online_log_every 1)
    before, entry = result.extra["log"]
    assert before["iteration"] == 0 and before["pseudo_boxes"] == 0
    assert entry["iteration"] == 1 and entry["pseudo_boxes"] > 0
    # the EMA teacher detects with the polish section's test-time settings, as dpl polish:
    # at most detections_per_img boxes on each of the step's 2 pseudo-labeled images
    assert entry["pseudo_boxes"] <= 2 * CONFIG["polish"]["detections_per_img"]
    assert entry["teacher_recall"] is not None and 0 <= entry["teacher_recall"] <= 1
    assert entry["iou_before"] is not None and entry["iou_after"] is not None
    for line in (before, entry):  # all 24 unlabeled images, compared at the first recall
        assert line["slice_images"] == 24 and line["slice_at_recall"] == before["slice_at_recall"]
        assert 0 <= line["slice_teacher_ap50"] <= 1
    # a 2-iteration teacher keeps no pseudo label: precision is compared at its boxes' recall
    assert before["slice_kept_recall"] == 0 and before["slice_at_recall"] > 0
    assert before["slice_teacher_precision_at_recall"] > 0
    # dpl report STUDENT.pt: the log as a table (a row per line) and two plots
    shown = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert shown.exit_code == 0, shown.output
    page = (tmp_path / "report/index.html").read_text()
    assert "Online training report" in page and page.count("<tr>") == 1 + 2
    for plot in ("slice.png", "batches.png"):
        assert (tmp_path / "report/plots" / plot).stat().st_size > 0
    offline = CliRunner().invoke(app, ["report", str(trained["teacher"]), "--out",
                                       str(tmp_path / "r2")])  # fmt: skip
    assert offline.exit_code != 0 and "not an online student" in str(offline.exception)
    assert not (tmp_path / "r2" / "index.html").exists()
    assert read_checkpoint(out)["spec"]["extra"]["online_log"] == result.extra["log"]
    from dpl_tools.engine.online_polisher import polisher_path_of

    assert not polisher_path_of(out).exists()  # the polishers train only when asked


def test_online_targets_are_the_offline_targets_of_the_same_boxes(trained) -> None:
    """The loop's pseudo labels of an image become the same student target as the rows
    dpl polish writes for the same detections (one implementation)."""
    coco = load_coco(trained["ann"])
    label_to_cat = {i + 1: c["id"] for i, c in enumerate(coco.categories)}
    det = {
        "boxes": torch.tensor([[2.0, 3.0, 30.0, 40.0], [50.0, 10.0, 90.0, 60.0]]),
        "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 2]),
        "polished_boxes": torch.tensor([[3.0, 3.5, 31.0, 41.0], [52.0, 11.0, 88.0, 62.0]]),
        "polished_labels": torch.tensor([1, 3]), "polisher_labels": torch.tensor([1, 3]),
        "probs": torch.tensor([0.95, 0.4]), "use_cls": torch.tensor([True, False]),
        "use_reg": torch.tensor([True, True]),
    }  # fmt: skip
    online = pseudo_image(det, label_to_cat, "a.png", 96, 128)
    cols = empty_columns()
    image_rows(cols, {"id": 1, "file_name": "a.png"}, (96, 128), det, label_to_cat)
    (offline,) = pseudo_images(rows_to_table(cols, {}))
    chosen = supervision("polished", True)
    a, _ = student_target(online, chosen, coco.cat_to_label, "ignore")
    b, _ = student_target(offline, chosen, coco.cat_to_label, "ignore")
    assert a.keys() == b.keys() and len(a["boxes"]) == 1 and len(a["ignore_boxes"]) == 1
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double()), key


def test_precision_at_recall_is_the_best_precision_reaching_it() -> None:
    from dpl_tools.engine.online_eval import precision_at_recall

    curve = {"precision": [1.0, 0.5, 0.6667, 0.5], "recall": [0.25, 0.25, 0.5, 0.5]}
    assert precision_at_recall(curve, 0.25) == 1.0
    assert precision_at_recall(curve, 0.4) == 0.6667
    assert precision_at_recall(curve, 0.75) is None
    assert precision_at_recall({"precision": [], "recall": []}, 0.1) is None


def test_evaluation_slice_scores_what_dpl_polish_writes_for_its_images(trained, tmp_path) -> None:
    """The slice is a fixed seeded sample of the images with truth, and its figures are
    those of ``dpl evaluate --pseudo`` on the file ``dpl polish`` writes for the same
    images with the same teacher and polisher (one labelling and one scoring path)."""
    import json

    from dpl_tools.config import load_config
    from dpl_tools.data.image_list import load_image_list
    from dpl_tools.data.pseudo_labels import read_pseudo_labels
    from dpl_tools.engine.online_eval import EvaluationSlice, slice_records
    from dpl_tools.engine.polish_settings import applied_polisher
    from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality
    from dpl_tools.models.checkpoint import load_detector
    from dpl_tools.models.polisher import load_polisher

    gt = load_coco(trained["ann"])
    records = list(load_image_list(trained["images"]))
    chosen = slice_records(records, gt, 5, seed=1)
    names = [r["file_name"] for r in chosen]
    assert names == [r["file_name"] for r in slice_records(records[::-1], gt, 5, seed=1)]
    assert names != [r["file_name"] for r in slice_records(records, gt, 5, seed=2)]
    assert len(set(names)) == 5 and len(slice_records(records, gt, 100, seed=1)) == 24

    # keep every box: the 2-iteration teacher's scores are far below any fitted rule
    keep_all = {**CONFIG, "polish": {**CONFIG["polish"], "cls_prob": 0.0, "teacher_score": 0.0}}
    model, spec = load_detector(trained["teacher"])
    refiner = load_polisher(trained["polisher"])
    settings = applied_polisher(load_config(None, keep_all)["polish"], refiner,
                                trained["polisher"]).settings  # fmt: skip
    kept_slice = EvaluationSlice(chosen, gt, settings, spec.label_to_cat)
    figures = kept_slice.evaluate(model, refiner)

    listed = tmp_path / "slice.json"  # the same images as a COCO image list for dpl polish
    listed.write_text(json.dumps({"images": [im for im in gt.images if im["file_name"] in names],
                                  "annotations": [], "categories": gt.categories}))  # fmt: skip
    out = tmp_path / "slice.parquet"
    api.polish(listed, out, trained["teacher"], trained["polisher"], keep_all,
               image_root=trained["images"], device="cpu", progress=False)  # fmt: skip
    table, _ = read_pseudo_labels(out)
    quality = pseudo_label_quality(table, gt)
    teacher, kept = quality["views"]["teacher"], quality["views"]["cls"]
    assert kept["boxes"] > 0
    assert figures["slice_images"] == 5
    assert figures["slice_teacher_ap50"] == round(teacher["AP50"], 4)
    assert figures["slice_kept_precision"] == round(kept["precision50"], 4)
    assert figures["slice_at_recall"] == figures["slice_kept_recall"] == round(kept["recall50"], 4)
    # compared at its own recall, the kept set's precision is reached (its last cut or better)
    assert figures["slice_kept_precision_at_recall"] >= figures["slice_kept_precision"]
    assert figures["slice_iou_after"] == round(quality["box_quality"]["mean_iou_after"], 4)
    assert kept_slice.warning is None

    # a teacher that keeps nothing: compared at its boxes' recall, and said so
    keep_none = {**CONFIG, "polish": {**CONFIG["polish"], "cls_prob": 1.0, "teacher_score": 1.0}}
    strict = applied_polisher(load_config(None, keep_none)["polish"], refiner,
                              trained["polisher"]).settings  # fmt: skip
    nothing = EvaluationSlice(chosen, gt, strict, spec.label_to_cat)
    none_kept = nothing.evaluate(model, refiner)
    assert not none_kept["slice_kept_recall"]
    assert none_kept["slice_at_recall"] == round(teacher["recall50"], 4) > 0
    assert "keeps no correct pseudo label on the 5 evaluation images" in nothing.warning


def test_cli_online_and_its_refusals(trained, tmp_path) -> None:
    import json

    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps(CONFIG))
    base = [
        "train-student", "--online", "--ann", str(trained["ann"]), "--images",
        str(trained["images"]), "--unlabeled", str(trained["images"]), "--teacher",
        str(trained["teacher"]), "--polisher", str(trained["polisher"]), "--config",
        str(preset), "--device", "cpu",
    ]  # fmt: skip
    out = tmp_path / "s.pt"
    result = CliRunner().invoke(app, [*base, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "online pseudo labels:" in result.output and "EMA teacher" in result.output
    assert teacher_path_of(out).is_file()
    soft = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "t.pt"), "--negatives", "soft"])
    assert "--negatives ignore or hard" in str(soft.exception)
    same = CliRunner().invoke(app, [*base, "--out", str(trained["teacher"])])
    assert same.exception is not None and "teacher.pt" in str(same.exception)


def test_online_pipeline_stage_equals_its_printed_command(trained, tmp_path) -> None:
    """``dpl run`` with ``student.online``: the stage calls api.train_student_online; its
    printed command line, typed, trains the same student: it says --online itself, so it
    does so with a config that does not."""
    import json

    from dpl_tools.pipeline import online_student_stage

    preset = tmp_path / "offline.yaml"
    preset.write_text(json.dumps(CONFIG))
    stage = online_student_stage(
        "train-student", trained["ann"], trained["images"], trained["ann"], trained["teacher"],
        trained["polisher"], tmp_path / "called.pt", 0, str(preset), "cpu",
    )  # fmt: skip
    result = stage.call(console=None)
    assert result.checkpoint == tmp_path / "called.pt" and result.extra["log"]
    argv = stage.argv
    assert argv[:2] == ["train-student", "--online"] and "--pseudo" not in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "typed.pt")
    typed = CliRunner().invoke(app, argv)
    assert typed.exit_code == 0, typed.output
    a, b = _weights(tmp_path / "called.pt"), _weights(tmp_path / "typed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # dpl run shows the stage's result as the command prints it: the online student's table
    from rich.console import Console

    from dpl_tools.cli.options import show_stage_result

    shown = Console(record=True, width=200)
    show_stage_result(shown, stage, result)
    text = shown.export_text()
    for line in ("(online)", "EMA teacher", "pseudo labels made"):
        assert line in text and line in typed.output, line


def test_two_process_online_run_under_torchrun(trained, tmp_path) -> None:
    """``--online`` under torchrun (gloo, 2 CPU processes), the polishers trained jointly:
    one report, a student and its EMA teacher that load and detect."""
    import json

    from test_student_ddp import torchrun_dpl

    from dpl_tools.data.detection import DetectionDataset
    from dpl_tools.models.checkpoint import load_detector

    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps(CONFIG))
    out = tmp_path / "student.pt"
    proc = torchrun_dpl([
        "train-student", "--online", "--ann", str(trained["ann"]),
        "--images", str(trained["images"]), "--unlabeled", str(trained["images"]),
        "--teacher", str(trained["teacher"]), "--polisher", str(trained["polisher"]),
        "--config", str(preset), "--out", str(out), "--iters", "2", "--batch-size", "1",
        "--workers", "0", "--device", "cpu", "--checkpoint-every", "1", "--online-polisher",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("online pseudo labels: iteration 2 ") == 1  # rank 0 only
    assert read_checkpoint(out)["train_state"]["iteration"] == 2
    # the jointly trained polishers (gradients averaged over the two processes) are saved
    # once, tied to the EMA teacher
    from dpl_tools.engine.online_polisher import polisher_path_of
    from dpl_tools.io import sha256_file
    from dpl_tools.models.polisher import load_polisher

    load_polisher(polisher_path_of(out), teacher_sha=sha256_file(teacher_path_of(out)))
    image = DetectionDataset(load_coco(trained["ann"]), trained["images"])[0][0]
    for path in (out, teacher_path_of(out)):
        model, spec = load_detector(path)
        with torch.no_grad():
            (pred,) = model([image])
        assert pred["boxes"].shape[-1] == 4 and spec.num_classes == 3
