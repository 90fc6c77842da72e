"""Multi-seed student benchmark: can the method be told apart from its baselines?

For each seed it runs the whole pipeline (``dpl run``'s stages: split, teacher, polishers,
polish, the full-method student) and, from the same teacher and with the same student
budget, these rows, each evaluated on the test split with ``dpl evaluate``:

    teacher        the supervised teacher as trained
    labeled-only   the student recipe on the labeled images only (--unlabeled-ratio 0):
                   same total iterations as every student row, no pseudo label
    raw            pseudo labels = the teacher's boxes at the initial threshold
    full           the method: polished pseudo labels, disentangled supervision
    full-weak      the full method with weak augmentation (flip + multi-scale) only
    full-imagenet  the full method, the student re-initialised from ImageNet (STAC)
    full-teacher   the full method, the student initialised from its teacher
    full-hard      the full method, every unkept teacher box taught as background
    full-soft      the full method, background weighted by the teacher (Soft Teacher)
    paper          the paper's fixed rule: polish --keep-rule paper (0.9 / 0.9), hard
                   negatives (the same polisher)
    paper-ignore   the paper's fixed rule, unkept boxes as ignore regions
    p90            keep thresholds fitted for precision 0.9 (train-polisher
                   --precision-target 0.9: refitted on the same polisher and out-of-fold
                   detections), unkept boxes as ignore regions
    reg-only       ablation: polished boxes for box regression only (cls from raw)
    cls-only       ablation: classification pseudo labels only (regression from raw)
    online         the paper's online form (train-student --online): from the teacher, the
                   unlabeled images labelled in the loop by its EMA and the polishers,
                   same iterations and images per step as full
    online-ema     that run's EMA teacher (the model the paper's code evaluates)
    round2, round3 self-training rounds (``dpl run --rounds 3``): the full method again with
                   the previous round's full student as the teacher (its polisher trained
                   anew on that teacher, from round 1's box pairs)
    perfect        the full method's student on perfect pseudo labels (the unlabeled
                   images' hidden truth, every box kept: dpl_tools.data.truth_labels): the
                   ceiling of what any teacher and polisher can give this student;
                   oracle - perfect is what the student's recipe itself costs
    oracle         the labeled-only recipe on 100% of the training pool's labels

and prints mean +- std over the seeds, the difference to ``raw`` and "gap closed" =
(row - labeled-only) / (oracle - labeled-only), against the matched control, and whether
the bench is valid: (a) labeled-only gains at most 1 AP over the teacher (the teacher is
converged), (b) the oracle is at least 8 AP above labeled-only (labels matter), (c) the
test set has at least 300 images. Seeds run in parallel processes (``--jobs``), each
with OMP_NUM_THREADS=1. Every finished stage is cached in its seed's run directory
(``benchmarks/out/seeds/<dataset>/<code version>/seed<k>``, stage stamps as in
``dpl run``), so a table too long for one sitting is completed over several runs; the
code version is a hash of dpl's sources and presets, so changed code reruns everything.
The table printed lists what is still missing. The finished figures are also copied into
``benchmarks/results/seeds/`` (kept in git, with each stage's time): a later session reruns
only the rows not recorded there, from a copy of the commit whose code version it is
(``git archive <commit> | tar -x -C /tmp/bench``, then this file copied over it). A row
runs only the stages it reads from: the controls that start from ImageNet (labeled-only,
oracle) need neither the teacher nor the pseudo labels, nor does perfect (the split's hidden
truth), so they can fill a sitting of their own, while the rows that read pseudo labels must
finish in the sitting that made them (run directories do not outlive a session; checkpoints
are not recorded). ``--rows
teacher,pseudo`` runs the chain to the pseudo labels and their quality, with no student.

    python benchmarks/student_seeds.py --dataset demo --seeds 0,1,2,3,4 --jobs 2
    python benchmarks/student_seeds.py --dataset bccd10 --seeds 0,1,2 --jobs 2 \\
        --rows teacher,labeled-only,raw,full,oracle
    python benchmarks/student_seeds.py --dataset demo --seeds 0,1,2,3,4 --table-only

Datasets: ``demo`` (``dpl demo``'s synthetic data and preset; the seed also draws the
data, as ``dpl demo --seed``) and ``bccd10`` / ``bccd5`` (BCCD from ../shared/data,
converted once; labeled fold = seed + 1; settings in benchmarks/configs/bccd_seeds.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpl_tools.config import load_config, preset_path  # noqa: E402
from dpl_tools.demo import DEMO_DATA, DEMO_PRESET, prepare_demo_data  # noqa: E402
from dpl_tools.engine.train_online import teacher_path_of  # noqa: E402
from dpl_tools.models.polisher import read_polisher_checkpoint  # noqa: E402
from dpl_tools.pipeline import (  # noqa: E402
    PipelineData,
    Stage,
    evaluate_model_stage,
    evaluate_pseudo_stage,
    labeled_only_settings,
    online_student_stage,
    pipeline_stages,
    polish_stage,
    run_stages,
    student_stage,
)
from dpl_tools.report.online import online_log  # noqa: E402
from dpl_tools.stage_jobs import threads_per_stage  # noqa: E402

OUT = ROOT / "benchmarks/out/seeds"
# The demo bench: dpl demo's data at 2% labeled (20 of 1,000 images). On the validation set
# (benchmarks/RESULTS.md, 2026-12-06) 20 labeled images give 0.644 AP and all 1,000 give
# 0.765 with the student's recipe: labels are worth 12 AP there, 4 at 5%.
DEMO_BENCH_DATA = replace(DEMO_DATA, labeled_percent=2.0)
# Finished rows' figures, kept in git: a table outlives the run directories (checkpoints)
# of the session that measured it, and a later session runs only the rows still missing.
RECORD = ROOT / "benchmarks/results/seeds"
BCCD = (ROOT / "../shared/data/bccd").resolve()
DEEPPCB = (ROOT / "../shared/data/deeppcb").resolve()
ROWS = ("teacher", "labeled-only", "raw", "full", "full-weak", "full-imagenet", "full-teacher",
        "full-hard", "full-soft", "paper", "paper-ignore", "p90", "reg-only", "cls-only",
        "online", "online-ema", "round2", "round3", "perfect", "oracle")  # fmt: skip
ROUNDS = ("round2", "round3")  # self-training rounds: the previous round's student teaches
# not a table row: the pseudo labels and their quality (their table lines), no student
PSEUDO = "pseudo"
P90 = 0.9  # precision target of the p90 row
# row -> (train-student --pseudo-view, extra options); the full method is the pipeline's own
ROW_STUDENTS = {
    "labeled-only": (None, {"unlabeled_ratio": 0}),
    "raw": ("raw", {}),
    "full-weak": (None, {"augment": "weak"}),
    "full-imagenet": (None, {"init": "imagenet"}),
    "full-teacher": (None, {"init": "teacher"}),
    "full-hard": (None, {"negatives": "hard"}),
    "full-soft": (None, {"negatives": "soft"}),
    "paper": (None, {"negatives": "hard"}),
    "paper-ignore": (None, {"negatives": "ignore"}),
    "reg-only": ("reg-only", {}),
    "cls-only": ("cls-only", {}),
    "perfect": (None, {}),
    "oracle": (None, {"unlabeled_ratio": 0}),
}
# The stage that writes the perfect row's pseudo labels: run in this process (no dpl command)
PERFECT_LABELS = "truth_pseudo_labels"


def code_version() -> str:
    """Hash of the sources and presets every stage runs (changed code reruns the table)."""
    h = hashlib.sha256()
    files = sorted(
        [*ROOT.glob("dpl_tools/**/*.py"), *ROOT.glob("dpl_tools/configs/*.yaml"),
         *ROOT.glob("benchmarks/configs/*.yaml")]
    )  # fmt: skip
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# The threads a seed's stages share when they run in parallel (--stage-jobs 2), split by
# dpl's own rule (stage_jobs.threads_per_stage: the chain every row waits for, teacher to
# polish, alone on both; students and evaluations one each). Fixed, not read from the
# machine, because the thread count changes a CPU run's numbers: a row rerun in a later
# session gets the same teacher and pseudo labels.
BENCH_THREADS = 2


def dpl(argv: list[str], threads: int | None = None) -> None:
    """One stage as a user runs it: the ``dpl`` entry point in a subprocess (``threads``:
    its OMP_NUM_THREADS, default the runner's own)."""
    print("$ dpl " + " ".join(argv), flush=True)
    env = dict(os.environ)
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "dpl_tools.cli", *argv], cwd=ROOT, check=True, env=env)


