"""Teacher training: reload gives identical predictions, same seed gives same weights,
--resume continues exactly, and train-teacher -> evaluate through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dpl_tools.config import load_config
from dpl_tools.data.coco import load_coco
from dpl_tools.engine.inference import predict_detections
from dpl_tools.engine.train_detector import train_teacher
from dpl_tools.models.checkpoint import (
    load_detector,
    read_checkpoint,
)
from dpl_tools.models.detector import set_test_settings

ROOT = Path(__file__).resolve().parents[1]
# Few proposals and sampled RoIs: a CPU training step takes a fraction of a second.
FAST = {
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}
CLASSES = ["square", "disc", "triangle"]
TINY = {"min_size": 64, "max_size": 96, "arch": "mobilenet_v2_fpn", "detector_kwargs": FAST}


def _config(iters: int, checkpoint_every: int = 0) -> dict:
    return load_config(
        None,
        {
            "model": TINY,
            "teacher": {
                "iters": iters,
                "batch_size": 2,
                "workers": 0,
                "warmup_iters": 2,
                "checkpoint_every": checkpoint_every,
                "multiscale": [0.75, 1.0],
            },
        },
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_reload_seed_and_resume(synth_dataset, tmp_path):
    images = synth_dataset.parent / "images"
    a, c, d = tmp_path / "a.pt", tmp_path / "c.pt", tmp_path / "d.pt"
    model, spec, result = train_teacher(synth_dataset, images, a, _config(2), "cpu", seed=0)
    assert result.iterations == 2 and result.images_per_s > 0
    assert spec.min_size == 64 and [x["name"] for x in spec.categories] == CLASSES

    # The checkpoint alone rebuilds the trained model: identical predictions.
    loaded, loaded_spec = load_detector(a)
    assert loaded_spec == spec
    coco = load_coco(synth_dataset)
    outputs = []
    for m in (model, loaded):
        set_test_settings(m, score_thresh=0.0)
        outputs.append(list(predict_detections(m, coco.images[:3], images, 2, "cpu", 0)))
    for (rec_a, *pred_a), (rec_b, *pred_b) in zip(*outputs, strict=True):
        assert rec_a is rec_b and len(pred_a[0]) > 0
        assert all(torch.equal(x, y) for x, y in zip(pred_a, pred_b, strict=True))

    # 1 iteration, twice: the same seed gives the same weights.
    train_teacher(synth_dataset, images, c, _config(1), "cpu", seed=0)
    train_teacher(synth_dataset, images, d, _config(1), "cpu", seed=0)
    assert read_checkpoint(c)["train_state"]["iteration"] == 1
    assert _same(_weights(c), _weights(d))
    assert not _same(_weights(c), _weights(a))

    # --resume to 2 iterations ends exactly where the uninterrupted 2-iteration run did.
    _, _, result = train_teacher(
        synth_dataset, images, c, _config(2, 1), "cpu", seed=0, resume=True
    )
    assert result.iterations == 2 and result.iterations_run == 1
    assert _same(_weights(c), _weights(a))


def test_cli_train_teacher_then_evaluate(synth_dataset, tmp_path):
    images = synth_dataset.parent / "images"
    run_dir = tmp_path / "run"
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"model": {"detector_kwargs": FAST}}))  # JSON is YAML
    train = [
        sys.executable, "-m", "dpl_tools.cli", "train-teacher", "--ann", str(synth_dataset),
        "--images", str(images), "--run-dir", str(run_dir), "--min-size", "64", "--max-size",
        "96", "--iters", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu",
        "--config", str(preset), "--checkpoint-every", "1",
    ]  # fmt: skip
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # output to a pipe (a log file, nohup): the progress is there as plain lines
    assert "train-teacher 2/2 (100%)" in proc.stdout
    teacher = run_dir / "teacher.pt"
    assert not (run_dir / "teacher.last.pt").exists()  # periodic file replaced by the final
    ckpt = read_checkpoint(teacher)
    assert ckpt["spec"]["arch"] == "mobilenet_v2_fpn" and ckpt["spec"]["min_size"] == 64
    assert ckpt["spec"]["kind"] == "teacher" and ckpt["dpl_version"]
    assert ckpt["train_state"]["iteration"] == 2

    metrics = tmp_path / "m.json"
    evaluate = [
        sys.executable, "-m", "dpl_tools.cli", "evaluate", "--run-dir", str(run_dir),
        "--ann", str(synth_dataset), "--images", str(images), "--workers", "0",
        "--device", "cpu", "--json", str(metrics),
    ]  # fmt: skip
    proc = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "evaluate 24/24 (100%)" in proc.stdout
    saved = json.loads(metrics.read_text())
    assert saved["images"] == 24 and 0.0 <= saved["AP"] <= 1.0

    bad = subprocess.run(
        train[:5] + [str(tmp_path / "missing.json"), *train[6:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr
