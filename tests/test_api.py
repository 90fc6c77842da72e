"""The Python API: each stage callable from Python returns what its command prints and
writes; keyword overrides are checked like a config file (same ranges, did-you-mean)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpl_tools import api
from dpl_tools.cli.cli import app
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}  # fmt: skip
TINY = {"model": {"min_size": 64, "max_size": 96, "detector_kwargs": FAST}}
TEACHER = {"batch_size": 2, "workers": 0, "warmup_iters": 1, "checkpoint_every": 0}


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_teacher_and_evaluate_equal_their_commands(synth_dataset, tmp_path) -> None:
    images = synth_dataset.parent / "images"
    trained = api.train_teacher(
        synth_dataset, images, tmp_path / "api.pt", TINY, device="cpu", iters=2, **TEACHER
    )
    assert trained.checkpoint.is_file() and trained.result.iterations == 2
    assert trained.config["teacher"]["iters"] == 2 and trained.config["model"]["min_size"] == 64

    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps(TINY))
    cli = [
        "train-teacher", "--ann", str(synth_dataset), "--images", str(images),
        "--out", str(tmp_path / "cli.pt"), "--config", str(preset), "--iters", "2",
        "--batch-size", "2", "--workers", "0", "--device", "cpu",
        "--set", "teacher.warmup_iters=1", "--checkpoint-every", "0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 0, result.output
    assert _same_weights(tmp_path / "api.pt", tmp_path / "cli.pt")

    metrics = api.evaluate(
        trained.checkpoint, synth_dataset, images, workers=0, device="cpu",
        json_out=tmp_path / "api.json",
    )  # fmt: skip
    assert metrics.summary["images"] == 24 and set(metrics.metrics) >= {"AP", "AP50"}
    assert metrics.written == [tmp_path / "api.json"]
    cli = [
        "evaluate", "--model", str(tmp_path / "cli.pt"), "--ann", str(synth_dataset),
        "--images", str(images), "--workers", "0", "--device", "cpu",
        "--json", str(tmp_path / "cli.json"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cli.json").read_text())
    for key, value in metrics.metrics.items():
        assert saved[key] == pytest.approx(value), key


def test_keyword_override_typo_is_a_did_you_mean() -> None:
    with pytest.raises(DplError, match=r"unknown setting teacher\.iter \(did you mean iters\?\)"):
        api.stage_config(None, "teacher", {"iter": 5})
    with pytest.raises(DplError, match="did you mean model"):
        api.stage_config(None, "teacher", {"modle": {"min_size": 64}})


def test_keyword_overrides_obey_the_config_files_ranges(tmp_path) -> None:
    """lr=-1 fails from Python, from a config file and from --set, each with the same rule."""
    errors = []
    with pytest.raises(DplError) as from_python:
        api.stage_config(None, "teacher", {"lr": -1})
    errors.append(str(from_python.value))
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  lr: -1\n")
    with pytest.raises(DplError) as from_file:
        api.stage_config(bad, "teacher")
    errors.append(str(from_file.value))
    with pytest.raises(DplError) as from_set:
        api.stage_config(None, "teacher", sets={"teacher": {"lr": -1}})
    errors.append(str(from_set.value))
    rules = {re.sub(r"^.*?teacher\.lr", "teacher.lr", e) for e in errors}
    assert len(rules) == 1 and "teacher.lr" in rules.pop()
    assert str(bad) in from_file.value.args[0]


def test_overrides_layer_over_a_preset_and_a_dict() -> None:
    cfg = api.stage_config("demo", "student", {"lr": 0.005, "model": {"min_size": 96}})
    assert cfg["student"]["lr"] == 0.005 and cfg["model"]["min_size"] == 96
    assert cfg["student"]["iters"] == cfg["teacher"]["iters"]  # null: as long as the teacher
    as_dict = api.stage_config(cfg, "student")
    assert as_dict == cfg


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API") :]
    return section[section.index("```python") + len("```python") : section.index("```\n", 10)]


def test_readme_example_runs(synth_dataset, tmp_path, monkeypatch, capsys) -> None:
    """The README's worked example, as written, on the synthetic set with a tiny config
    (the only line changed is the config's)."""
    import shutil

    code = _readme_example()
    assert 'cfg = "demo"' in code
    data = tmp_path / "data"
    shutil.copytree(synth_dataset.parent / "images", data / "train")
    shutil.copy(synth_dataset, data / "train.json")
    shutil.copytree(synth_dataset.parent / "images", data / "test")
    shutil.copy(synth_dataset, data / "test.json")
    fast = {"batch_size": 2, "workers": 0, "warmup_iters": 1, "checkpoint_every": 0}
    tiny = {
        **TINY, "teacher": {"iters": 2, **fast},
        "student": {"iters": 2, "allow_empty": True, **fast},
        "polisher": {"iters": 2, "noise_model": "gaussian", "rounds": 1, "batch_size": 2,
                     "workers": 0, "warmup_iters": 1, "checkpoint_every": 0},
        "polish": {"workers": 0},
    }  # fmt: skip
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('cfg = "demo"', f"cfg = {tiny!r}"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "classification pseudo labels" in out
    assert re.search(r"^teacher \d\.\d+", out, re.M) and re.search(r"^student \d\.\d+", out, re.M)
    for name in ("teacher.pt", "polisher.pt", "labels.parquet", "student.pt"):
        assert (tmp_path / "runs" / name).is_file(), name


def test_every_api_name_resolves_from_its_submodule() -> None:
    """Each name of ``dpl_tools.api`` (imported on first use) is its submodule's object."""
    import importlib

    for name in api.__all__:
        module = importlib.import_module(f"dpl_tools.api.{api._SUBMODULE[name]}")
        assert getattr(api, name) is getattr(module, name), name