def run_stage(stage: Stage, resume: bool, threads: int | None = None) -> None:
    """A pipeline stage as a user runs it: its printed ``dpl`` command, in a subprocess
    (the perfect row's pseudo labels, which no dpl command writes: here)."""
    if stage.function == PERFECT_LABELS:
        from dpl_tools.data.coco import load_coco
        from dpl_tools.data.truth_labels import write_truth_pseudo_labels

        write_truth_pseudo_labels(load_coco(stage.params["truth"]), stage.output)
        return
    dpl(stage.command_line(resume), threads)


def dataset_data(dataset: str, seed: int, run_dir: Path) -> tuple[PipelineData, str]:
    """A runner dataset's pipeline data for ``seed`` and the config its stages use:
    ``demo`` (make demo's preset), ``demo-bench`` (the same data, the bench's budget),
    ``bccd<P>`` and ``deeppcb<P>`` (P% labeled)."""
    if dataset == "demo":
        return prepare_demo_data(run_dir, seed), str(preset_path(DEMO_PRESET))
    if dataset == "demo-bench":
        config = ROOT / "benchmarks/configs/demo_bench.yaml"
        return prepare_demo_data(run_dir, seed, DEMO_BENCH_DATA), str(config)
    if dataset.startswith("deeppcb"):
        return deeppcb_data(int(dataset.removeprefix("deeppcb")), seed)
    return bccd_data(int(dataset.removeprefix("bccd")), seed)


