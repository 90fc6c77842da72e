"""Student training: which pseudo labels each view uses, labeled:unlabeled pairing, the
weighted loss, a few steps that give a loadable student, resume, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpl_tools.config import load_config
from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.student_data import StudentDataset
from dpl_tools.engine.train_student import load_student_data, train_student
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec, load_detector, read_checkpoint, save_detector
from dpl_tools.models.detector import build_detector, set_test_settings
from dpl_tools.models.student_criterion import make_student, student_losses

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}
TINY = {"min_size": 64, "max_size": 96, "arch": "mobilenet_v2_fpn", "detector_kwargs": FAST}
SHIFT = 3.0  # teacher boxes = ground truth shifted right by this; polished boxes = truth


def _config(iters: int = 2, **student) -> dict:
    values = {"iters": iters, "batch_size": 1, "workers": 0, "warmup_iters": 1}
    values["checkpoint_every"] = 0
    return load_config(None, {"model": TINY, "student": {**values, **student}})


def write_student_inputs(synth_json: Path, out: Path) -> dict[str, Path]:
    """A 6-image labeled split, a 4-image pseudo-label file (the next images) and an
    untrained teacher checkpoint, laid out as a run directory in ``out``."""
    raw = json.loads(synth_json.read_text())
    labeled_ids = {im["id"] for im in raw["images"][:6]}
    unlabeled = raw["images"][6:10]
    (out / "split").mkdir(parents=True, exist_ok=True)
    labeled = {
        "images": [im for im in raw["images"] if im["id"] in labeled_ids],
        "annotations": [a for a in raw["annotations"] if a["image_id"] in labeled_ids],
        "categories": raw["categories"],
    }
    (out / "split/labeled.json").write_text(json.dumps(labeled))
    cols: dict[str, list] = {}
    for k, im in enumerate(unlabeled):
        anns = [a for a in raw["annotations"] if a["image_id"] == im["id"]]
        for j, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            row = {
                "image_id": im["id"], "file_name": im["file_name"], "width": im["width"],
                "height": im["height"], "status": "ok", "teacher_x1": x + SHIFT,
                "teacher_y1": y, "teacher_x2": x + w + SHIFT, "teacher_y2": y + h,
                "teacher_label": a["category_id"], "teacher_score": 0.8, "polished_x1": x,
                "polished_y1": y, "polished_x2": x + w, "polished_y2": y + h,
                "polished_label": a["category_id"], "polisher_prob": 0.95,
                "use_cls": not (k == 0 and j == 0), "use_reg": True,
            }  # fmt: skip
            for key, value in row.items():
                cols.setdefault(key, []).append(value)
    table = rows_to_table(cols, {META_CATEGORIES: raw["categories"]})
    import pyarrow.parquet as pq

    pq.write_table(table, out / "labels.parquet")
    model = build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST)
    spec = DetectorSpec("mobilenet_v2_fpn", raw["categories"], 64, 96, kind="teacher")
    save_detector(out / "teacher.pt", model, spec)
    return {
        "ann": out / "split/labeled.json",
        "pseudo": out / "labels.parquet",
        "teacher": out / "teacher.pt",
        "images": synth_json.parent / "images",
        "raw": raw,  # type: ignore[dict-item]
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine, oversubscribed threads make a
    CPU training step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(synth_dataset, module_dir) -> dict:
    return write_student_inputs(synth_dataset, module_dir("student"))


def _truth(raw: dict, file_name: str) -> np.ndarray:
    image_id = next(im["id"] for im in raw["images"] if im["file_name"] == file_name)
    boxes = [a["bbox"] for a in raw["annotations"] if a["image_id"] == image_id]
    return np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=np.float32)


def _unlabeled(inputs: dict, **student):
    scfg = _config(hflip=False, augment="weak", **student)["student"]
    dataset, stats = load_student_data(
        inputs["ann"], inputs["images"], inputs["pseudo"], None, scfg, console=None
    )
    return dataset.unlabeled, stats


def test_views_pick_the_right_pseudo_labels(inputs) -> None:
    raw = inputs["raw"]
    # raw: every teacher box (shifted truth), teacher label; one set, no regression set.
    unl, stats = _unlabeled(inputs, pseudo_view="raw")
    first = unl.items[0].file_name
    image, target = unl[0]
    truth = _truth(raw, first)
    shifted = truth + np.array([SHIFT, 0, SHIFT, 0], dtype=np.float32)
    shifted[:, 0::2] = shifted[:, 0::2].clip(0, image.shape[-1])
    np.testing.assert_allclose(target["boxes"].numpy(), shifted, atol=1e-4)
    assert "reg_boxes" not in target and target["pseudo"] is True
    assert stats.unlabeled_images == 4 and stats.cls_boxes == stats.reg_boxes

    # polished + disentangled: classification = use_cls teacher boxes (the first box of the
    # first image is not use_cls), regression = polished boxes (= truth) of use_reg rows.
    unl, stats = _unlabeled(inputs)
    _, target = unl[0]
    np.testing.assert_allclose(target["boxes"].numpy(), shifted[1:], atol=1e-4)
    np.testing.assert_allclose(target["reg_boxes"].numpy(), truth, atol=1e-4)
    assert stats.cls_boxes == stats.reg_boxes - 1

    # polished, not disentangled: polished boxes of the use_cls rows for every loss.
    unl, _ = _unlabeled(inputs, disentangle=False)
    _, target = unl[0]
    np.testing.assert_allclose(target["boxes"].numpy(), truth[1:], atol=1e-4)
    assert "reg_boxes" not in target


def test_weak_augment_is_the_old_flip_of_image_and_every_box_set(inputs) -> None:
    """``augment: weak`` reproduces dpl's earlier training transform: a horizontal flip of
    the image and of every box set together, half the time, nothing else."""
    scfg = _config(augment="weak")["student"]
    dataset, _ = load_student_data(
        inputs["ann"], inputs["images"], inputs["pseudo"], None, scfg, console=None
    )
    unl = dataset.unlabeled
    plain = unl.targets[1]
    flips = 0
    unl.augment = None
    stored, _ = unl[1]
    unl.augment = dataset.labeled.augment
    for seed in range(8):
        torch.manual_seed(seed)
        image, target = unl[1]
        width = image.shape[-1]
        if not torch.equal(target["boxes"], plain["boxes"]):
            flips += 1
            assert torch.equal(image, stored.flip(-1))
            for key in ("boxes", "reg_boxes"):
                mirrored = plain[key][:, [2, 1, 0, 3]] * torch.tensor(
                    [-1, 1, -1, 1]
                ) + torch.tensor([width, 0, width, 0])
                torch.testing.assert_close(target[key], mirrored)
        else:
            assert torch.equal(target["reg_boxes"], plain["reg_boxes"])
            assert torch.equal(image, stored)
    assert 0 < flips < 8


def test_pairing_covers_every_unlabeled_image(inputs) -> None:
    unl, _ = _unlabeled(inputs)
    labeled = DetectionDataset(load_coco(inputs["ann"]), inputs["images"])
    one = StudentDataset(labeled, unl, 1.0)
    assert len(one) == 6 and all(len(one.unlabeled_indices(i)) == 1 for i in range(6))
    half = StudentDataset(labeled, unl, 0.5)
    picked = [j for i in range(len(half)) for j in half.unlabeled_indices(i)]
    assert len(half) == 8 and sorted(picked) == [0, 1, 2, 3]
    three = StudentDataset(labeled, unl, 3.0)
    picked = [j for i in range(len(three)) for j in three.unlabeled_indices(i)]
    assert len(three) == 6 and len(picked) == 18 and set(picked) == {0, 1, 2, 3}
    assert len(StudentDataset(labeled, unl, 0.0)) == 6
    with pytest.raises(DplError):
        StudentDataset(labeled, unl, -1.0)


def test_unlabeled_loss_is_weighted(inputs) -> None:
    scfg = _config()["student"]
    dataset, _ = load_student_data(
        inputs["ann"], inputs["images"], inputs["pseudo"], None, scfg, console=None
    )
    images, targets = [], []
    for sample in dataset[0]:
        images.append(sample[0])
        targets.append(sample[1])
    model = make_student(build_detector("mobilenet_v2_fpn", 3, "none", 64, 96, **FAST))
    model.train()
    results = {}
    for weight in (1.0, 2.5):
        torch.manual_seed(0)
        results[weight] = student_losses(weight)(model, images, targets)
    one, other = results[1.0], results[2.5]
    assert {"labeled_loss_classifier", "unlabeled_loss_box_reg"} <= one.keys()
    for key in one:
        factor = 2.5 if key.startswith("unlabeled_") else 1.0
        torch.testing.assert_close(other[key], one[key] * factor)
        assert torch.isfinite(one[key])


def test_student_trains_saves_loads_and_resumes(inputs, tmp_path) -> None:
    out = tmp_path / "student.pt"
    args = (inputs["ann"], inputs["images"], inputs["pseudo"], out)
    _, spec, result, stats = train_student(
        *args, _config(1), inputs["teacher"], device="cpu", seed=0
    )
    assert np.isfinite(result.last_loss) and result.iterations == 1
    assert stats.labeled_images == 6 and stats.unlabeled_images == 4
    model, loaded_spec = load_detector(out)
    assert loaded_spec.kind == "student" and loaded_spec.extra["disentangle"] is True
    assert loaded_spec.extra["pseudo_view"] == "polished"
    assert spec.categories == inputs["raw"]["categories"]
    set_test_settings(model, score_thresh=0.0)
    image = DetectionDataset(load_coco(inputs["ann"]), inputs["images"])[0][0]
    with torch.no_grad():
        (pred,) = model([image])
    assert pred["boxes"].shape[1] == 4 and len(pred["boxes"]) == len(pred["labels"])

    _, _, result, _ = train_student(
        *args, _config(2), inputs["teacher"], device="cpu", seed=0, resume=True
    )
    assert result.iterations == 2 and result.iterations_run == 1
    assert read_checkpoint(out)["train_state"]["iteration"] == 2


def _dpl(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dpl_tools.cli", "train-student", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def test_cli_train_student_and_bad_inputs(inputs, tmp_path) -> None:
    run_dir = inputs["ann"].parent.parent
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"model": TINY, "student": {"warmup_iters": 1}}))
    common = ["--images", str(inputs["images"]), "--config", str(preset), "--device", "cpu"]
    common += ["--iters", "1", "--batch-size", "1", "--workers", "0"]
    out = tmp_path / "s.pt"
    proc = _dpl(*common, "--run-dir", str(run_dir), "--out", str(out), "--no-disentangle")
    assert proc.returncode == 0, proc.stderr
    ckpt = read_checkpoint(out)
    assert ckpt["spec"]["kind"] == "student" and ckpt["spec"]["extra"]["disentangle"] is False
    assert ckpt["spec"]["extra"]["init"] == str(inputs["teacher"])
    assert "4 pseudo-labeled" in proc.stdout

    # Pseudo labels whose categories differ from the labeled JSON's.
    raw = inputs["raw"]
    other = {**raw, "categories": [{"id": 1, "name": "cell"}, *raw["categories"][1:]]}
    other_ann = tmp_path / "other.json"
    other_ann.write_text(json.dumps(other))
    bad = _dpl(*common, "--run-dir", str(run_dir), "--ann", str(other_ann), "--init", "imagenet")
    assert bad.returncode == 2 and "categories" in bad.stderr and "labels.parquet" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    # Pseudo-labeled images not in the folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _dpl(*common, "--run-dir", str(run_dir), "--unlabeled-images", str(empty))
    assert bad.returncode == 2 and "--unlabeled-images" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_student_from_imagenet_and_set_overrides(inputs, tmp_path) -> None:
    """``student.init: imagenet`` (here through --set) builds a fresh detector, not the
    teacher's weights, and needs no teacher checkpoint; --set obeys the config's rules."""
    run_dir = tmp_path / "run"  # holds no teacher.pt
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"model": TINY, "student": {"warmup_iters": 1}}))
    common = ["--images", str(inputs["images"]), "--config", str(preset), "--device", "cpu",
              "--iters", "1", "--batch-size", "1", "--workers", "0", "--run-dir", str(run_dir),
              "--ann", str(inputs["ann"]), "--pseudo", str(inputs["pseudo"])]  # fmt: skip
    out = tmp_path / "fresh.pt"
    proc = _dpl(*common, "--out", str(out), "--set", "student.init=imagenet",
                "--set", "student.aug_erase_patches=[0, 2]",
                "--set", "model.detector_kwargs.box_batch_size_per_image=32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    spec = read_checkpoint(out)["spec"]
    assert spec["extra"]["init"] == "imagenet" and spec["kind"] == "student"
    saved = spec["extra"]["config"]["student"]
    assert saved["init"] == "imagenet" and saved["aug_erase_patches"] == [0, 2]
    assert saved["augment"] == "weak"
    kwargs = spec["extra"]["config"]["model"]["detector_kwargs"]
    assert kwargs == {**FAST, "box_batch_size_per_image": 32}  # a dotted key reaches inside
    teacher = read_checkpoint(inputs["teacher"])["state_dict"]
    student = read_checkpoint(out)["state_dict"]
    same = [k for k in teacher if k in student and torch.equal(teacher[k], student[k])]
    assert len(same) < len(teacher) // 2  # re-initialised, not the teacher

    # the default init (teacher) looks for <run-dir>/teacher.pt and says so
    bad = _dpl(*common, "--out", str(tmp_path / "b.pt"))
    assert bad.returncode == 2 and "teacher not found" in bad.stderr
    assert "Traceback" not in bad.stderr
    for wrong, message in (
        ("student.mixup=2", "student.mixup"),
        ("student.inits=imagenet", "did you mean"),
        ("mixup=0.5", "expected section.key=value"),
    ):
        bad = _dpl(*common, "--out", str(tmp_path / "b.pt"), "--init", "imagenet", "--set", wrong)
        assert bad.returncode == 2 and message in bad.stderr, (wrong, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert not (tmp_path / "b.pt").exists()


def test_cli_labeled_only_student_needs_no_pseudo_labels(inputs, tmp_path) -> None:
    """``--unlabeled-ratio 0`` without ``--pseudo``: a student of the labeled images only
    (the benchmarks' labeled-only control), trained from ImageNet with no teacher and no
    pseudo-label file anywhere; with a ratio above 0 the missing file is a one-line error."""
    run_dir = tmp_path / "run"  # holds neither labels.parquet nor teacher.pt
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"model": TINY, "student": {"warmup_iters": 1}}))
    common = ["--images", str(inputs["images"]), "--config", str(preset), "--device", "cpu",
              "--iters", "1", "--batch-size", "2", "--workers", "0", "--run-dir", str(run_dir),
              "--ann", str(inputs["ann"]), "--init", "imagenet"]  # fmt: skip
    out = tmp_path / "labeled-only.pt"
    proc = _dpl(*common, "--out", str(out), "--unlabeled-ratio", "0")
    assert proc.returncode == 0, proc.stderr
    extra = read_checkpoint(out)["spec"]["extra"]
    assert extra["pseudo_labels"] is None and extra["unlabeled_ratio"] == 0.0
    assert "0 pseudo-labeled" in " ".join(proc.stdout.split())
    bad = _dpl(*common, "--out", str(tmp_path / "b.pt"))
    assert bad.returncode == 2 and "labels not found" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "b.pt").exists()
