"""Choose a student recipe on a validation set: student variants x training seeds on one
demo-bench seed's teacher and pseudo labels.

``student_seeds.py --dataset demo-bench`` makes a seed's run directory (teacher, polisher,
pseudo labels). This script trains student variants from it, each with several training
seeds (``--student-seeds``: the student's seed only; the data, teacher and pseudo labels
stay), and evaluates every student on a validation set of the demo's generator drawn with
seed 2000 + the data seed: images of the training distribution that are neither training
nor test images. So recipes are compared on validation figures, over training seeds, and
the test split is left for final figures (the issue's rule: nothing is tuned on it).

    python benchmarks/student_variants.py --run-dir benchmarks/out/seeds/demo-bench/<v>/seed0 \\
        --variants labeled-only,raw,full,full-tta --student-seeds 0,1,2 --jobs 2

Students and logs go to ``--out`` (default ``<run-dir>/variants``); each finished
student's validation figures are kept in git, in
``benchmarks/results/variants/demo-bench/<code version>/seed<k>/val-<variant>-s<seed>.json``,
so a table is completed over several sittings (run directories do not outlive one); a
student cut short resumes from its periodic checkpoint (``train-student --resume``).
Variants (the full method is the run's own ``train-student``):

    labeled-only  the labeled images only, as many per step as full (student_seeds' control)
    raw           the teacher's boxes and classes (--pseudo-view raw)
    full          polished pseudo labels, the preset's student
    full-tta      pseudo labels polished with teacher test-time augmentation (polish --tta)
    raw-tta       the TTA-fused teacher boxes, unpolished
    full-r3       3 pseudo-labeled images per labeled one (batch 2 + 6: the same 8 per step)
    full-soft     background of the pseudo-labeled images weighted by the teacher's
                  background probability (--negatives soft, Soft Teacher), not ignore regions
    full-hard     every proposal matching no classification pseudo label is background
    perfect       the full method's student on perfect pseudo labels: the unlabeled images'
                  hidden truth, every box kept (dpl_tools.data.truth_labels). The ceiling of
                  what any teacher and polisher could give this student; oracle - perfect
                  is what the recipe (4 of 20 labeled images in every step) costs
    full-no-fp    the run's pseudo labels with their false positives (classification pseudo
                  labels matching no true box of their class at IoU .5) made ignore regions:
                  what a perfect keep rule would give
    full-no-miss  the run's pseudo labels with every true box they miss added: what a
                  teacher of perfect recall would give. Between full and perfect, these two
                  say whether precision or recall costs the student more
    full-true-boxes  the run's pseudo labels with each box on an object (IoU .5, any class)
                  moved onto its true box: what perfect localisation would give
    full-no-fp-miss  false positives made ignore regions and missed objects added together
    full-corrected  all three corrections (boxes, false positives, missed): what is left
                  between it and perfect is the ignore regions and the keep flags
    full-long     the full method at twice the schedule (1,600 iterations): does a student
                  on pseudo labels gain from longer training where the labeled-only one
                  (labeled-only-long, the same 1,600) cannot?
    oracle        the labeled-only recipe on every training image's truth
    online        train-student --online from the teacher with the run's polisher (the
                  runner's online row); its EMA teacher is scored too (row "<variant> EMA")
    online-lr     online at lr 0.001 (the converged teacher is not restarted at 0.01)
    online-joint  online with the polishers trained jointly (--online-polisher)
    online-m99    online with EMA momentum 0.99 (the default 0.999 leaves an 800-iteration
                  run's teacher 45% its start; the paper's 0.999 is for 180k iterations)
    online-joint-lr  both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpl_tools.data.coco import load_coco  # noqa: E402
from dpl_tools.data.truth_labels import (  # noqa: E402
    write_truth_corrected_pseudo_labels,
    write_truth_pseudo_labels,
)
from dpl_tools.demo import DEMO_DATA  # noqa: E402
from dpl_tools.pipeline import labeled_only_settings  # noqa: E402
from dpl_tools.report.online import online_log  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from student_seeds import mean_std  # noqa: E402

CONFIG = ROOT / "benchmarks/configs/demo_bench.yaml"
RECORD = ROOT / "benchmarks/results/variants/demo-bench"
VALIDATION_SEED = 2000  # + the data seed; training pools use the seed, test sets seed + 1000
ONLINE = "online"  # the pseudo labels are made in the loop
# pseudo labels corrected from the truth (truth_corrected_pseudo_labels' fix for each file)
CORRECTED: dict[str, tuple[str, ...]] = {
    "labels-no-fp": ("false-positives",),
    "labels-no-miss": ("missed",),
    "labels-true-boxes": ("boxes",),
    "labels-no-fp-miss": ("false-positives", "missed"),
    "labels-corrected": ("boxes", "false-positives", "missed"),
}
# variant -> (pseudo labels: None, "labels", "labels-tta", "labels-perfect", a CORRECTED file
# or ONLINE; extra train-student options)
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "labeled-only": (None, []),
    "raw": ("labels", ["--pseudo-view", "raw"]),
    "full": ("labels", []),
    "full-tta": ("labels-tta", []),
    "raw-tta": ("labels-tta", ["--pseudo-view", "raw"]),
    "full-r3": ("labels", ["--unlabeled-ratio", "3", "--batch-size", "2"]),
    "full-soft": ("labels", ["--negatives", "soft"]),
    "full-hard": ("labels", ["--negatives", "hard"]),
    "perfect": ("labels-perfect", []),
    "full-no-fp": ("labels-no-fp", []),
    "full-no-miss": ("labels-no-miss", []),
    "full-true-boxes": ("labels-true-boxes", []),
    "full-no-fp-miss": ("labels-no-fp-miss", []),
    "full-corrected": ("labels-corrected", []),
    "full-long": ("labels", ["--iters", "1600"]),
    "labeled-only-long": (None, ["--iters", "1600"]),
    "oracle": (None, []),
    "online": (ONLINE, []),
    "online-lr": (ONLINE, ["--lr", "0.001"]),
    "online-joint": (ONLINE, ["--online-polisher"]),
    "online-m99": (ONLINE, ["--ema-momentum", "0.99"]),
    "online-joint-lr": (ONLINE, ["--online-polisher", "--lr", "0.001"]),
}


def dpl(argv: list[str], log: Path) -> None:
    """One dpl command, one torch thread, its output in ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "dpl_tools.cli", *argv], cwd=ROOT, env=env,
                       stdout=out, stderr=subprocess.STDOUT, check=True)  # fmt: skip