def dataset_test_ann(dataset: str) -> Path:
    """The test split's COCO JSON of a real-data runner dataset."""
    if dataset.startswith("deeppcb"):
        return DEEPPCB / "test.json"
    return OUT / "bccd-coco/test.json"


def real_data(
    train: Path, test: Path, images: Path, percent: int, seed: int, config: str
) -> tuple[PipelineData, str]:
    """A real set's train / test COCO files, fold seed + 1 of ``percent``% labeled, and the
    runner config ``benchmarks/configs/<config>``."""
    data = PipelineData(ann=train, images=images, percent=float(percent), fold=seed + 1,
                        seed=seed, test_ann=test, test_images=images)  # fmt: skip
    return data, str(ROOT / "benchmarks/configs" / config)


def deeppcb_data(percent: int, seed: int) -> tuple[PipelineData, str]:
    """DeepPCB's official trainval (1,000 images) / test (500) split."""
    return real_data(DEEPPCB / "train.json", DEEPPCB / "test.json", DEEPPCB / "images",
                     percent, seed, "deeppcb_seeds.yaml")  # fmt: skip


def bccd_data(percent: int, seed: int) -> tuple[PipelineData, str]:
    """BCCD train/test as COCO (converted once)."""
    folder = OUT / "bccd-coco"
    for split in ("train", "test"):
        if not (folder / f"{split}.json").is_file():
            dpl(["convert", "--format", "voc", str(BCCD), "--split", split,
                 "--out", str(folder / f"{split}.json")])  # fmt: skip
    return real_data(folder / "train.json", folder / "test.json", BCCD / "JPEGImages",
                     percent, seed, "bccd_seeds.yaml")  # fmt: skip


def seed_stages(dataset: str, seed: int, run_dir: Path) -> list[Stage]:
    """Every stage of one seed: the pipeline, then each row's student and evaluation."""
    data, config = dataset_data(dataset, seed, run_dir)
    stages = pipeline_stages(data, run_dir, config, rounds=1 + len(ROUNDS), device="cpu")
    labeled, teacher = run_dir / "split/labeled.json", run_dir / "teacher.pt"
    paper_labels = run_dir / "labels-paper.parquet"
    stages += [
        polish_stage("polish-paper", run_dir / "split/unlabeled.json", data.images, paper_labels,
                     teacher, run_dir / "polisher.pt", config, "cpu",
                     extra={"keep_rule": "paper"}),
        evaluate_pseudo_stage("evaluate-pseudo-paper", paper_labels,
                              run_dir / "split/unlabeled_gt.json",
                              run_dir / "pseudo_quality-paper.json"),
    ]  # fmt: skip
    truth, perfect_labels = run_dir / "split/unlabeled_gt.json", run_dir / "labels-perfect.parquet"
    stages.append(Stage("perfect-labels", PERFECT_LABELS, {"truth": truth, "out": perfect_labels},
                        perfect_labels, [truth]))  # fmt: skip
    control = labeled_only_settings(config)
    student = load_config(config)["student"]
    from_imagenet, soft = student["init"] == "imagenet", student["negatives"] == "soft"
    for row, (view, extra) in ROW_STUDENTS.items():
        ann = data.ann if row == "oracle" else labeled
        labels = paper_labels if row.startswith("paper") else run_dir / "labels.parquet"
        labels = perfect_labels if row == "perfect" else labels
        row_teacher = teacher
        if row in ("labeled-only", "oracle"):  # as many images per step as the full method
            extra = {**extra, **control}
            labels = None  # no pseudo labels: it need not wait for them
        if row in ("labeled-only", "oracle", "perfect") and from_imagenet and not soft:
            row_teacher = None  # reads no teacher: it need not wait for one
        out = run_dir / f"student-{row}.pt"
        stages += [
            student_stage(f"train-student-{row}", ann, data.images, labels,
                          row_teacher, out, seed, config, "cpu", pseudo_view=view, extra=extra),
            evaluate_model_stage(f"evaluate-student-{row}", out, data.test_ann,
                                 data.test_images, run_dir / "eval" / f"student-{row}.json",
                                 "cpu"),
        ]  # fmt: skip
    return stages + online_stages(data, run_dir, seed, config)


