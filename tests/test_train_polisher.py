"""Polisher training: losses fall on synthetic pairs, and the CLI runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.noise_models import GaussianNoise
from dpl_tools.data.polisher_pairs import (
    GroundTruth,
    PairSettings,
    noise_metadata,
    synthesize_pairs,
    write_noise_parquet,
)
from dpl_tools.engine.polisher_batches import (
    NoisePairs,
    PolisherLoss,
    evaluate_polisher,
    teacher_batch,
)
from dpl_tools.engine.train_polisher import split_validation
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import Polisher, load_polisher


def _teacher(path, categories, seed=0):
    torch.manual_seed(seed)
    model = build_detector(
        "mobilenet_v2_fpn", len(categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30,
    )  # fmt: skip
    save_detector(path, model, DetectorSpec("mobilenet_v2_fpn", categories, 64, 96))
    return model.eval()


def test_a_few_steps_lower_both_losses_and_raise_mean_iou(synth_dataset, tmp_path):
    coco = load_coco(synth_dataset)
    teacher = _teacher(tmp_path / "teacher.pt", coco.categories)
    settings = PairSettings(reg_copies=40, cls_copies=[10, 10])
    noise = tmp_path / "noise.parquet"
    write_noise_parquet(
        noise,
        synthesize_pairs(GroundTruth.from_coco(coco), GaussianNoise(), settings, seed=0),
        noise_metadata(coco, GaussianNoise(), settings, 1, 0),
    )
    dataset = DetectionDataset(coco, synth_dataset.parent / "images")
    images, targets = zip(*(dataset[k] for k in range(2)), strict=True)
    pairs = NoisePairs(noise, {t["image_id"] for t in targets})
    pairs.load_round(0)
    batch = teacher_batch(
        teacher, list(images), list(targets), [pairs.get(t["image_id"]) for t in targets],
        32, 32, 30, 0.7, torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert [len(b) for b in batch.reg_boxes] == [32, 32]  # per-image caps
    assert [len(b) for b in batch.cls_boxes] == [32, 32]
    labels = torch.cat(batch.cls_labels)
    assert (labels == 0).any() and (labels > 0).any()

    torch.manual_seed(0)
    polisher = Polisher.for_teacher(teacher, len(coco.categories))
    loss_fn = PolisherLoss(polisher)
    before = evaluate_polisher(polisher, [batch])
    opt = torch.optim.SGD(polisher.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(8):
        polisher.train()
        losses = loss_fn(batch)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        opt.zero_grad()
        (losses["reg"] + losses["cls"]).backward()
        opt.step()
    after = evaluate_polisher(polisher, [batch])
    assert history[-1]["reg"] < history[0]["reg"]
    assert history[-1]["cls"] < 0.95 * history[0]["cls"]
    assert abs(before["mean_iou_after"] - before["mean_iou_before"]) < 0.01  # ~identity at init
    assert after["mean_iou_after"] > after["mean_iou_before"] + 0.002
    assert after["cls_accuracy"] > before["cls_accuracy"]


def test_split_validation_is_seeded_and_disjoint():
    ids = list(range(1, 21))
    train, val = split_validation(ids, 0.25, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == ids
    assert split_validation(ids, 0.25, seed=3) == (train, val)
    assert split_validation(ids, 0.0, seed=3) == (ids, [])


def test_cli_synth_noise_then_train_polisher_then_hash_check(synth_dataset, tmp_path):
    categories = load_coco(synth_dataset).categories
    teacher = tmp_path / "teacher.pt"
    _teacher(teacher, categories)
    images = synth_dataset.parent / "images"
    noise, out, val = tmp_path / "noise.parquet", tmp_path / "polisher.pt", tmp_path / "val.json"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["synth-noise", "--ann", str(synth_dataset), "--out", str(noise), "--rounds", "2",
         "--reg-copies", "20", "--cls-copies", "8,8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["train-polisher", "--teacher", str(teacher), "--noise", str(noise), "--ann",
         str(synth_dataset), "--images", str(images), "--out", str(out), "--iters", "4",
         "--batch-size", "2", "--workers", "0", "--device", "cpu", "--val-fraction", "0.25",
         "--val-json", str(val), "--reg-per-image", "32", "--cls-per-image", "32",
         "--max-proposals", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "val mean IoU" in result.output and "fg / bg recall" in result.output
    polisher = load_polisher(out, teacher_sha=sha256_file(teacher))
    assert polisher.num_classes == len(categories) and not polisher.training
    figures = json.loads(val.read_text())
    assert figures["val_images"] == 6
    for key in ("mean_iou_before", "mean_iou_after", "improved_fraction", "cls_accuracy",
                "fg_recall", "bg_recall", "reg_pairs", "cls_samples"):  # fmt: skip
        assert key in figures, key
    assert 0.0 < figures["mean_iou_before"] < 1.0 and 0.0 <= figures["cls_accuracy"] <= 1.0
    extra = torch.load(out, weights_only=True)["extra"]
    assert extra["ema_momentum"] == 0.99 and extra["iterations"] == 4

    other = tmp_path / "other.pt"
    _teacher(other, categories, seed=1)
    proc = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "polish", "--images", str(images), "--teacher",
         str(other), "--polisher", str(out), "--out", str(tmp_path / "labels.parquet"),
         "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "trained on teacher" in proc.stderr
    assert "Traceback" not in proc.stderr
