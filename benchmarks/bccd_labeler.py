"""Bring your own detector, on BCCD 10%: polish a *second* detector's boxes with a polisher
trained on that detector's own out-of-fold errors (``train-polisher --detections``).

The labeler is a detector other than dpl's teacher (benchmarks/configs/bccd_labeler.yaml:
the same family at 352 px instead of 480, another seed). Its out-of-fold predictions on the
labeled images come from cross-fitting it (3 fold detectors on 2 of 3 folds each; dpl's
crossfit, run on the labeler's checkpoint), written out as a COCO results file, as a user
would write their detector's predictions. Its predictions on the unlabeled images are a
second COCO results file. Then, with dpl's teacher (bccd_seeds.yaml) supplying the features:

    labeler-oof    train-polisher --detections <labeler OOF on labeled> ; polish --detections
    teacher-noise  (comparison) the paper's Gaussian noise around the labeled truth, no
                   labeler data; polish --detections with the paper's 0.9 / 0.9 rule

and ``dpl evaluate --pseudo`` of each against the unlabeled images' hidden truth: box IoU of
the labeler's boxes before and after polishing, and the class-aware pseudo labels at IoU .5
(precision, recall, F1) of the labeler's boxes at the initial threshold vs the polished
classification pseudo labels. No BCCD test image is used. Stages are cached (stamps as in
``dpl run``) under benchmarks/out/labeler/bccd10.

    python benchmarks/bccd_labeler.py [--rows labeler-oof,teacher-noise]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_seeds import bccd_data, run_stage  # noqa: E402  (the BCCD split and stage runner)

from dpl_tools.data.crossfit_detections import read_crossfit  # noqa: E402
from dpl_tools.io import write_json  # noqa: E402
from dpl_tools.pipeline import (  # noqa: E402
    Stage,
    evaluate_pseudo_stage,
    run_stages,
    split_stage,
    teacher_stage,
)

OUT = ROOT / "benchmarks/out/labeler/bccd10"
TEACHER_CONFIG = str(ROOT / "benchmarks/configs/bccd_seeds.yaml")
LABELER_CONFIG = str(ROOT / "benchmarks/configs/bccd_labeler.yaml")
ROWS = ("labeler-oof", "teacher-noise")
SOURCES = {
    "labeler-oof": "the labeler's out-of-fold errors (--detections)",
    "teacher-noise": "Gaussian noise on the labeled truth (paper rule)",
}


def crossfit_to_coco_results(crossfit: Path, out: Path) -> None:
    """The labeler's out-of-fold detections as the COCO results file a user would write."""
    table, _ = read_crossfit(crossfit)
    results = [
        {"file_name": r["file_name"], "category_id": int(r["label"]),
         "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]],
         "score": float(r["score"])}
        for r in table.to_pylist() if r["score"] is not None
    ]  # fmt: skip
    write_json(out, results)