def online_stages(data: PipelineData, run_dir: Path, seed: int, config: str) -> list[Stage]:
    """The online rows: ``train-student --online`` from the teacher (a mean teacher needs
    one, whatever the preset's ``student.init``), its in-loop log against the hidden truth,
    and the evaluations of the student and of its EMA teacher."""
    out, truth = run_dir / "student-online.pt", run_dir / "split/unlabeled_gt.json"
    train = online_student_stage(
        "train-student-online", run_dir / "split/labeled.json", data.images,
        run_dir / "split/unlabeled.json", run_dir / "teacher.pt", run_dir / "polisher.pt",
        out, seed, config, "cpu",
    )  # fmt: skip
    train.params.update(online=True, unlabeled_gt=truth, init="teacher")
    train.inputs.append(truth)
    evaluations = [
        evaluate_model_stage(f"evaluate-student-{row}", model, data.test_ann, data.test_images,
                             run_dir / "eval" / f"student-{row}.json", "cpu")
        for row, model in (("online", out), ("online-ema", teacher_path_of(out)))
    ]  # fmt: skip
    evaluations[1].inputs[0] = out  # the EMA teacher is written by the student's stage
    return [train, *evaluations]


def own_stage(stage: Stage, rows: set[str]) -> bool:
    """Whether ``stage`` is an asked row's own: a row's student and its evaluation, the
    teacher's evaluation (row ``teacher``), the pseudo labels' quality (``pseudo``, and
    ``full``, whose table line carries it); the split, which every row reads."""
    if stage.name == "perfect-labels":
        return "perfect" in rows
    if stage.name in ("polish-paper", "evaluate-pseudo-paper"):
        return bool({"paper", "paper-ignore"} & rows)
    if stage.name in ("train-student", "evaluate-student"):
        return "full" in rows
    if stage.name == "evaluate-teacher":
        return "teacher" in rows
    if stage.name == "evaluate-pseudo":
        return bool({"pseudo", "full"} & rows)
    if stage.name.startswith("evaluate-pseudo-round"):
        return stage.name.removeprefix("evaluate-pseudo-") in rows
    if stage.name == "train-student-online":
        return bool({"online", "online-ema"} & rows)
    for row in [*ROW_STUDENTS, "online", "online-ema", *ROUNDS]:
        if stage.name.endswith(f"-student-{row}"):
            return row in rows
    return stage.name == "split"


def needed_stages(stages: list[Stage], rows: set[str]) -> list[Stage]:
    """The asked rows' own stages and every stage whose output they read, directly or
    through other stages, in pipeline order. So controls that start from ImageNet
    (labeled-only, oracle) need neither the teacher nor the pseudo-label chain, and can run
    in a sitting of their own: runs end with a sitting, and only recorded figures persist."""
    producer = {stage.output: stage for stage in stages}
    keep = [stage for stage in stages if own_stage(stage, rows)]
    todo = list(keep)
    while todo:
        for path in todo.pop().inputs:
            source = producer.get(path)
            if source is not None and source not in keep:
                keep.append(source)
                todo.append(source)
    return [stage for stage in stages if stage in keep]


def refit_keep_thresholds(run_dir: Path, images: Path, config: str, target: float) -> dict:
    """The keep thresholds ``train-polisher --precision-target target`` would store, fitted
    with the run's trained polisher on its out-of-fold detections (cached as JSON)."""
    out = run_dir / f"keep-p{round(target * 100)}.json"
    if out.is_file():
        return json.loads(out.read_text())
    from dpl_tools.data.coco import load_coco
    from dpl_tools.engine.keep_thresholds import fit_on_crossfit
    from dpl_tools.models.checkpoint import load_detector
    from dpl_tools.models.polisher import load_polisher

    teacher, spec = load_detector(run_dir / "teacher.pt")
    polisher = load_polisher(run_dir / "polisher.pt")
    coco = load_coco(run_dir / "split/labeled.json", images)
    initial = float(load_config(config)["polish"]["initial_thresh"])
    fitted = fit_on_crossfit(run_dir / "crossfit.parquet", teacher, spec.label_to_cat, polisher,
                             coco, images, initial, precision_target=target)  # fmt: skip
    record = fitted.to_dict()
    out.write_text(json.dumps(record))
    return record


def p90_stages(dataset: str, seed: int, run_dir: Path) -> list[Stage]:
    """The p90 row: polish with the thresholds fitted for precision P90, ignore negatives."""
    data, config = dataset_data(dataset, seed, run_dir)
    keep = refit_keep_thresholds(run_dir, data.images, config, P90)
    labels = run_dir / "labels-p90.parquet"
    out = run_dir / "student-p90.pt"
    extra = {"cls_prob": keep["cls_prob"], "teacher_score": keep["teacher_score"]}
    return [
        polish_stage("polish-p90", run_dir / "split/unlabeled.json", data.images, labels,
                     run_dir / "teacher.pt", run_dir / "polisher.pt", config, "cpu", extra=extra),
        evaluate_pseudo_stage("evaluate-pseudo-p90", labels, run_dir / "split/unlabeled_gt.json",
                              run_dir / "pseudo_quality-p90.json"),
        student_stage("train-student-p90", run_dir / "split/labeled.json", data.images, labels,
                      run_dir / "teacher.pt", out, seed, config, "cpu",
                      extra={"negatives": "ignore"}),
        evaluate_model_stage("evaluate-student-p90", out, data.test_ann, data.test_images,
                             run_dir / "eval" / "student-p90.json", "cpu"),
    ]  # fmt: skip


