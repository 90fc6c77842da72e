"""Supervised baseline on BCCD: teacher from 10% labeled (fold 1) and from 100% of train.

Runs the real CLI (dpl convert / split / train-teacher / evaluate) on CPU and appends
the numbers to benchmarks/RESULTS.md. Artifacts stay in benchmarks/out/bccd10 (the 10%
teacher, the converted JSONs and the split, reused by later stages' benchmarks) and
benchmarks/out/bccd100.

    python benchmarks/bccd_baseline.py [--runs 10,100] [--iters 400]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BCCD = (ROOT / "../shared/data/bccd").resolve()
IMAGES = BCCD / "JPEGImages"
WEIGHTS = Path("/work/shared/weights/mobilenet_v2-b0353104.pth")
OUT = ROOT / "benchmarks/out"
DATE = "2026-11-24"


def dpl(*args: str) -> float:
    """Run one ``dpl`` command (the real entry point); return its wall time in seconds."""
    cmd = [sys.executable, "-m", "dpl_tools.cli", *args]
    print("$ dpl " + " ".join(args), flush=True)
    began = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - began


def prepare(data: Path) -> None:
    """Convert BCCD train/test splits to COCO and split train 10% labeled (fold 1)."""
    for split in ("train", "test"):
        if not (data / f"{split}.json").exists():
            dpl("convert", str(BCCD), "--split", split, "--out", str(data / f"{split}.json"))
    if not (data / "labeled.json").exists():
        dpl(
            "split",
            str(data / "train.json"),
            "--percent",
            "10",
            "--fold",
            "1",
            "--out-dir",
            str(data),
        )


def _finished(teacher: Path, iters: int) -> bool:
    if not teacher.exists():
        return False
    state = torch.load(teacher, map_location="cpu", weights_only=True)["train_state"]
    return state["iteration"] == iters


def run(name: str, labeled: Path, out_dir: Path, test: Path, iters: int, batch: int) -> dict:
    """Train a teacher on ``labeled`` and evaluate it on ``test``; return the numbers."""
    teacher = out_dir / "teacher.pt"
    train_cmd = [
        "train-teacher", "--ann", str(labeled), "--images", str(IMAGES), "--out", str(teacher),
        "--config", "cpu_mobilenet", "--backbone-weights", str(WEIGHTS), "--iters", str(iters),
        "--batch-size", str(batch), "--workers", "1", "--device", "cpu", "--seed", "0",
    ]  # fmt: skip
    if not _finished(teacher, iters):  # rerunning only re-evaluates a finished teacher
        dpl(*train_cmd)
    state = torch.load(teacher, map_location="cpu", weights_only=True)["train_state"]
    metrics_path = out_dir / "test_metrics.json"
    eval_cmd = [
        "evaluate", "--model", str(teacher), "--ann", str(test), "--images", str(IMAGES),
        "--batch-size", "2", "--workers", "1", "--device", "cpu", "--json", str(metrics_path),
        "--predictions", str(out_dir / "test_predictions.json"),
    ]  # fmt: skip
    dpl(*eval_cmd)
    metrics = json.loads(metrics_path.read_text())
    n_labeled = len(json.loads(labeled.read_text())["images"])
    return {
        "name": name,
        "labeled_images": n_labeled,
        "train_cmd": "dpl " + " ".join(train_cmd),
        "eval_cmd": "dpl " + " ".join(eval_cmd),
        "train_s": state["elapsed_s"],
        "train_ips": iters * batch / state["elapsed_s"],
        **metrics,
    }


def append_results(rows: list[dict], iters: int, batch: int) -> None:
    cores = torch.get_num_threads()
    lines = [
        f"\n## BCCD supervised baseline (teacher only) — {DATE}\n",
        f"Machine: {platform.machine()} CPU, {cores} threads (2 cores shared with other jobs), "
        "no GPU. Script: `python benchmarks/bccd_baseline.py`.",
        f"Teacher: mobilenet_v2_fpn, ImageNet backbone ({WEIGHTS.name}), 480 px (multi-scale "
        f"0.8-1.2 + flip for training), {iters} iterations of batch {batch}, SGD lr 0.01, "
        "warm-up 100, steps at 2/3 and 8/9, grad clip 10, seed 0. Same iteration count for "
        "the 100% run (so it sees each image fewer times: a budget, not a converged ceiling).",
        "Test: BCCD test split (72 images), score >= 0.001, 100 dets/image, batch 2.\n",
        "| labeled (train split) | images | AP | AP50 | AP75 | APs | APm | APl | train time | "
        "train img/s | inference img/s | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['labeled_images']} | {r['AP']:.3f} | {r['AP50']:.3f} | "
            f"{r['AP75']:.3f} | {r['APs']:.3f} | {r['APm']:.3f} | {r['APl']:.3f} | "
            f"{r['train_s'] / 60:.1f} min | {r['train_ips']:.2f} | {r['images_per_s']:.2f} | "
            f"{1 / r['images_per_s']:.2f} |"
        )
    lines.append("\nCommands:\n")
    for r in rows:
        lines += [f"    {r['train_cmd']}", f"    {r['eval_cmd']}"]
    lines.append(
        "\nPrototype reference (throw-away code, 20 labeled images, same settings): "
        "AP 0.470, AP50 0.875, inference 0.35 s/image.\n"
    )
    with open(ROOT / "benchmarks/RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="10,100", help="which labeled percentages to run")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    data = OUT / "bccd10"
    prepare(data)
    rows = []
    for run_name in args.runs.split(","):
        if run_name == "10":
            labeled, out_dir = data / "labeled.json", data
        else:
            labeled, out_dir = data / "train.json", OUT / "bccd100"
        out_dir.mkdir(parents=True, exist_ok=True)
        row = run(f"{run_name}%", labeled, out_dir, data / "test.json", args.iters, args.batch_size)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("cmd")}), flush=True)
        rows.append(row)
        append_results([row], args.iters, args.batch_size)


if __name__ == "__main__":
    main()
