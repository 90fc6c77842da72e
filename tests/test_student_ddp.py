"""dpl train-student under torch.distributed.run: 2 CPU processes (gloo) train one student;
rank 0 writes a checkpoint that loads and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_train_student import TINY, write_student_inputs

from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.models.checkpoint import load_detector, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def torchrun_dpl(args: list[str]) -> subprocess.CompletedProcess:
    """``dpl <args>`` under torchrun: 2 CPU processes (gloo), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "dpl_tools.cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_ddp_run_gives_a_loadable_student(synth_dataset, tmp_path) -> None:
    inputs = write_student_inputs(synth_dataset, tmp_path / "run")
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"model": TINY, "student": {"warmup_iters": 1}}))
    out = tmp_path / "student.pt"
    proc = torchrun_dpl([
        "train-student", "--run-dir", str(tmp_path / "run"),
        "--images", str(inputs["images"]), "--out", str(out), "--config", str(preset),
        "--iters", "2", "--batch-size", "1", "--workers", "0", "--device", "cpu",
        "--checkpoint-every", "1",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("initialised from") == 1  # only rank 0 reports
    ckpt = read_checkpoint(out)
    assert ckpt["train_state"]["iteration"] == 2 and ckpt["spec"]["kind"] == "student"
    assert not out.with_name("student.last.pt").exists()
    model, spec = load_detector(out)
    image = DetectionDataset(load_coco(inputs["ann"]), inputs["images"])[0][0]
    with torch.no_grad():
        (pred,) = model([image])
    assert pred["boxes"].shape[-1] == 4 and spec.num_classes == 3