def write_polisher_fit(run_dir: Path) -> None:
    """``polisher_fit.json``: what train-polisher fitted the keep rule on (boxes per image of
    the fold teachers and the teacher, the rule and its source) and the regression check,
    from the polisher checkpoint (issue 26's figures)."""
    polisher = run_dir / "polisher.pt"
    if not polisher.is_file():
        return
    extra = read_polisher_checkpoint(polisher).get("extra") or {}
    fit = {k: extra.get(k) for k in ("keep_thresholds", "regression_check")}
    (run_dir / "polisher_fit.json").write_text(json.dumps(fit, indent=1, default=str) + "\n")


def write_online_log(run_dir: Path) -> None:
    """``online_log.json``: the online student's in-loop pseudo-label log (its checkpoint's
    record: the training batches' figures and the fixed evaluation slice's)."""
    student = run_dir / "student-online.pt"
    if student.is_file():
        log = online_log(student)
        (run_dir / "online_log.json").write_text(json.dumps(log, indent=1) + "\n")


def online_lines(dataset: str, seeds: list[int], version: str) -> list[str]:
    """Per seed, the online run's evaluation slice before training and at its end: whether
    its pseudo labels' precision at one recall rose as the student trained (issue 22)."""
    lines = []
    for seed in seeds:
        log = [e for e in seed_figures(dataset, seed, version, "online_log.json") or []
               if e.get("slice_at_recall") is not None]  # fmt: skip
        if len(log) < 2:
            continue
        if not lines:
            lines = ["", "| online, evaluation slice | iteration | teacher AP50 | kept P / R | "
                     "teacher P@R | kept P@R |", "|---|---|---|---|---|---|"]  # fmt: skip
        for entry in (log[0], log[-1]):
            lines.append(
                f"| seed {seed}, {entry['slice_images']} images, R = {entry['slice_at_recall']} | "
                f"{entry['iteration']} | {entry['slice_teacher_ap50']} | "
                f"{entry['slice_kept_precision']} / {entry['slice_kept_recall']} | "
                f"{entry['slice_teacher_precision_at_recall']} | "
                f"{entry['slice_kept_precision_at_recall']} |"
            )
    return lines


def record_seed(dataset: str, seed: int, version: str) -> list[str]:
    """Copy a seed's finished figures (test metrics, pseudo-label quality, stage times) from
    its run directory into RECORD; returns the files copied."""
    run_dir = OUT / dataset / version / f"seed{seed}"
    record = RECORD / dataset / version / f"seed{seed}"
    write_polisher_fit(run_dir)
    write_online_log(run_dir)
    copied = []
    for path in [*run_dir.glob("eval/*.json"), *run_dir.glob("pseudo_quality*.json"),
                 *run_dir.glob("keep-p*.json"), *run_dir.glob("polisher_fit.json"),
                 *run_dir.glob("online_log.json"),
                 *run_dir.glob("round-*/pseudo_quality.json")]:  # fmt: skip
        target = record / path.relative_to(run_dir)
        if not target.is_file() or target.read_bytes() != path.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            copied.append(str(target.relative_to(ROOT)))
    times = stage_times(run_dir)
    if times:
        (record / "stage_times.json").parent.mkdir(parents=True, exist_ok=True)
        (record / "stage_times.json").write_text(json.dumps(times, indent=1) + "\n")
    return copied


def stage_times(run_dir: Path) -> dict[str, float]:
    """Seconds each stage took (its last run), from its stamp back to when it began: the
    runner's ``.began`` mark, else a training stage's ``.started`` stamp, else the end of
    the stage stamped before it (right only when stages ran one at a time)."""
    stages = run_dir / ".stages"
    stamps = sorted(
        (p for p in stages.glob("*.json") if not p.name.endswith(".started.json")),
        key=lambda p: p.stat().st_mtime,
    )
    times, previous = {}, None
    for path in stamps:
        name = path.name.removesuffix(".json")
        began, started = stages / f"{name}.began", stages / f"{name}.started.json"
        if began.is_file():
            begin = float(began.read_text())
        elif started.is_file():
            begin = started.stat().st_mtime
        else:
            begin = previous
        if begin is not None:
            times[name] = round(path.stat().st_mtime - begin, 1)
        previous = path.stat().st_mtime
    return times


