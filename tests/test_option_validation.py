"""Every numeric option of every command is checked at parse time: a bad value is a usage
error (exit status 2) in one line, before any data is read or model built; a config file
value obeys the same rule (a one-line error naming the file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.errors import DplError

REPO = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "200"}  # one message per line, however long

# Required arguments of each command (never read: parsing fails first).
REQUIRED = {
    "train-teacher": ["--ann", "a.json", "--images", "img"],
    "train-student": ["--images", "img"],
    "train-polisher": ["--images", "img"],
    "synth-noise": [],
    "polish": [],
    "export": ["--format", "coco"],
    "evaluate": ["--ann", "a.json"],
    "split": ["a.json"],
    "report": ["labels.parquet", "--images", "img"],
    "show": ["x.png", "--labels", "labels.parquet"],
    "run": ["run.yaml"],
    "demo": [],
    "audit": [],
}

# (command, flag, bad value, what the message says)
CASES = [
    ("train-teacher", "--iters", "0", "must be >= 1, got 0"),
    ("train-teacher", "--iters", "-5", "must be >= 1, got -5"),
    ("train-teacher", "--batch-size", "0", "must be >= 1, got 0"),
    ("train-teacher", "--batch-size", "-1", "must be >= 1, got -1"),
    ("train-teacher", "--lr", "-0.01", "must be > 0, got -0.01"),
    ("train-teacher", "--lr", "0", "must be > 0, got 0"),
    ("train-teacher", "--workers", "-1", "must be >= 0, got -1"),
    ("train-teacher", "--min-size", "0", "must be >= 1, got 0"),
    ("train-teacher", "--min-size", "-480", "must be >= 1, got -480"),
    ("train-teacher", "--max-size", "0", "must be >= 1, got 0"),
    ("train-teacher", "--checkpoint-every", "-1", "must be >= 0, got -1"),
    ("train-teacher", "--seed", "-1", "must be >= 0, got -1"),
    ("train-teacher", "--arch", "resnet50", "'resnet50' is not one of r50_fpn"),
    ("train-student", "--iters", "0", "must be >= 1, got 0"),
    ("train-student", "--batch-size", "0", "must be >= 1, got 0"),
    ("train-student", "--lr", "-1", "must be > 0, got -1"),
    ("train-student", "--workers", "-2", "must be >= 0, got -2"),
    ("train-student", "--unlabeled-ratio", "-0.5", "must be >= 0, got -0.5"),
    ("train-student", "--unlabeled-weight", "-1", "must be >= 0, got -1"),
    ("train-student", "--checkpoint-every", "-10", "must be >= 0, got -10"),
    ("train-student", "--pseudo-view", "rwa", "'rwa' is not one of polished, raw"),
    ("train-student", "--seed", "-1", "must be >= 0, got -1"),
    ("train-polisher", "--iters", "0", "must be >= 1, got 0"),
    ("train-polisher", "--batch-size", "0", "must be >= 1, got 0"),
    ("train-polisher", "--lr", "-0.1", "must be > 0, got -0.1"),
    ("train-polisher", "--reg-per-image", "0", "must be >= 1, got 0"),
    ("train-polisher", "--cls-per-image", "-1", "must be >= 1, got -1"),
    ("train-polisher", "--max-proposals", "-1", "must be >= 0, got -1"),
    ("train-polisher", "--ema-momentum", "1.5", "must be in [0, 1), got 1.5"),
    ("train-polisher", "--val-fraction", "-0.1", "must be in [0, 1], got -0.1"),
    ("train-polisher", "--workers", "-1", "must be >= 0, got -1"),
    ("train-polisher", "--checkpoint-every", "-1", "must be >= 0, got -1"),
    ("train-polisher", "--seed", "-1", "must be >= 0, got -1"),
    ("synth-noise", "--rounds", "0", "must be >= 1, got 0"),
    ("synth-noise", "--reg-copies", "-1", "must be >= 0, got -1"),
    ("synth-noise", "--reg-scale", "-0.2", "must be >= 0, got -0.2"),
    ("synth-noise", "--fg-iou", "1.1", "must be in [0, 1], got 1.1"),
    ("synth-noise", "--empirical-inflate", "-1", "must be >= 0, got -1"),
    ("synth-noise", "--noise-model", "gauss", "'gauss' is not one of gaussian, empirical"),
    ("synth-noise", "--workers", "-1", "must be >= 0, got -1"),
    ("synth-noise", "--seed", "-1", "must be >= 0, got -1"),
    ("synth-noise", "--crossfit-folds", "1", "must be >= 2, got 1"),
    ("synth-noise", "--crossfit-iters-fraction", "0", "must be in (0, 1], got 0"),
    ("train-polisher", "--crossfit-folds", "1", "must be >= 2, got 1"),
    ("train-polisher", "--crossfit-iters-fraction", "1.5", "must be in (0, 1], got 1.5"),
    ("train-polisher", "--real-fraction", "1.5", "must be in [0, 1], got 1.5"),
    ("train-polisher", "--precision-target", "1.5", "must be in [0, 1], got 1.5"),
    ("polish", "--reg-steps", "-1", "must be in [0, 10], got -1"),
    ("train-polisher", "--keep-fit-min-matches", "-1", "must be >= 0, got -1"),
    ("export", "--min-score", "2", "must be in [0, 1], got 2"),
    ("export", "--top", "0", "must be >= 1, got 0"),
    ("audit", "--min-score", "1.5", "must be in [0, 1], got 1.5"),
    ("audit", "--top", "0", "must be >= 1, got 0"),
    ("train-student", "--ema-momentum", "1", "must be in [0, 1), got 1"),
    ("train-student", "--online-log-every", "0", "must be >= 1, got 0"),
    ("train-student", "--online-polisher-lr", "0", "must be > 0, got 0"),
    ("train-student", "--online-eval-images", "-1", "must be >= 0, got -1"),
    ("polish", "--score-thresh", "-0.1", "must be in [0, 1], got -0.1"),
    ("polish", "--nms-thresh", "1.5", "must be in [0, 1], got 1.5"),
    ("polish", "--max-dets", "0", "must be >= 1, got 0"),
    ("polish", "--initial-threshold", "2", "must be in [0, 1], got 2"),
    ("polish", "--cls-prob", "1.01", "must be in [0, 1], got 1.01"),
    ("polish", "--teacher-score", "-1", "must be in [0, 1], got -1"),
    ("polish", "--batch-size", "0", "must be >= 1, got 0"),
    ("polish", "--batch-size", "-1", "must be >= 1, got -1"),
    ("polish", "--workers", "-1", "must be >= 0, got -1"),
    ("evaluate", "--batch-size", "0", "must be >= 1, got 0"),
    ("evaluate", "--workers", "-1", "must be >= 0, got -1"),
    ("evaluate", "--score-thresh", "1.5", "must be in [0, 1], got 1.5"),
    ("evaluate", "--max-dets", "0", "must be >= 1, got 0"),
    ("split", "--percent", "0", "must be in (0, 100], got 0"),
    ("split", "--percent", "101", "must be in (0, 100], got 101"),
    ("split", "--labeled-count", "0", "must be >= 1, got 0"),
    ("split", "--fold", "-1", "must be >= 0, got -1"),
    ("split", "--seed", "-3", "must be >= 0, got -3"),
    ("report", "--max-images", "-1", "must be >= 0, got -1"),
    ("report", "--page-size", "0", "must be >= 1, got 0"),
    ("report", "--thumb-size", "8", "must be >= 16, got 8"),
    ("show", "--size", "-1", "must be >= 0, got -1"),
    ("show", "--count", "0", "must be >= 1, got 0"),
    ("show", "--seed", "-1", "must be >= 0, got -1"),
    ("train-student", "--mixup", "1.5", "must be in [0, 1], got 1.5"),
    ("train-student", "--mosaic", "-0.1", "must be in [0, 1], got -0.1"),
    ("train-student", "--augment", "medium", "'medium' is not one of weak, strong"),
    ("train-teacher", "--augment", "heavy", "'heavy' is not one of weak, strong"),
    ("run", "--rounds", "0", "must be >= 1, got 0"),
    ("run", "--jobs", "0", "must be >= 1, got 0"),
    ("demo", "--jobs", "0", "must be >= 1, got 0"),
    ("demo", "--seed", "-1", "must be >= 0, got -1"),
    ("demo", "--train-images", "1", "must be >= 2, got 1"),
    ("demo", "--test-images", "0", "must be >= 1, got 0"),
    ("demo", "--percent", "100", "must be in (0, 100), got 100"),
]


@pytest.mark.parametrize(("command", "flag", "value", "message"), CASES)
def test_bad_numeric_option_is_a_one_line_usage_error(tmp_path, command, flag, value, message):
    result = CliRunner().invoke(app, [command, *REQUIRED[command], flag, value], env=WIDE)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    line = next(line for line in result.output.splitlines() if "Invalid value" in line)
    assert f"Invalid value for '{flag}'" in line and message in line
    assert not any(tmp_path.iterdir())  # nothing written


def numeric_options() -> list[tuple[str, object]]:
    """(command, option) of every int / float option of the CLI."""
    group = typer.main.get_command(app)
    return [
        (name, param)
        for name, command in group.commands.items()
        for param in command.params
        if param.param_type_name == "option" and param.bare_type() in ("int", "float")
    ]


def test_every_numeric_option_is_checked():
    """No int/float option of any command goes unchecked (a new one must get a rule)."""
    options = numeric_options()
    assert len(options) > 50
    unchecked = [f"{name} {p.opts[0]}" for name, p in options if p.callback is None]
    assert unchecked == []
    missing = {(n, p.opts[0]) for n, p in options} - {(c, f) for c, f, _, _ in CASES}
    assert missing == set()  # the matrix covers every one


def test_good_values_still_parse(tmp_path):
    """Edge values inside the ranges are accepted (parsing reaches the command body)."""
    result = CliRunner().invoke(
        app,
        ["polish", "--cls-prob", "1", "--teacher-score", "0", "--workers", "0", "--max-dets",
         "1", "--batch-size", "1", "--run-dir", str(tmp_path)],
        env=WIDE,
    )  # fmt: skip
    assert result.exit_code == 1  # the body's own error: no --images
    assert "--images is required" in str(result.exception)


# A config file value obeys the flag's rule: refused before any data is read.
CONFIG_CASES = [
    ("train-teacher", {"teacher": {"iters": 0}}, "teacher.iters: must be >= 1, got 0"),
    ("train-teacher", {"model": {"max_size": 0}}, "model.max_size: must be >= 1, got 0"),
    ("train-student", {"student": {"batch_size": 0}}, "student.batch_size: must be >= 1"),
    ("train-student", {"student": {"lr": -1}}, "student.lr: must be > 0, got -1"),
    ("train-polisher", {"polisher": {"iters": -1}}, "polisher.iters: must be >= 1, got -1"),
    ("synth-noise", {"polisher": {"rounds": 0}}, "polisher.rounds: must be >= 1, got 0"),
    ("synth-noise", {"polisher": {"fg_iou": "high"}}, "polisher.fg_iou: expected a number"),
    ("polish", {"polish": {"cls_prob": 2}}, "polish.cls_prob: must be in [0, 1], got 2"),
    ("polish", {"polish": {"workers": -1}}, "polish.workers: must be >= 0, got -1"),
    ("demo", {"student": {"iters": 0}}, "student.iters: must be >= 1, got 0"),
    ("train-polisher", {"polisher": {"ema_momentum": 1}}, "polisher.ema_momentum: must be in"),
]


@pytest.mark.parametrize(("command", "raw", "message"), CONFIG_CASES)
def test_bad_config_value_is_refused_before_any_work(tmp_path, command, raw, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = [command, *REQUIRED[command], "--config", str(config)]
    result = CliRunner().invoke(app, argv, env=WIDE)
    assert isinstance(result.exception, DplError), result.output
    assert str(result.exception).startswith(f"{config}: {message}")
    assert "\n" not in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_set_of_a_key_below_a_value_is_a_usage_error():
    argv = ["train-teacher", "--ann", "a.json", "--images", "img", "--set", "teacher.iters=5",
            "--set", "teacher.iters.x=1"]  # fmt: skip
    result = CliRunner().invoke(app, argv, env=WIDE)
    assert result.exit_code == 2  # was an internal error (TypeError), exit 3
    assert "teacher.iters is set to a value already" in " ".join(result.output.split())


def test_list_flag_values_obey_the_table():
    result = CliRunner().invoke(app, ["synth-noise", "--cls-copies", "-5,50"], env=WIDE)
    assert isinstance(result.exception, DplError)
    assert (
        str(result.exception) == "command line: polisher.cls_copies: item 0: must be >= 0, got -5"
    )
    fraction = CliRunner().invoke(app, ["synth-noise", "--cls-copies", "2.5,50"], env=WIDE)
    assert "polisher.cls_copies: item 0: expected an integer, got 2.5" in str(fraction.exception)


def test_the_real_cli_exits_2_with_one_error_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("teacher:\n  iters: 0\n")
    dpl = [sys.executable, "-m", "dpl_tools.cli"]
    run = subprocess.run(
        [*dpl, "train-teacher", "--ann", "a.json", "--images", "img", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {config}: teacher.iters: must be >= 1, got 0"


def test_export_format_error_names_every_format(tmp_path):
    result = CliRunner().invoke(app, ["export", "--format", "voc", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, DplError)
    assert str(result.exception) == "--format 'voc': choose from coco, yolo, label-studio, cvat"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--export-only", "--cls-prob", "0.99"], "--cls-prob apply to polishing only"),
        (["--export-only", "--images", "imgs", "--max-dets", "5"],
         "--images, --max-dets apply to polishing only"),
        (["--save-conf", "--coco-out", "x.json"], "--save-conf applies to --yolo-out labels"),
    ],
)  # fmt: skip
def test_polish_options_that_would_be_ignored_are_refused(tmp_path, extra, message):
    argv = ["polish", "--out", str(tmp_path / "p.parquet"), "--coco-out", str(tmp_path / "c.json")]
    result = CliRunner().invoke(app, [*argv, *extra], env=WIDE)
    assert isinstance(result.exception, DplError), result.output
    assert message in str(result.exception)
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "coco", "--top", "5"], "--top: not used by --format coco"),
        (["--format", "label-studio", "--labeled", "gt.json", "--val", "v.json"],
         "--labeled, --val: not used by --format label-studio"),
    ],
)  # fmt: skip
def test_export_options_of_another_format_are_refused(tmp_path, extra, message):
    result = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "x"), *extra])
    assert isinstance(result.exception, DplError), result.output
    assert str(result.exception) == message


def test_evaluate_pseudo_refuses_the_options_of_a_model(tmp_path):
    argv = ["evaluate", "--pseudo", str(tmp_path / "p.parquet"), "--ann",
            str(tmp_path / "a.json"), "--model", str(tmp_path / "m.pt"), "--predictions",
            str(tmp_path / "pr.json")]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, DplError), result.output
    message = "--model, --predictions: for evaluating a model, not with --pseudo"
    assert str(result.exception) == message
    assert sorted(tmp_path.iterdir()) == []
