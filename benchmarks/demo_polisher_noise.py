"""Which noise should the demo's polishers learn from? Polisher-only ablation on the seeds of
``student_seeds.py --dataset demo`` (their teacher, split and cross-fitted detections).

For each seed's run directory and each variant: train the polishers, polish the unlabeled
images and score the pseudo labels against their hidden truth (``dpl evaluate --pseudo``;
the unlabeled images of the training pool, never the test split):

    crossfit       the run's own polisher (preset: crossfit noise, real fraction 0.5)
    crossfit-r0    the same noise file, --real-fraction 0 (synthetic pairs from the
                   empirical noise fitted on the out-of-fold detections, no real pairs)
    crossfit-r25   --real-fraction 0.25
    gaussian       the paper's Gaussian noise (synth-noise --noise-model gaussian); keep
                   thresholds still fitted on the run's crossfit.parquet (--crossfit)

Reports box IoU teacher -> polished, share improved, and the classification pseudo labels
(precision / recall at IoU .5, class-aware). Stages are cached in <run>/noise-ablation/.

    python benchmarks/demo_polisher_noise.py --version 34792fcb3430 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_seeds import dpl  # noqa: E402  (runs one stage as a user would)

from dpl_tools.config import preset_path  # noqa: E402
from dpl_tools.pipeline import Stage, evaluate_pseudo_stage, polish_stage, run_stages  # noqa: E402

SEEDS_OUT = ROOT / "benchmarks/out/seeds/demo"
VARIANTS = ("crossfit", "crossfit-r0", "crossfit-r25", "gaussian")


def variant_stages(run: Path, variant: str, config: str) -> list[Stage]:
    out = run / "noise-ablation" / variant
    labeled, images = run / "split/labeled.json", run / "data/train/images"
    teacher = run / "teacher.pt"
    polisher = out / "polisher.pt"
    common = {"--teacher": teacher, "--ann": labeled, "--images": images, "--out": polisher,
              "--seed": 0, "--config": config, "--device": "cpu"}  # fmt: skip
    stages = []
    if variant == "gaussian":
        noise = out / "noise.parquet"
        stages.append(Stage("synth-noise", "synth-noise",
                            {"--ann": labeled, "--out": noise, "--seed": 0, "--config": config,
                             "--noise-model": "gaussian"}, noise, [labeled]))  # fmt: skip
        options = {**common, "--noise": noise, "--crossfit": run / "crossfit.parquet"}
        inputs = [teacher, noise, run / "crossfit.parquet"]
    else:
        share = {"crossfit-r0": 0, "crossfit-r25": 0.25}[variant]
        options = {**common, "--noise": run / "noise.parquet", "--real-fraction": share}
        inputs = [teacher, run / "noise.parquet"]
    stages += [
        Stage("train-polisher", "train-polisher", options, polisher, inputs),
        polish_stage("polish", run / "split/unlabeled.json", images, out / "labels.parquet",
                     teacher, polisher, config, "cpu"),
        evaluate_pseudo_stage("evaluate-pseudo", out / "labels.parquet",
                              run / "split/unlabeled_gt.json", out / "pseudo_quality.json"),
    ]  # fmt: skip
    return stages


def quality(run: Path, variant: str) -> dict | None:
    path = (run / "pseudo_quality.json" if variant == "crossfit"
            else run / "noise-ablation" / variant / "pseudo_quality.json")  # fmt: skip
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def table(runs: dict[int, Path]) -> str:
    lines = ["| variant | seeds | box IoU teacher -> polished | improved | cls kept | "
             "P@.5 | R@.5 |", "|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for variant in VARIANTS:
        qs = [q for q in (quality(r, variant) for r in runs.values()) if q]
        if not qs:
            lines.append(f"| {variant} | 0 | | | | | |")
            continue
        b = [q["box_quality"] for q in qs]
        c = [q["views"]["cls"] for q in qs]
        lines.append(
            f"| {variant} | {len(qs)} | {_ms([x['mean_iou_before'] for x in b])} -> "
            f"{_ms([x['mean_iou_after'] for x in b])} | "
            f"{_ms([x['improved_fraction'] for x in b])} | {_ms([x['boxes'] for x in c])} | "
            f"{_ms([x['precision50'] for x in c])} | {_ms([x['recall50'] for x in c])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="student_seeds.py code version dir")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    runs = {int(s): SEEDS_OUT / args.version / f"seed{s}" for s in args.seeds.split(",")}
    config = str(preset_path("demo"))
    if not args.table_only:
        for seed, run in runs.items():
            for variant in args.variants.split(","):
                out = run / "noise-ablation" / variant
                out.mkdir(parents=True, exist_ok=True)
                tag = f"[seed {seed} {variant}]"
                run_stages(variant_stages(run, variant, config), out, dpl,
                           lambda e, s, t=tag: print(f"{t} {e} {s.name}", flush=True))  # fmt: skip
    print(table(runs))


if __name__ == "__main__":
    main()