def run_seed(dataset: str, seed: int, rows: set[str], version: str, stage_jobs: int = 1) -> None:
    run_dir = OUT / dataset / version / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    todo = rows - set(row_results(dataset, seed, version))
    if seed_figures(dataset, seed, version, "pseudo_quality.json") is not None:
        todo.discard(PSEUDO)
    if not todo:
        print(f"[seed {seed}] every asked row is recorded", flush=True)
        return
    stages = needed_stages(seed_stages(dataset, seed, run_dir), todo)

    def event(what: str, stage: Stage) -> None:
        print(f"[seed {seed}] {what} {stage.name}", flush=True)
        if what in ("start", "resume"):  # when it began, for stage_times (stages overlap)
            (run_dir / ".stages").mkdir(exist_ok=True)
            (run_dir / ".stages" / f"{stage.name}.began").write_text(f"{time.time()}\n")

    def invoke(stage: Stage, resume: bool) -> None:
        threads = threads_per_stage(stage, stage_jobs, BENCH_THREADS) if stage_jobs > 1 else None
        run_stage(stage, resume, threads)

    run_stages(stages, run_dir, invoke, event, jobs=stage_jobs)  # stage_jobs at once
    if "p90" in todo:  # its polish options come from a fit on the trained polisher
        run_stages(p90_stages(dataset, seed, run_dir), run_dir, run_stage, event)
    record_seed(dataset, seed, version)


def seed_figures(dataset: str, seed: int, version: str, name: str) -> dict | None:
    """One JSON file of a seed (e.g. ``eval/teacher.json``), from its run directory or,
    where that is gone, from the figures recorded in git; None when neither has it."""
    for folder in (
        OUT / dataset / version / f"seed{seed}",
        RECORD / dataset / version / f"seed{seed}",
    ):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return None


def row_results(dataset: str, seed: int, version: str) -> dict[str, dict]:
    """The finished rows of one seed: test metrics (+ pseudo-label quality for 'full'),
    from its run directory or, where that is gone, from the figures recorded in git."""

    def read(name: str) -> dict | None:
        return seed_figures(dataset, seed, version, name)

    files = {"teacher": "teacher", "full": "student", "p90": "student-p90"} | {
        r: f"student-{r}" for r in [*ROW_STUDENTS, "online", "online-ema", *ROUNDS]
    }
    out = {}
    for row, name in files.items():
        metrics = read(f"eval/{name}.json")
        if metrics is not None:
            out[row] = metrics
    for row, name in (("full", "pseudo_quality.json"), ("paper", "pseudo_quality-paper.json"),
                      ("p90", "pseudo_quality-p90.json"),
                      *((r, f"round-{r[-1]}/pseudo_quality.json") for r in ROUNDS)):  # fmt: skip
        quality = read(name)
        if quality is not None and row in out:
            out[row]["pseudo"] = quality
    return out


def _quality_lines(results: dict[int, dict], seeds: list[int]) -> list[str]:
    """Pseudo-label quality on the unlabeled images, mean ± std over the seeds."""
    sets = [("teacher", "full", "teacher boxes (score >= initial threshold)"),
            ("cls", "full", "classification pseudo labels, fitted rule (use_cls)"),
            ("cls", "paper", "classification pseudo labels, paper rule 0.9 / 0.9"),
            ("cls", "p90", "classification pseudo labels, fitted for precision 0.9"),
            *(("cls", r, f"classification pseudo labels, {r[:-1]} {r[-1]}'s teacher")
              for r in ROUNDS)]  # fmt: skip
    lines = []
    for view, row, name in sets:
        vals = [results[s][row]["pseudo"] for s in seeds if "pseudo" in results[s].get(row, {})]
        if not vals:
            continue
        if not lines:
            lines = ["", "| pseudo labels (IoU .5, class-aware) | boxes | precision | recall "
                     "| labels changed (right) | box IoU teacher -> polished |",
                     "|---|---|---|---|---|---|"]  # fmt: skip
        v = [q["views"][view] for q in vals]
        changes = [q.get("label_changes", {}) for q in vals]
        changed = sum(c.get("changed", 0) for c in changes)
        right = sum(c.get("right", 0) for c in changes)
        iou = [q["box_quality"] for q in vals]
        lines.append(
            f"| {name} | {mean_std([float(x['boxes']) for x in v])} | "
            f"{mean_std([x['precision50'] for x in v])} | "
            f"{mean_std([x['recall50'] for x in v])} | "
            f"{changed} ({right}) | "
            f"{mean_std([x['mean_iou_before'] for x in iou])} -> "
            f"{mean_std([x['mean_iou_after'] for x in iou])} |"
        )
    return lines


