"""Polisher variants on the seeds of ``student_seeds.py`` (their teacher, split, polisher and
cross-fitted detections): which noise to learn from, how many regression passes, and the
baseline a user would otherwise reach for (teacher TTA + weighted box fusion).

For each seed's run directory and each variant: (train the polishers,) polish the unlabeled
images and score the pseudo labels against their hidden truth (``dpl evaluate --pseudo``; the
unlabeled images of the training pool, never the test split):

    crossfit       the run's own polisher and labels (the preset's noise: crossfit)
    crossfit-r0    the same noise file, --real-fraction 0 (synthetic pairs from the
                   empirical noise fitted on the out-of-fold detections, no real pairs)
    crossfit-r25   --real-fraction 0.25
    gaussian       the paper's Gaussian noise (synth-noise --noise-model gaussian): synthetic
                   pairs only, no real negatives; keep thresholds still fitted on the run's
                   crossfit.parquet (--crossfit)
    reg2, reg3     the run's own polisher, polish --reg-steps 2 / 3 (cascade)
    tta            the run's own polisher, polish --tta: the teacher boxes are the TTA +
                   fusion baseline (flip and two extra scales, WBF), then polished

Reports box IoU to the truth before -> after polishing (for ``tta`` "before" is the fused
TTA box), share improved, the classification pseudo labels at the fitted rule (precision /
recall at IoU .5, class-aware) and, to compare classification polishers at equal recall, the
precision of the teacher boxes (score >= 0.5) ranked by the polisher's probability at the
recall the run's own polisher keeps. Stages are cached in <run>/variants/<variant>/; the
finished figures are recorded in benchmarks/results/seeds/ as student_seeds.py does.

    python benchmarks/polisher_variants.py --dataset demo --version 34792fcb3430 --seeds 0,1
    python benchmarks/polisher_variants.py --dataset bccd10 --version 293067115180 --seeds 0 \\
        --variants tta,reg2,reg3,gaussian,crossfit-r0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_seeds import OUT, RECORD, bccd_data, run_stage  # noqa: E402
from student_seeds import mean_std as _ms  # noqa: E402

from dpl_tools.config import preset_path  # noqa: E402
from dpl_tools.data.coco import load_coco  # noqa: E402
from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality  # noqa: E402
from dpl_tools.pipeline import Stage, evaluate_pseudo_stage, polish_stage, run_stages  # noqa: E402

VARIANTS = ("crossfit", "crossfit-r0", "crossfit-r25", "gaussian", "reg2", "reg3", "tta")
RETRAINED = ("crossfit-r0", "crossfit-r25", "gaussian")  # variants with their own polisher
REFERENCE_SCORE = 0.5  # the teacher boxes ranked by polisher probability: score >= this


def seed_setup(dataset: str, run: Path, seed: int) -> tuple[Path, str]:
    """(images folder, config) of a seed's run, as student_seeds.py ran it."""
    if dataset == "demo":
        return run / "data/train/images", str(preset_path("demo"))
    data, config = bccd_data(int(dataset.removeprefix("bccd")), seed)
    return data.images, config


def variant_stages(run: Path, variant: str, images: Path, config: str) -> list[Stage]:
    out = run / "variants" / variant
    labeled, teacher = run / "split/labeled.json", run / "teacher.pt"
    polisher, extra = run / "polisher.pt", {}
    stages = []
    if variant in RETRAINED:
        polisher = out / "polisher.pt"
        common = {"teacher": teacher, "ann": labeled, "images": images, "out": polisher,
                  "seed": 0, "config": config, "device": "cpu"}  # fmt: skip
        if variant == "gaussian":
            noise = out / "noise.parquet"
            stages.append(Stage("synth-noise", "synth_noise",
                                {"ann": labeled, "out": noise, "seed": 0,
                                 "config": config, "noise_model": "gaussian"},
                                noise, [labeled]))  # fmt: skip
            options = {**common, "noise": noise, "crossfit": run / "crossfit.parquet"}
            inputs = [teacher, noise, run / "crossfit.parquet"]
        else:
            share = {"crossfit-r0": 0, "crossfit-r25": 0.25}[variant]
            options = {**common, "noise": run / "noise.parquet", "real_fraction": share}
            inputs = [teacher, run / "noise.parquet"]
        stages.append(Stage("train-polisher", "train_polisher", options, polisher, inputs))
    elif variant in ("reg2", "reg3"):
        extra = {"reg_steps": int(variant[-1])}
    elif variant == "tta":
        extra = {"tta": True}
    stages += [
        polish_stage("polish", run / "split/unlabeled.json", images, out / "labels.parquet",
                     teacher, polisher, config, "cpu", extra=extra),
        evaluate_pseudo_stage("evaluate-pseudo", out / "labels.parquet",
                              run / "split/unlabeled_gt.json", out / "pseudo_quality.json"),
    ]  # fmt: skip
    return stages


