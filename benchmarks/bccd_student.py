"""Student training on BCCD 10% (and 5%) labeled: what polishing and disentangling buy.

Rows, each evaluated with ``dpl evaluate`` (AP, AP50) on the BCCD test split:

1. supervised teacher (``teacher.pt`` as trained);
2. supervised, same extra budget: the teacher trained ``--iters`` more iterations on the
   labeled images only (``train-student --unlabeled-ratio 0``), the fair control for 3-5;
3. student with raw pseudo labels (``--pseudo-view raw``);
4. student with polished pseudo labels, not disentangled (``--no-disentangle``);
5. the full method (polished, disentangled).

Rows 2-5 start from the same teacher with the same budget (iterations, batch, lr, seed).
Inputs per split folder (``benchmarks/out/bccd10``): ``labeled.json``, ``test.json``,
``teacher.pt``, ``labels.parquet`` (from ``bccd_baseline.py`` / ``bccd_polisher.py`` /
``bccd_polish.py``). ``--prepare`` makes missing inputs for other splits (``bccd5``:
split, teacher, noise, polisher, polish) with the same settings. Appends to RESULTS.md.

    python benchmarks/bccd_student.py [--splits 10,5] [--iters 120] [--batch-size 2] [--prepare]

Student settings come from ``benchmarks/configs/bccd_student.yaml`` (warm-up 20).
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
BCCD = (ROOT / "../shared/data/bccd").resolve()
IMAGES = BCCD / "JPEGImages"
WEIGHTS = Path("/work/shared/weights/mobilenet_v2-b0353104.pth")
OUT = ROOT / "benchmarks/out"
CONFIG = ROOT / "benchmarks/configs/bccd_student.yaml"
DATE = "2026-11-24"

# name -> extra train-student options
ROWS = {
    "supervised, +budget": ["--unlabeled-ratio", "0"],
    "student, raw pseudo labels": ["--pseudo-view", "raw"],
    "student, polished, not disentangled": ["--no-disentangle"],
    "student, polished + disentangled (full)": [],
}


def dpl(*args: str) -> float:
    """Run one ``dpl`` command (the real entry point); return its wall time in seconds."""
    print("$ dpl " + " ".join(args), flush=True)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpl_tools.cli", *args], cwd=ROOT, check=True)
    return time.perf_counter() - began


def _iteration(path: Path) -> int:
    if not path.exists():
        return -1
    return torch.load(path, map_location="cpu", weights_only=True)["train_state"]["iteration"]


def prepare(data: Path, percent: int, teacher_iters: int) -> None:
    """Make a split's missing inputs with the other benchmarks' settings."""
    data.mkdir(parents=True, exist_ok=True)
    ten = OUT / "bccd10"
    for name in ("train.json", "test.json"):
        if not (data / name).exists():
            (data / name).write_bytes((ten / name).read_bytes())
    if not (data / "labeled.json").exists():
        dpl("split", str(data / "train.json"), "--percent", str(percent), "--fold", "1",
            "--out-dir", str(data))  # fmt: skip
    if _iteration(data / "teacher.pt") != teacher_iters:
        dpl("train-teacher", "--ann", str(data / "labeled.json"), "--images", str(IMAGES),
            "--out", str(data / "teacher.pt"), "--config", "cpu_mobilenet",
            "--backbone-weights", str(WEIGHTS), "--iters", str(teacher_iters),
            "--batch-size", "2", "--workers", "1", "--device", "cpu", "--seed", "0")  # fmt: skip
    if not (data / "noise.parquet").exists():
        # cross-fitting: the teacher's real out-of-fold errors on the labeled images (no
        # test split: it is used for the final figures only)
        dpl("synth-noise", "--ann", str(data / "labeled.json"), "--out",
            str(data / "noise.parquet"), "--rounds", "4", "--noise-model", "crossfit",
            "--teacher", str(data / "teacher.pt"), "--images", str(IMAGES),
            "--device", "cpu")  # fmt: skip
    if not (data / "polisher.pt").exists():
        dpl("train-polisher", "--teacher", str(data / "teacher.pt"), "--noise",
            str(data / "noise.parquet"), "--ann", str(data / "labeled.json"), "--images",
            str(IMAGES), "--out", str(data / "polisher.pt"), "--iters", "300", "--batch-size",
            "1", "--reg-per-image", "64", "--cls-per-image", "128", "--workers", "1",
            "--device", "cpu")  # fmt: skip
    if not (data / "labels.parquet").exists():
        dpl("polish", "--images", str(data / "unlabeled.json"), "--image-root", str(IMAGES),
            "--teacher", str(data / "teacher.pt"), "--polisher", str(data / "polisher.pt"),
            "--out", str(data / "labels.parquet"), "--device", "cpu", "--batch-size", "2",
            "--workers", "1", "--no-progress")  # fmt: skip


def _stale(out: Path, source: Path) -> bool:
    """``out`` is missing or older than the ``source`` it was computed from."""
    return not out.exists() or out.stat().st_mtime < source.stat().st_mtime


def evaluate(model: Path, data: Path) -> dict:
    metrics = model.with_suffix(".test.json")
    if _stale(metrics, model):
        dpl("evaluate", "--model", str(model), "--ann", str(data / "test.json"), "--images",
            str(IMAGES), "--batch-size", "2", "--workers", "1", "--device", "cpu", "--json",
            str(metrics))  # fmt: skip
    return json.loads(metrics.read_text())


def pseudo_quality(data: Path) -> dict:
    """``dpl evaluate --pseudo`` of the split's labels against the unlabeled images' truth."""
    out = data / "pseudo_quality.json"
    labels = data / "labels.parquet"
    if _stale(out, labels):
        dpl("evaluate", "--pseudo", str(labels), "--ann", str(data / "unlabeled_gt.json"),
            "--json", str(out))  # fmt: skip
    return json.loads(out.read_text())


def run_split(
    data: Path, iters: int, batch: int, lr: float, only: set[int] | None = None
) -> list[dict]:
    """Evaluate the teacher and train + evaluate the four same-budget rows (rows 2-5; ``only``
    trains a subset, e.g. to run rows in parallel processes)."""
    rows = [{"name": "supervised teacher", "cmd": "(teacher.pt)", "train_s": None,
             **evaluate(data / "teacher.pt", data)}]  # fmt: skip
    folder = data / ("student_runs" if lr == 0.01 else f"student_runs_lr{lr:g}")
    for k, (name, extra) in enumerate(ROWS.items()):
        if only and k + 2 not in only:
            continue
        out = folder / f"row{k + 2}.pt"
        cmd = [
            "train-student", "--ann", str(data / "labeled.json"), "--images", str(IMAGES),
            "--pseudo", str(data / "labels.parquet"), "--init", str(data / "teacher.pt"),
            "--out", str(out), "--config", str(CONFIG), "--iters", str(iters),
            "--batch-size", str(batch), "--lr", str(lr), "--workers", "1", "--device", "cpu",
            "--seed", "0", *extra,
        ]  # fmt: skip
        if _iteration(out) != iters:
            dpl(*cmd, "--resume")
        state = torch.load(out, map_location="cpu", weights_only=True)["train_state"]
        rows.append({"name": name, "cmd": "dpl " + " ".join(cmd), "train_s": state["elapsed_s"],
                     **evaluate(out, data)})  # fmt: skip
    return rows


def append_results(
    results: dict[str, list[dict]], quality: dict[str, dict], args: argparse.Namespace
) -> None:
    iters, batch, lr = args.iters, args.batch_size, args.lr
    warmup = yaml.safe_load(CONFIG.read_text())["student"]["warmup_iters"]
    lines = [
        f"\n## BCCD student: raw vs polished vs disentangled pseudo labels — {DATE}\n",
        f"Machine: {platform.machine()} CPU, 2 cores, no GPU; {args.machine_note}. "
        f"Script: `python benchmarks/bccd_student.py --splits {args.splits} --iters {iters}`.",
        f"Every student row starts from the split's teacher and trains {iters} iterations of "
        f"{batch} labeled + {batch} pseudo-labeled images (ratio 1.0, unlabeled weight 1.0), "
        f"SGD lr {lr}, warm-up {warmup} (`benchmarks/configs/bccd_student.yaml`), mobilenet_v2_fpn "
        "at 480 px (multi-scale + flip), seed 0; 'supervised, +budget' is the same run with "
        "--unlabeled-ratio 0 (labeled images only). Teachers: 400 iterations (bccd_baseline.py "
        "settings); polishers: crossfit noise, 300 steps (bccd_polisher.py settings); pseudo "
        "labels: `dpl polish` defaults. Test: BCCD test split (72 images), `dpl evaluate` "
        "(score >= 0.001, 100 dets/image).\n",
        "Pseudo labels on the unlabeled split vs its hidden truth (`dpl evaluate --pseudo`):\n",
        "| labeled | images | boxes | box IoU, teacher -> polished | cls labels kept "
        "| P@.5 / R@.5 teacher -> kept |",
        "|---|---:|---:|---|---:|---|",
    ]
    for split, q in quality.items():
        box, views = q["box_quality"], q["views"]
        t, c = views["teacher"], views["cls"]
        lines.append(
            f"| {split} | {q['images']['evaluated']} | {t['boxes']} | "
            f"{box['mean_iou_before']:.3f} -> {box['mean_iou_after']:.3f} | {c['boxes']} | "
            f"{t['precision50']:.3f} / "
            f"{t['recall50']:.3f} -> {c['precision50']:.3f} / {c['recall50']:.3f} |"
        )
    lines += [
        "\nStudents, AP on the test split:\n",
        "| labeled | row | AP | AP50 | AP75 | train time |",
        "|---|---|---|---|---|---|",
    ]
    for split, rows in results.items():
        for r in rows:
            took = "" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
            lines.append(
                f"| {split} | {r['name']} | {r['AP']:.3f} | {r['AP50']:.3f} | "
                f"{r['AP75']:.3f} | {took} |"
            )
    lines.append("\nCommands:\n")
    for rows in results.values():
        lines += [f"    {r['cmd']}" for r in rows[1:]]
    with open(ROOT / "benchmarks/RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="10,5", help="Labeled percents (folders bccdN).")
    parser.add_argument("--iters", type=int, default=120, help="Student iterations per row.")
    parser.add_argument("--batch-size", type=int, default=2, help="Labeled images per step.")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--rows",
        default="",
        help="Train only these rows, e.g. 2,3 (never appends a partial table).",
    )
    parser.add_argument("--prepare", action="store_true", help="Make missing split inputs.")
    parser.add_argument("--teacher-iters", type=int, default=400)
    parser.add_argument("--no-append", action="store_true", help="Do not touch RESULTS.md.")
    parser.add_argument(
        "--machine-note",
        default="one benchmark process, torch threads as set",
        help="How the machine was shared, for RESULTS.md.",
    )
    args = parser.parse_args()
    results, quality = {}, {}
    for percent in (int(p) for p in args.splits.split(",")):
        data = OUT / f"bccd{percent}"
        if args.prepare:
            prepare(data, percent, args.teacher_iters)
        missing = [n for n in ("teacher.pt", "labels.parquet") if not (data / n).exists()]
        if missing:
            print(f"skipping {percent}%: {data} lacks {', '.join(missing)} (try --prepare)")
            continue
        only = {int(r) for r in args.rows.split(",") if r}
        results[f"{percent}%"] = run_split(data, args.iters, args.batch_size, args.lr, only)
        quality[f"{percent}%"] = pseudo_quality(data)
    for split, rows in results.items():
        for r in rows:
            print(f"{split:>4} {r['name']:<42} AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}")
    if results and not args.no_append and not args.rows:
        append_results(results, quality, args)


if __name__ == "__main__":
    main()