def _box_quality_lines(results: dict[int, dict], seeds: list[int]) -> list[str]:
    """Box IoU to truth, teacher -> polished, per teacher-score bin and object size, pooled
    over the seeds' matched pseudo boxes (the full method's polisher)."""
    vals = [results[s]["full"]["pseudo"] for s in seeds if "pseudo" in results[s].get("full", {})]
    if not vals:
        return []
    groups: dict[str, list[dict]] = {}
    for q in vals:
        for b in q.get("box_quality_by_score", []):
            groups.setdefault(f"score {b['bin']}", []).append(b)
        for size, b in q.get("box_quality_by_size", {}).items():
            groups.setdefault(f"size {size}", []).append(b)
    groups["all"] = [q["box_quality"] for q in vals]
    lines = ["", f"| matched pseudo boxes ({len(vals)} seeds pooled) | boxes | IoU teacher | "
             "IoU polished | improved |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, parts in groups.items():
        parts = [b for b in parts if b.get("boxes")]
        n = sum(b["boxes"] for b in parts)
        if not n:
            continue

        def pooled(key: str, parts: list[dict] = parts, n: int = n) -> float:
            return sum(b[key] * b["boxes"] for b in parts) / n

        before, after = pooled("mean_iou_before"), pooled("mean_iou_after")
        improved = pooled("improved_fraction")
        lines.append(f"| {name} | {n} | {before:.3f} | {after:.3f} | {improved:.0%} |")
    return lines


def keep_rule_lines(dataset: str, seeds: list[int], version: str) -> list[str]:
    """Per seed, what the keep rule and the regression check were fitted on and what they
    did (issue 26's checks): out-of-fold boxes per labeled image against the teacher's per
    unlabeled image, the rule and its source, the teacher's true positives it keeps, the
    regression check's choice and the matched pseudo boxes' IoU to truth."""
    lines = []
    for seed in seeds:
        fit = seed_figures(dataset, seed, version, "polisher_fit.json")
        quality = seed_figures(dataset, seed, version, "pseudo_quality.json")
        if fit is None or quality is None:
            continue
        rule, check = fit["keep_thresholds"], fit["regression_check"]
        fold = rule["density"]["fold_per_image"]
        teacher = quality["keep_rule"]["teacher_boxes"] / quality["images"]["evaluated"]
        kept = quality["keep_rule"]["kept_recall50"] / quality["keep_rule"]["teacher_recall50"]
        iou = quality["box_quality"]
        if "mean_iou_before" in check:
            checked = (f"{check['mean_iou_before']:.3f} -> {check['mean_iou_after']:.3f} on "
                       f"{check['pairs']} held-out pairs")  # fmt: skip
        else:  # too few held-out pairs to validate: the default was kept
            checked = f"not validated: {check['reason']}"
        if not lines:
            lines = ["", "| seed | fold boxes / labeled image | teacher boxes / unlabeled image "
                     "| keep rule (source; matched boxes fitted on) | teacher TPs kept "
                     "| regression check | matched pseudo boxes: IoU teacher -> polished |",
                     "|---:|---:|---:|---|---:|---|---|"]  # fmt: skip
        lines.append(
            f"| {seed} | {fold:.2f} | {teacher:.2f} ({teacher / fold:.2f}x) | cls_prob "
            f"{rule['cls_prob']:g}, teacher_score {rule['teacher_score']:g} "
            f"({rule['keep_rule_source']}; {rule['matched']}) | {kept:.0%} | {check['choice']} "
            f"({checked}) | {iou['mean_iou_before']:.3f} -> "
            f"{iou['mean_iou_after']:.3f} ({iou['boxes']} boxes) |"
        )
    return lines


CONTROLS = ("teacher", "labeled-only", "oracle")
DATASETS = ["demo", "demo-bench", "bccd10", "bccd5", "deeppcb2", "deeppcb5", "deeppcb10"]
MIN_TEST_IMAGES = 300  # rule (c)


def _mean_ap(results: dict[int, dict], seeds: list[int], row: str) -> float | None:
    values = [results[s][row]["AP"] for s in seeds if row in results[s]]
    return statistics.mean(values) if values else None


def validity_lines(dataset: str, results: dict[int, dict], seeds: list[int]) -> list[str]:
    """The three rules of a bench that can show what pseudo labels are worth (3-seed means
    where there are 3): (a) labeled-only <= teacher + 1 AP, (b) oracle >= labeled-only + 8
    AP, (c) >= 300 test images."""
    teacher, labeled, oracle = (_mean_ap(results, seeds, r) for r in CONTROLS)
    images = test_images(dataset)
    rules = []
    if teacher is not None and labeled is not None:
        gain = 100 * (labeled - teacher)
        rules.append(f"(a) labeled-only - teacher = {gain:+.1f} AP (<= +1: "
                     f"{'holds' if gain <= 1 else 'FAILS'})")  # fmt: skip
    if labeled is not None and oracle is not None:
        room = 100 * (oracle - labeled)
        rules.append(f"(b) oracle - labeled-only = {room:+.1f} AP (>= +8: "
                     f"{'holds' if room >= 8 else 'FAILS'})")  # fmt: skip
    if images is not None:
        rules.append(f"(c) {images} test images (>= {MIN_TEST_IMAGES}: "
                     f"{'holds' if images >= MIN_TEST_IMAGES else 'FAILS'})")  # fmt: skip
    return ["", "bench validity: " + "; ".join(rules)] if rules else []


def test_images(dataset: str) -> int | None:
    """How many images the dataset's test split has (None: not made yet)."""
    if dataset.startswith("demo"):
        return DEMO_DATA.test_images
    path = dataset_test_ann(dataset)
    return len(json.loads(path.read_text())["images"]) if path.is_file() else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def table(dataset: str, seeds: list[int], rows: list[str], version: str) -> str:
    """Markdown: one line per row, mean ± std over the finished seeds, and what is missing."""
    results = {s: row_results(dataset, s, version) for s in seeds}
    lines = [
        "| row | seeds | AP | AP50 | AP - raw | gap closed |",
        "|---|---:|---|---|---|---:|",
    ]
    missing = []
    for row in rows:
        done = [s for s in seeds if row in results[s]]
        missing += [f"{row}@seed{s}" for s in seeds if s not in done]
        ap = [results[s][row]["AP"] for s in done]
        ap50 = [results[s][row]["AP50"] for s in done]
        diff = [
            results[s][row]["AP"] - results[s]["raw"]["AP"] for s in done if "raw" in results[s]
        ]
        gaps = [
            (results[s][row]["AP"] - results[s]["labeled-only"]["AP"])
            / (results[s]["oracle"]["AP"] - results[s]["labeled-only"]["AP"])
            for s in done
            if {"labeled-only", "oracle"} <= set(results[s])
            and results[s]["oracle"]["AP"] != results[s]["labeled-only"]["AP"]
        ]
        gap = f"{statistics.mean(gaps):.0%}" if gaps and row not in CONTROLS else "–"
        per_seed = ", ".join(f"{a:.3f}" for a in ap)
        lines.append(
            f"| {row} | {len(done)} | {mean_std(ap)} ({per_seed}) | {mean_std(ap50)} | "
            f"{mean_std(diff) if row != 'raw' else '–'} | {gap} |"
        )
    lines += validity_lines(dataset, results, seeds)
    lines += _quality_lines(results, seeds)
    lines += _box_quality_lines(results, seeds)
    lines += keep_rule_lines(dataset, seeds, version)
    lines += online_lines(dataset, seeds, version)
    if missing:
        lines.append(f"\nmissing: {', '.join(missing)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo", choices=DATASETS)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"Subset of {', '.join(ROWS)}; and {PSEUDO}: the pseudo labels and their "
        "quality without a student. A row runs only the stages it reads from.",
    )
    parser.add_argument("--jobs", type=int, default=2, help="Seeds run in parallel.")
    parser.add_argument("--table-only", action="store_true", help="Print the cached table.")
    parser.add_argument(
        "--record",
        action="store_true",
        help="Copy the finished figures into benchmarks/results (for git).",
    )
    parser.add_argument("--version", default=None, help="Code version to read (default: now).")
    parser.add_argument(
        "--stage-jobs",
        type=int,
        default=1,
        help="Stages of one seed run in parallel (2: one seed on both cores; "
        "the chain before the students then runs with 2 threads).",
    )
    parser.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - {*ROWS, PSEUDO}
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    version = args.version or code_version()
    if args.one_seed is not None:
        run_seed(args.dataset, args.one_seed, set(rows), version, args.stage_jobs)
        return
    if args.record:
        for seed in seeds:
            for path in record_seed(args.dataset, seed, version):
                print(f"recorded {path}")
    elif not args.table_only:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log_dir = OUT / args.dataset / version / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)

        seeds_running: list[subprocess.Popen] = []

        def stop(signum: int, frame: object) -> None:
            """Stopped (SIGTERM, Ctrl-C): stop each seed's process group, its stages too
            (a killed runner would otherwise leave its stages computing)."""
            for proc in seeds_running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

        def one(seed: int) -> int:
            began = time.perf_counter()
            with open(log_dir / f"seed{seed}.log", "a", encoding="utf-8") as log:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--dataset", args.dataset, "--rows", args.rows,
                     "--one-seed", str(seed), "--version", version,
                     "--stage-jobs", str(args.stage_jobs)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                    start_new_session=True,
                )  # fmt: skip
                seeds_running.append(proc)
                code = proc.wait()
            took = (time.perf_counter() - began) / 60
            print(f"seed {seed}: exit {code} after {took:.1f} min (log {log_dir}/seed{seed}.log)")
            return code

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, seeds))
    print(f"\n{args.dataset}, seeds {args.seeds}, code version {version}\n")
    print(table(args.dataset, seeds, [r for r in rows if r != PSEUDO], version))


if __name__ == "__main__":
    main()
