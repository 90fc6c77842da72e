"""Polishing on BCCD 10% labeled: pseudo-label quality and the cost of polishing.

Quality: ``dpl polish`` on the unlabeled split with the 10% teacher and its polisher,
then ``dpl evaluate --pseudo`` against the split's ground truth (teacher view vs polished
view). Speed, in this one process on the same images: teacher-only inference (the polish
job with no polisher) vs teacher + polishers, images/s and the ratio (target: polishing
adds at most 15%). Appends to benchmarks/RESULTS.md.

    python benchmarks/bccd_polish.py [--polisher benchmarks/out/bccd10/polisher.pt]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGES = (ROOT / "../shared/data/bccd/JPEGImages").resolve()
DATA = ROOT / "benchmarks/out/bccd10"
DATE = "2026-11-24"


def dpl(*args: str) -> float:
    """Run one ``dpl`` command (the real entry point); return its wall time in seconds."""
    print("$ dpl " + " ".join(args), flush=True)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpl_tools.cli", *args], cwd=ROOT, check=True)
    return time.perf_counter() - began


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def find_polisher(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    found = sorted(DATA.glob("polisher*.pt"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if ".last" not in p.name]
    if not found:
        sys.exit(f"no polisher*.pt in {DATA}; train one first or pass --polisher")
    return found[-1]


def speed(teacher: Path, polisher: Path, count: int, repeats: int, batch: int) -> dict:
    """Best-of-``repeats`` images/s of teacher-only vs teacher + polishing, same images."""
    from dpl_tools.data.image_list import load_image_list
    from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter
    from dpl_tools.engine.polish import PolishSettings
    from dpl_tools.engine.polish_job import polish_images
    from dpl_tools.io import sha256_file
    from dpl_tools.models.checkpoint import load_detector
    from dpl_tools.models.polisher import load_polisher

    records = load_image_list(DATA / "unlabeled.json", IMAGES)[:count]
    model, spec = load_detector(teacher)
    refiner = load_polisher(polisher, teacher_sha=sha256_file(teacher))
    best = {"teacher_only": 0.0, "polish": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, pol in (("teacher_only", None), ("polish", refiner)):
                writer = PseudoLabelWriter(Path(tmp) / f"{name}{r}.parquet", {}, overwrite=True)
                s = polish_images(
                    model, spec.label_to_cat, pol, records, writer, PolishSettings(),
                    batch_size=batch, device="cpu", workers=2, show_progress=False,
                )  # fmt: skip
                print(f"{name}: {s.images_per_s:.3f} images/s", flush=True)
                best[name] = max(best[name], s.images_per_s)
    best["ratio_time"] = best["teacher_only"] / best["polish"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(DATA / "teacher.pt"))
    parser.add_argument("--polisher", default=None)
    parser.add_argument("--speed-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    teacher, polisher = Path(args.teacher), find_polisher(args.polisher)
    labels, quality = DATA / "labels.parquet", DATA / "pseudo_quality.json"
    polish_cmd = [
        "polish", "--images", str(DATA / "unlabeled.json"), "--image-root", str(IMAGES),
        "--teacher", str(teacher), "--polisher", str(polisher), "--out", str(labels),
        "--coco-out", str(DATA / "pseudo_polished.json"), "--device", "cpu",
        "--batch-size", str(args.batch_size), "--workers", "2", "--overwrite",
    ]  # fmt: skip
    polish_s = dpl(*polish_cmd)
    eval_cmd = [
        "evaluate", "--pseudo", str(labels), "--ann", str(DATA / "unlabeled_gt.json"),
        "--json", str(quality),
    ]  # fmt: skip
    dpl(*eval_cmd)
    figures = json.loads(quality.read_text())
    timing = speed(teacher, polisher, args.speed_images, args.repeats, args.batch_size)
    lines = [
        "",
        f"## BCCD 10% labeled: dpl polish on the unlabeled split ({DATE})",
        "",
        f"Machine: {platform.machine()}, 2 CPU cores (shared with other jobs), no GPU; torch "
        f"{torch.__version__}. Script: `python benchmarks/bccd_polish.py`. Teacher "
        f"`{teacher.relative_to(ROOT) if teacher.is_relative_to(ROOT) else teacher}`, polisher "
        f"`{polisher.relative_to(ROOT) if polisher.is_relative_to(ROOT) else polisher}`; "
        "default thresholds (test score 0.001 / NMS 0.5 / 100 dets, initial 0.5, cls prob "
        "0.9, teacher score 0.9).",
        "",
        "Commands:",
        "",
        "    dpl " + " ".join(polish_cmd),
        "    dpl " + " ".join(eval_cmd),
        "",
        f"Polish run (184 images, incl. model loading and the COCO export): {polish_s:.0f} s.",
        "",
        "Pseudo-label quality vs the unlabeled split's ground truth (`dpl evaluate --pseudo`):",
        "",
        "| view | boxes | P@.5 | R@.5 | P@.75 | R@.75 | mean IoU | AP | AP50 | AP75 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {v['boxes']} | "
            + " | ".join(
                _fmt(v[k])
                for k in (
                    "precision50",
                    "recall50",
                    "precision75",
                    "recall75",
                    "mean_iou",
                    "AP",
                    "AP50",
                    "AP75",
                )
            )  # fmt: skip
            + " |"
            for name, v in figures["views"].items()
        ),
        "",
        "Box quality (teacher boxes with IoU >= 0.5 to a truth box): "
        + json.dumps(figures["box_quality"])
        + "; label changes: "
        + json.dumps(figures["label_changes"])
        + "; dropped from classification: "
        + json.dumps(figures["cls_dropped"])
        + ".",
        "",
        f"Speed, same process, first {args.speed_images} unlabeled images, batch "
        f"{args.batch_size}, 2 decoding workers, best of {args.repeats}: teacher-only "
        f"{timing['teacher_only']:.3f} images/s, teacher + polishing {timing['polish']:.3f} "
        f"images/s: polishing adds {100 * (timing['ratio_time'] - 1):.1f}% time "
        "(target <= 15%). GPU figures need a lent GPU (none here).",
    ]
    with open(ROOT / "benchmarks/RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