def validation_set(out: Path, data_seed: int) -> Path:
    """The demo generator's validation images for ``data_seed`` (made once)."""
    return DEMO_DATA.make_set(out / f"val{data_seed}", DEMO_DATA.test_images,
                              VALIDATION_SEED + data_seed)  # fmt: skip


def tta_labels(run_dir: Path, out: Path) -> Path:
    """The run's unlabeled images polished with teacher TTA (made once)."""
    labels = out / "labels-tta.parquet"
    if not labels.is_file():
        dpl(["polish", "--images", str(run_dir / "split/unlabeled.json"), "--image-root",
             str(run_dir / "data/train/images"), "--out", str(labels), "--teacher",
             str(run_dir / "teacher.pt"), "--polisher", str(run_dir / "polisher.pt"),
             "--config", str(CONFIG), "--device", "cpu", "--tta", "--no-progress"],
            out / "polish-tta.log")  # fmt: skip
    return labels


def needed_files(variants: list[str]) -> list[str]:
    """The run-directory files that ``variants`` read: so a variant that needs no pseudo
    labels from the run (the controls, perfect) can start before its polish is done."""
    labels = {VARIANTS[v][0] for v in variants}
    files = ["teacher.pt", "split/labeled.json"]
    if {"labels", *CORRECTED} & labels:
        files.append("labels.parquet")
    if labels & {"labels-tta", ONLINE}:
        files.append("polisher.pt")
    if labels & {"labels-perfect", ONLINE, *CORRECTED}:
        files.append("split/unlabeled_gt.json")
    return files


def perfect_labels(run_dir: Path, out: Path) -> Path:
    """The run's unlabeled images' hidden truth as pseudo labels (made once)."""
    labels = out / "labels-perfect.parquet"
    if not labels.is_file():
        write_truth_pseudo_labels(load_coco(run_dir / "split/unlabeled_gt.json"), labels)
    return labels


def corrected_labels(run_dir: Path, out: Path, name: str) -> Path:
    """The run's pseudo labels with one kind of error corrected from the unlabeled images'
    hidden truth (``CORRECTED[name]``; made once)."""
    labels = out / f"{name}.parquet"
    if not labels.is_file():
        gt = load_coco(run_dir / "split/unlabeled_gt.json")
        write_truth_corrected_pseudo_labels(run_dir / "labels.parquet", gt, CORRECTED[name], labels)
    return labels


CODE_TAG = ""  # --code-tag: students of newer code on an older run's pseudo labels


def record_dir(run_dir: Path) -> Path:
    """Where a run directory's validation figures are kept (code version [+ code tag] /
    seed)."""
    version = run_dir.parent.name + (f"+{CODE_TAG}" if CODE_TAG else "")
    return RECORD / version / run_dir.name