def stages(rows: set[str]) -> tuple[list[Stage], list[Stage]]:
    """(stages before the OOF conversion, stages after it)."""
    data, _ = bccd_data(10, 0)  # the BCCD runner's 10% split of seed 0 (fold 1)
    split = OUT / "split"
    labeled, unlabeled, truth = (split / f"{n}.json" for n in ("labeled", "unlabeled",
                                                                 "unlabeled_gt"))  # fmt: skip
    teacher, labeler = OUT / "teacher.pt", OUT / "labeler.pt"
    images = data.images
    labeler_stage = teacher_stage(labeled, images, labeler, 1, LABELER_CONFIG, "cpu")
    labeler_stage.name = "train-labeler"
    first = [
        split_stage(data, split),
        teacher_stage(labeled, images, teacher, 0, TEACHER_CONFIG, "cpu"),
        labeler_stage,
        Stage("labeler-oof", "synth_noise",
              {"ann": labeled, "teacher": labeler, "images": images,
               "out": OUT / "labeler_oof/noise.parquet", "config": LABELER_CONFIG,
               "device": "cpu", "seed": 0},
              OUT / "labeler_oof/noise.parquet", [labeled, labeler, Path(LABELER_CONFIG)]),
        Stage("labeler-unlabeled", "evaluate",
              {"model": labeler, "ann": truth, "images": images,
               "predictions": OUT / "labeler_unlabeled.json",
               "json": OUT / "labeler_unlabeled_ap.json", "device": "cpu"},
              OUT / "labeler_unlabeled.json", [labeler, truth]),
    ]  # fmt: skip
    oof = OUT / "labeler_oof.json"
    preds = OUT / "labeler_unlabeled.json"
    after = []
    for row in ROWS:
        if row not in rows:
            continue
        rd = OUT / row
        polisher = rd / "polisher.pt"
        if row == "labeler-oof":
            after.append(Stage(
                f"train-polisher-{row}", "train_polisher",
                {"teacher": teacher, "ann": labeled, "images": images,
                 "detections": oof, "noise": rd / "noise.parquet", "out": polisher,
                 "config": TEACHER_CONFIG, "device": "cpu", "seed": 0},
                polisher, [teacher, labeled, oof, Path(TEACHER_CONFIG)]))  # fmt: skip
            keep = {}
        else:
            after += [
                Stage(f"synth-noise-{row}", "synth_noise",
                      {"ann": labeled, "out": rd / "noise.parquet", "config": TEACHER_CONFIG,
                       "noise_model": "gaussian", "seed": 0},
                      rd / "noise.parquet", [labeled, Path(TEACHER_CONFIG)]),
                Stage(f"train-polisher-{row}", "train_polisher",
                      {"teacher": teacher, "ann": labeled, "images": images,
                       "noise": rd / "noise.parquet", "out": polisher,
                       "config": TEACHER_CONFIG, "device": "cpu", "seed": 0},
                      polisher, [teacher, labeled, rd / "noise.parquet", Path(TEACHER_CONFIG)]),
            ]  # fmt: skip
            keep = {"keep_rule": "paper"}
        labels = rd / "labels.parquet"
        after += [
            Stage(f"polish-{row}", "polish",
                  {"images": unlabeled, "image_root": images, "teacher": teacher,
                   "polisher": polisher, "detections": preds, "out": labels,
                   "overwrite": True, "config": TEACHER_CONFIG, "device": "cpu", **keep},
                  labels, [teacher, polisher, unlabeled, preds, Path(TEACHER_CONFIG)]),
            evaluate_pseudo_stage(f"evaluate-{row}", labels, truth, rd / "quality.json"),
        ]  # fmt: skip
    return first, after


def f1(view: dict) -> float:
    p, r = view["precision50"], view["recall50"]
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def table(rows: list[str]) -> str:
    lines = [
        "| boxes | polisher learned from | boxes | mean IoU | improved | P@.5 | R@.5 | F1@.5 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    first = True
    for row in rows:
        path = OUT / row / "quality.json"
        if not path.is_file():
            lines.append(f"| {row} | (not run yet) | | | | | | |")
            continue
        q = json.loads(path.read_text())
        t, c, b = q["views"]["teacher"], q["views"]["cls"], q["box_quality"]
        if first:
            lines.append(
                f"| labeler's boxes, score >= initial threshold | – | {t['boxes']} | "
                f"{b['mean_iou_before']:.3f} | – | {t['precision50']:.3f} | "
                f"{t['recall50']:.3f} | {f1(t):.3f} |"
            )
            first = False
        source = SOURCES[row]
        lines.append(
            f"| polished ({row}) | {source} | {c['boxes']} | {b['mean_iou_after']:.3f} | "
            f"{b['improved_fraction']:.0%} | {c['precision50']:.3f} | {c['recall50']:.3f} | "
            f"{f1(c):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Subset of {', '.join(ROWS)}.")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if not args.table_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        OUT.mkdir(parents=True, exist_ok=True)
        first, after = stages(set(rows))
        event = lambda e, s: print(f"[labeler] {e} {s.name}", flush=True)  # noqa: E731
        run_stages(first, OUT, run_stage, event)
        oof = OUT / "labeler_oof.json"
        crossfit = OUT / "labeler_oof/crossfit.parquet"
        if not oof.is_file() or oof.stat().st_mtime < crossfit.stat().st_mtime:
            crossfit_to_coco_results(crossfit, oof)
        run_stages(after, OUT, run_stage, event)
    print(table(rows))


if __name__ == "__main__":
    main()
