"""dpl run: the whole pipeline from one config, skipping stages whose output is current."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.pipeline import Stage, is_current, run_stages

TINY = {
    "model": {
        "arch": "mobilenet_v2_fpn",
        "backbone_weights": "none",
        "min_size": 64,
        "max_size": 80,
        "detector_kwargs": {
            "box_batch_size_per_image": 32,
            "rpn_pre_nms_top_n_train": 100,
            "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 100,
            "rpn_post_nms_top_n_test": 50,
        },
    },
    "teacher": {"iters": 2, "batch_size": 2, "workers": 0, "checkpoint_every": 0},
    "polisher": {
        "rounds": 1,
        "reg_copies": 4,
        "cls_copies": [2, 2],
        "iters": 2,
        "batch_size": 2,
        "workers": 0,
        "max_proposals": 50,
        "val_fraction": 0.0,
    },
    # a 2-iteration teacher finds no box at polish's 0.5 threshold: let the student run
    "student": {
        "iters": 2,
        "batch_size": 2,
        "workers": 0,
        "checkpoint_every": 0,
        "allow_empty": True,
    },
}


def _dpl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def pipeline_run(module_dir) -> tuple[Path, subprocess.CompletedProcess]:
    root = module_dir("pipeline")
    make_synthetic_dataset(root / "train", num_images=10, image_size=(80, 64), seed=3)
    make_synthetic_dataset(root / "test", num_images=3, image_size=(80, 64), seed=4)
    config = {
        "data": {
            "ann": "train/annotations.json",
            "images": "train/images",
            "percent": 40,
            "test_ann": "test/annotations.json",
            "test_images": "test/images",
        },
        "run": {"run_dir": "run"},
        **TINY,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    # two stages at a time (each as its printed command, in a subprocess): the outputs
    # must be those of the commands typed one by one (test_printed_commands_...)
    result = _dpl("run", "run.yaml", "--device", "cpu", "--jobs", "2", cwd=root)
    return root, result


def test_run_produces_every_stage_artifact(pipeline_run) -> None:
    root, result = pipeline_run
    assert result.returncode == 0, result.stderr[-2000:]
    run = root / "run"
    for name in ("teacher.pt", "noise.parquet", "polisher.pt", "labels.parquet", "student.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "split" / "labeled.json").read_text())["images"]
    _, spec = load_detector(run / "student.pt")
    assert spec.kind == "student"
    labels = pq.read_table(run / "labels.parquet")
    assert set(labels.column("file_name").to_pylist()) == {
        im["file_name"]
        for im in json.loads((run / "split" / "unlabeled.json").read_text())["images"]
    }
    for name in ("teacher", "student"):
        metrics = json.loads((run / "eval" / f"{name}.json").read_text())
        assert 0.0 <= metrics["AP"] <= 1.0 or metrics["AP"] == -1
    quality = json.loads((run / "pseudo_quality.json").read_text())
    assert "box_quality" in quality
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"]["iters"] == 2
    # each stage prints what its command prints, logged under logs/; progress lines are
    # shown as they come, with the stage's name
    for title in ("split of", "teacher run/teacher.pt", "synth-noise -> run/noise.parquet",
                  "polisher run/polisher.pt", "student run/student.pt", "AP"):  # fmt: skip
        assert title in result.stdout, title
    assert "train-teacher: train-teacher 2/2 (100%)" in result.stdout
    assert "teacher run/teacher.pt" in (run / "logs" / "train-teacher.log").read_text()


def test_python_run_reads_the_finished_run(pipeline_run, monkeypatch) -> None:
    """api.run on a finished run: every stage current, nothing runs, the figures are read."""
    from dpl_tools import api

    root, result = pipeline_run
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.chdir(root)
    done = api.run("run.yaml", device="cpu")  # as `dpl run run.yaml` was given, in root
    assert done.ran == [] and Path(done.run_dir).resolve() == (root / "run").resolve()
    assert {"split", "train-teacher", "train-student"} <= set(done.stages)
    saved = json.loads((root / "run" / "eval" / "student.json").read_text())
    assert done.evaluations["student"]["AP"] == saved["AP"]


def test_printed_commands_remake_the_stage_outputs(pipeline_run, tmp_path, monkeypatch) -> None:
    """A run calls the API; the command line it prints for a stage, typed by hand (here:
    into another output), makes the same file: same weights, labels and figures."""
    import torch

    from dpl_tools.pipeline import load_run_config, pipeline_stages

    root, result = pipeline_run
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.chdir(root)
    data, run_dir, config = load_run_config("run.yaml")
    stages = {s.name: s for s in pipeline_stages(data, run_dir, str(config), device="cpu")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run had (OMP_NUM_THREADS=1): CPU sums depend on it
    try:
        _retype_stages(stages, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _retype_stages(stages: dict, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    import torch
    from typer.testing import CliRunner

    from dpl_tools.cli.cli import app

    for name in ("train-teacher", "polish", "train-student", "evaluate-teacher", "evaluate-pseudo"):
        stage = stages[name]
        argv = stage.argv
        flag = "--json" if "--json" in argv else "--out"
        again = tmp_path / f"{name}{stage.output.suffix}"
        argv[argv.index(flag) + 1] = str(again)
        typed = CliRunner().invoke(app, argv)
        assert typed.exit_code == 0, (name, typed.output)
        if stage.output.suffix == ".pt":
            a, b = load_detector(stage.output)[0], load_detector(again)[0]
            same = all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
            assert same, name
        elif stage.output.suffix == ".parquet":
            assert pq.read_table(stage.output).equals(pq.read_table(again)), name
        else:
            made, typed_figures = (json.loads(p.read_text()) for p in (stage.output, again))
            key = "AP" if "AP" in made else "box_quality"
            assert made[key] == typed_figures[key], name


def test_rerun_skips_finished_stages_and_reruns_changed_ones(pipeline_run) -> None:
    root, first = pipeline_run
    assert first.returncode == 0
    again = _dpl("run", "run.yaml", "--device", "cpu", cwd=root)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 stage(s) ran" in again.stdout
    teacher_mtime = (root / "run" / "teacher.pt").stat().st_mtime

    (root / "run" / "polisher.pt").unlink()  # a lost artifact is rebuilt; its inputs are not
    third = _dpl("run", "run.yaml", "--device", "cpu", cwd=root)
    assert third.returncode == 0, third.stderr[-2000:]
    for stage in ("split", "train-teacher", "synth-noise", "evaluate-teacher"):
        assert f"- {stage}: up to date" in third.stdout
    assert "> train-polisher:" in third.stdout
    assert "polisher run/polisher.pt" in third.stdout  # one job: in this process, same table
    assert (root / "run" / "polisher.pt").is_file()
    assert (root / "run" / "teacher.pt").stat().st_mtime == teacher_mtime


def test_stage_runner_skips_only_current_outputs(tmp_path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("a")
    out = tmp_path / "out.txt"
    calls: list[list[str]] = []

    def invoke(stage: Stage, resume: bool) -> None:
        calls.append(stage.command_line(resume))
        out.write_text(src.read_text())

    stage = Stage("copy", "copy", {}, out, [src])
    assert run_stages([stage], tmp_path, invoke) == ["copy"]
    assert is_current(tmp_path, stage)
    assert run_stages([stage], tmp_path, invoke) == []
    src.write_text("b")  # input content changed
    assert not is_current(tmp_path, stage)
    assert run_stages([stage], tmp_path, invoke) == ["copy"]
    out.unlink()  # output gone
    assert run_stages([stage], tmp_path, invoke) == ["copy"]
    assert len(calls) == 3


def test_an_interrupted_training_stage_resumes(tmp_path) -> None:
    """A training stage killed after a periodic checkpoint continues with --resume when
    rerun with the same command and inputs; changed inputs or a finished output start over."""
    src = tmp_path / "labeled.json"
    src.write_text("a")
    out = tmp_path / "teacher.pt"
    calls: list[list[str]] = []

    def killed(stage: Stage, resume: bool) -> None:
        calls.append(stage.command_line(resume))
        (tmp_path / "teacher.last.pt").write_text("iteration 100")
        raise KeyboardInterrupt  # the session ends mid-training

    def finishes(stage: Stage, resume: bool) -> None:
        calls.append(stage.command_line(resume))
        out.write_text("trained")

    stage = Stage("train-teacher", "train_teacher", {"ann": src, "out": out}, out, [src])
    with pytest.raises(KeyboardInterrupt):
        run_stages([stage], tmp_path, killed)
    events: list[str] = []
    assert run_stages([stage], tmp_path, finishes, lambda e, s: events.append(e))
    assert calls[0][-1] != "--resume" and calls[1][-1] == "--resume" and events == ["resume"]
    assert is_current(tmp_path, stage)  # the stamp is the stage's own, without --resume

    out.unlink()  # output gone, checkpoint still there, same inputs: resumes again
    run_stages([stage], tmp_path, finishes)
    assert calls[-1][-1] == "--resume"
    out.unlink()
    src.write_text("b")  # other inputs: that checkpoint is not this run's
    run_stages([stage], tmp_path, finishes)
    assert calls[-1][-1] != "--resume"
    other = Stage("copy", "copy", {"out": tmp_path / "c"}, tmp_path / "c", [src])
    (tmp_path / "c.last.pt").write_text("x")  # not a training command: never resumed
    run_stages([other], tmp_path, lambda s, r: (calls.append(s.command_line(r)), s.output.touch()))
    assert calls[-1][-1] != "--resume"


def test_stage_command_line_is_derived_from_its_declaration(tmp_path) -> None:
    stage = Stage(
        "x", "polish", {"images": tmp_path / "a", "overwrite": True, "config": None,
                        "keep_rule": "paper"}, tmp_path / "out",
    )  # fmt: skip
    argv = ["polish", "--images", str(tmp_path / "a"), "--overwrite", "--keep-rule", "paper"]
    assert stage.argv == argv and stage.command_line(True) == [*argv, "--resume"]
    split = Stage("s", "split", {"ann": "a.json", "seed": 1, "out_dir": "o"}, tmp_path / "o")
    assert split.argv == ["split", "a.json", "--seed", "1", "--out-dir", "o"]
    pseudo = Stage("e", "evaluate_pseudo", {"pseudo": "l.parquet", "json_out": "q.json"}, tmp_path)
    assert pseudo.argv == ["evaluate", "--pseudo", "l.parquet", "--json", "q.json"]


def test_demo_raw_student_reruns_when_the_preset_changes(tmp_path) -> None:
    """The raw-pseudo-label student is declared like the polished one: config is an input."""
    from dpl_tools.demo import demo_stages
    from dpl_tools.pipeline import PipelineData

    config = tmp_path / "preset.yaml"
    config.write_text(yaml.safe_dump(TINY))
    data = PipelineData(tmp_path / "a.json", tmp_path / "img", test_ann=tmp_path / "t.json",
                        test_images=tmp_path / "img")  # fmt: skip
    stages = {s.name: s for s in demo_stages(data, tmp_path, "cpu", str(config))}
    raw, polished = stages["train-student-raw"], stages["train-student"]
    assert config in raw.inputs and config in polished.inputs
    assert raw.argv[raw.argv.index("--config") + 1] == str(config)
    # the two students differ only in the pseudo-label view and the output
    assert raw.params["pseudo_view"] == "raw" and polished.params["pseudo_view"] is None
    same = {k: v for k, v in raw.params.items() if k not in ("pseudo_view", "out")}
    assert same == {k: v for k, v in polished.params.items() if k in same}
    # after the raw student ran, editing the preset makes it stale
    raw.output.write_text("model")
    run_stages([raw], tmp_path, lambda stage, resume: None)
    assert is_current(tmp_path, raw)
    config.write_text(yaml.safe_dump({**TINY, "student": {**TINY["student"], "iters": 3}}))
    assert not is_current(tmp_path, raw)


def test_demo_labeled_only_control_sees_as_many_images_per_step(tmp_path) -> None:
    """The control trains on labeled images only, with the full student's images per step
    (its labeled batch plus its pseudo-labeled images), and waits for no pseudo label."""
    from dpl_tools.demo import demo_stages
    from dpl_tools.pipeline import PipelineData

    config = tmp_path / "preset.yaml"
    student = {**TINY["student"], "batch_size": 3, "unlabeled_ratio": 2.0}
    config.write_text(yaml.safe_dump({**TINY, "student": student}))
    data = PipelineData(tmp_path / "a.json", tmp_path / "img", test_ann=tmp_path / "t.json",
                        test_images=tmp_path / "img")  # fmt: skip
    stages = {s.name: s for s in demo_stages(data, tmp_path, "cpu", str(config))}
    control, full = stages["train-student-labeled-only"], stages["train-student"]
    assert control.params["unlabeled_ratio"] == 0 and control.params["batch_size"] == 9
    assert "batch_size" not in full.params and control.params["pseudo"] is None
    assert tmp_path / "labels.parquet" not in control.inputs


def test_online_config_gives_the_student_its_polisher_and_unlabeled_images(tmp_path) -> None:
    from dpl_tools.pipeline import PipelineData, pipeline_stages

    data = PipelineData(tmp_path / "a.json", tmp_path / "img")
    online = tmp_path / "online.yaml"
    online.write_text("student:\n  online: true\n")
    by_name = {s.name: s for s in pipeline_stages(data, tmp_path / "run", str(online))}
    argv = by_name["train-student"].argv
    assert argv[argv.index("--polisher") + 1] == str(tmp_path / "run" / "polisher.pt")
    assert argv[argv.index("--unlabeled") + 1] == str(tmp_path / "run/split/unlabeled.json")
    offline = {s.name: s for s in pipeline_stages(data, tmp_path / "run", None)}
    assert "--polisher" not in offline["train-student"].argv


@pytest.mark.parametrize("noise_model", ["crossfit", "gaussian"])
def test_each_round_is_taught_by_the_previous_student(tmp_path, noise_model) -> None:
    """dpl run --rounds 3: round k's teacher is round k-1's student; its polisher is trained
    anew on that teacher. Crossfit pairs (fold teachers of the teacher's recipe, which rounds
    do not change) are made once, in round 1; Gaussian pairs are drawn anew each round."""
    from dpl_tools.pipeline import PipelineData, pipeline_stages

    config = tmp_path / "c.yaml"
    config.write_text(f"polisher:\n  noise_model: {noise_model}\n")
    run = tmp_path / "run"
    data = PipelineData(tmp_path / "a.json", tmp_path / "img", test_ann=tmp_path / "t.json")
    stages = {s.name: s for s in pipeline_stages(data, run, str(config), rounds=3)}
    for k, teacher in ((2, run / "student.pt"), (3, run / "round-2" / "student.pt")):
        rd = run / f"round-{k}"
        for name in (f"train-polisher-round{k}", f"polish-round{k}", f"train-student-round{k}"):
            assert stages[name].params["teacher"] == teacher, name
        assert stages[f"train-student-round{k}"].params["pseudo"] == rd / "labels.parquet"
        assert stages[f"evaluate-student-round{k}"].inputs[0] == rd / "student.pt"
        noise = stages[f"train-polisher-round{k}"].params["noise"]
        if noise_model == "crossfit":
            assert f"synth-noise-round{k}" not in stages and noise == run / "noise.parquet"
        else:
            assert noise == rd / "noise.parquet"
            assert stages[f"synth-noise-round{k}"].params["seed"] == k - 1
    assert (noise_model == "crossfit") == ("teacher" in stages["synth-noise"].params)


def test_run_with_two_rounds_teaches_round_two_with_round_one_student(pipeline_run) -> None:
    """dpl run --rounds 2 end to end: round 2's polisher, pseudo labels and student come
    from round 1's student as the teacher, and both students are evaluated."""
    from dpl_tools.io import sha256_file
    from dpl_tools.models.polisher import read_polisher_checkpoint

    root, _ = pipeline_run
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["run"]["run_dir"] = "rounds"
    (root / "rounds.yaml").write_text(yaml.safe_dump(config))
    result = _dpl("run", "rounds.yaml", "--rounds", "2", "--device", "cpu", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    run, second = root / "rounds", root / "rounds" / "round-2"
    for name in ("noise.parquet", "polisher.pt", "labels.parquet", "student.pt"):
        assert (second / name).is_file(), name
    polisher = read_polisher_checkpoint(second / "polisher.pt")
    assert polisher["teacher_sha256"] == sha256_file(run / "student.pt")
    assert read_polisher_checkpoint(run / "polisher.pt")["teacher_sha256"] == sha256_file(
        run / "teacher.pt"
    )
    for name in ("teacher", "student", "student-round2"):
        assert "AP" in json.loads((run / "eval" / f"{name}.json").read_text()), name
    assert "pseudo_quality.json" in {p.name for p in second.iterdir()}