def train_and_validate(run_dir: Path, out: Path, variant: str, seed: int, val: Path) -> dict:
    """Train one student variant with training seed ``seed``; its validation figures."""
    figures = record_dir(run_dir) / f"val-{variant}-s{seed}.json"
    if figures.is_file():
        return json.loads(figures.read_text())
    labels, extra = VARIANTS[variant]
    student = out / f"{variant}-s{seed}.pt"
    ann = run_dir / ("data/train/annotations.json" if variant == "oracle" else "split/labeled.json")
    argv = ["train-student", "--ann", str(ann), "--images", str(run_dir / "data/train/images"),
            "--teacher", str(run_dir / "teacher.pt"), "--out", str(student), "--seed", str(seed),
            "--config", str(CONFIG), "--device", "cpu", "--resume", *extra]  # fmt: skip
    if labels is None:
        control = labeled_only_settings(str(CONFIG))
        argv += ["--unlabeled-ratio", "0", "--batch-size", str(control["batch_size"])]
    elif labels == ONLINE:
        split = run_dir / "split"
        argv += ["--online", "--unlabeled", str(split / "unlabeled.json"), "--polisher",
                 str(run_dir / "polisher.pt"), "--unlabeled-gt",
                 str(split / "unlabeled_gt.json")]  # fmt: skip
    else:
        pseudo = run_dir / "labels.parquet" if labels == "labels" else out / f"{labels}.parquet"
        argv += ["--pseudo", str(pseudo)]
    if not student.is_file():
        dpl(argv, out / f"{variant}-s{seed}.log")
    figures.parent.mkdir(parents=True, exist_ok=True)
    models = [(student, figures)]
    if labels == ONLINE:  # the EMA teacher too: the model the paper's code evaluates
        ema = record_dir(run_dir) / f"val-{variant}-ema-s{seed}.json"
        models.append((student.with_name(f"{student.stem}.teacher.pt"), ema))
        log = record_dir(run_dir) / f"log-{variant}-s{seed}.json"  # the in-loop log, kept
        log.write_text(json.dumps(online_log(student), indent=1) + "\n")
    for model, written in models:
        dpl(["evaluate", "--model", str(model), "--ann", str(val), "--images",
             str(val.parent / "images"), "--json", str(written), "--device", "cpu"],
            out / f"val-{written.stem.removeprefix('val-')}.log")  # fmt: skip
    return json.loads(figures.read_text())


def table(figures: Path, variants: list[str], seeds: list[int]) -> str:
    """Validation AP per variant: mean ± std over the finished training seeds."""
    lines = ["| variant | seeds | validation AP (per seed) | AP50 |", "|---|---:|---|---|"]
    shown = [(v, v) for v in variants]
    shown += [(f"{v}-ema", f"{v} EMA teacher") for v in variants if VARIANTS[v][0] == ONLINE]
    for variant, name in shown:
        done = [json.loads(p.read_text()) for s in seeds
                if (p := figures / f"val-{variant}-s{s}.json").is_file()]  # fmt: skip
        ap, ap50 = mean_std([d["AP"] for d in done]), mean_std([d["AP50"] for d in done])
        per_seed = ", ".join(f"{d['AP']:.3f}" for d in done)
        lines.append(f"| {name} | {len(done)} | {ap} ({per_seed}) | {ap50} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="a demo-bench seed's run directory of student_seeds.py")  # fmt: skip
    parser.add_argument("--variants", default="labeled-only,raw,full",
                        help=f"comma list of {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--student-seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once")
    parser.add_argument("--out", type=Path, help="default <run-dir>/variants")
    parser.add_argument("--table-only", action="store_true", help="print the recorded table")
    parser.add_argument("--code-tag", default="",
                        help="students trained by newer code than the run's (e.g. a fix) on "
                             "its pseudo labels: recorded apart, under <version>+<tag>, and "
                             "trained in <run-dir>/variants+<tag>")  # fmt: skip
    args = parser.parse_args()
    global CODE_TAG
    CODE_TAG = args.code_tag
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    seeds = [int(s) for s in args.student_seeds.split(",")]
    run_dir = args.run_dir.resolve()
    if not run_dir.name.removeprefix("seed").isdigit():
        parser.error(f"{run_dir}: not a seed's run directory of student_seeds.py (seed<k>)")
    if args.table_only:
        print(table(record_dir(run_dir), variants, seeds))
        return
    missing = [n for n in needed_files(variants) if not (run_dir / n).is_file()]
    if missing:
        parser.error(f"{run_dir}: no {', '.join(missing)} (run student_seeds.py there first)")
    out = (args.out or run_dir / ("variants" + (f"+{CODE_TAG}" if CODE_TAG else ""))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        val = validation_set(out, int(run_dir.name.removeprefix("seed")))
        if any(VARIANTS[v][0] == "labels-tta" for v in variants):
            tta_labels(run_dir, out)
        if any(VARIANTS[v][0] == "labels-perfect" for v in variants):
            perfect_labels(run_dir, out)
        for name in {VARIANTS[v][0] for v in variants} & set(CORRECTED):
            corrected_labels(run_dir, out, name)
        todo = [(v, s) for v in variants for s in seeds]
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            for future in [pool.submit(train_and_validate, run_dir, out, v, s, val)
                           for v, s in todo]:  # fmt: skip
                future.result()
    except subprocess.CalledProcessError as e:
        sys.exit(f"student_variants.py: dpl {e.cmd[3]} failed (exit {e.returncode}); its log "
                 f"is in {out}")  # fmt: skip
    print(table(record_dir(run_dir), variants, seeds))


if __name__ == "__main__":
    main()