def ranked_by_polisher(labels: Path, truth: Path) -> dict:
    """PR curve (IoU .5, class-aware, polished labels) of the teacher boxes with score >=
    REFERENCE_SCORE ranked by the classification polisher's probability: the library's own
    scoring, on a copy of the table whose cls view is all those boxes, scored by that prob."""
    table = pq.read_table(labels)
    ref = pc.fill_null(pc.greater_equal(table["teacher_score"], REFERENCE_SCORE), False)
    table = table.set_column(table.schema.get_field_index("use_cls"), "use_cls", ref)
    prob = pc.fill_null(table["polisher_prob"], 0.0).cast(pa.float32())
    table = table.set_column(table.schema.get_field_index("teacher_score"), "teacher_score", prob)
    return pseudo_label_quality(table, load_coco(truth))["pr_curves"]["cls"]


def precision_at(curve: dict, recall: float) -> float | None:
    """Interpolated precision: the best precision at a recall >= ``recall``."""
    p, r = np.asarray(curve["precision"]), np.asarray(curve["recall"])
    at = p[r >= recall - 1e-9]
    return float(at.max()) if len(at) else None


def result_dir(run: Path, variant: str) -> Path:
    return run if variant == "crossfit" else run / "variants" / variant


def variant_result(run: Path, record: Path, variant: str) -> dict | None:
    """The variant's pseudo-label quality (+ its ranked PR curve), from the run or the record."""
    rel = Path("variants") / variant
    for folder in (run / rel, record / rel):
        path = folder / "result.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def finish(run: Path, record: Path, variant: str) -> None:
    """Write the variant's result.json (quality without per-box lists + ranked curve) into
    the run and the record."""
    where = result_dir(run, variant)
    quality_path = where / "pseudo_quality.json"
    if not quality_path.is_file():
        return
    quality = json.loads(quality_path.read_text())
    quality.pop("iou_to_truth", None)
    quality["ranked_by_polisher"] = ranked_by_polisher(
        where / "labels.parquet", run / "split/unlabeled_gt.json"
    )
    for folder in (run / "variants" / variant, record / "variants" / variant):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(quality) + "\n")


def table(results: dict[int, dict[str, dict]], variants: list[str]) -> str:
    lines = ["| variant | seeds | box IoU before -> after | improved | cls kept | P@.5 | R@.5 "
             "| P at the own polisher's recall (ranked by polisher prob) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for variant in variants:
        qs = {s: r[variant] for s, r in results.items() if variant in r}
        if not qs:
            lines.append(f"| {variant} | 0 | | | | | | |")
            continue
        b = [q["box_quality"] for q in qs.values()]
        c = [q["views"]["cls"] for q in qs.values()]
        at = [
            precision_at(
                q["ranked_by_polisher"], results[s]["crossfit"]["views"]["cls"]["recall50"]
            )
            for s, q in qs.items()
            if "crossfit" in results[s]
        ]
        lines.append(
            f"| {variant} | {len(qs)} | {_ms([x['mean_iou_before'] for x in b])} -> "
            f"{_ms([x['mean_iou_after'] for x in b])} | "
            f"{_ms([x['improved_fraction'] for x in b])} | {_ms([x['boxes'] for x in c])} | "
            f"{_ms([x['precision50'] for x in c])} | {_ms([x['recall50'] for x in c])} | "
            f"{_ms([a for a in at if a is not None])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo", choices=["demo", "bccd10", "bccd5"])
    parser.add_argument("--version", required=True, help="student_seeds.py code version")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]))
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="Wait for each seed's pipeline to score its pseudo labels.",
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    results: dict[int, dict[str, dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        run = OUT / args.dataset / args.version / f"seed{seed}"
        record = RECORD / args.dataset / args.version / f"seed{seed}"
        ready = run / ".stages" / "evaluate-pseudo.json"  # the seed's own polish is scored
        while args.wait and not args.table_only and not ready.is_file():
            time.sleep(60)
        if not ready.is_file() and not args.table_only:
            print(f"[seed {seed}] {run} has no scored pseudo labels yet (student_seeds.py first)")
        for variant in ["crossfit", *variants] if ready.is_file() and not args.table_only else []:
            if variant_result(run, record, variant) is not None:
                continue
            if variant != "crossfit":
                images, config = seed_setup(args.dataset, run, seed)
                out = run / "variants" / variant
                out.mkdir(parents=True, exist_ok=True)
                tag = f"[seed {seed} {variant}]"
                run_stages(variant_stages(run, variant, images, config), out, run_stage,
                           lambda e, s, t=tag: print(f"{t} {e} {s.name}", flush=True))  # fmt: skip
            finish(run, record, variant)
        results[seed] = {
            v: r for v in ["crossfit", *variants] if (r := variant_result(run, record, v))
        }
    print(table(results, ["crossfit", *[v for v in variants if v != "crossfit"]]))


if __name__ == "__main__":
    main()
