"""SSOD split: determinism by (fold, seed), disjointness, exact counts, files and CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco
from dpl_tools.data.split import labeled_count_for, split_coco, write_split
from dpl_tools.errors import DplError


def _ids(part: dict) -> list[int]:
    return [im["id"] for im in part["images"]]


def test_labeled_count_rounding():
    assert labeled_count_for(24, 25) == 6
    assert labeled_count_for(24, 1) == 1  # at least one labeled image
    assert labeled_count_for(205, 10) == 21  # 20.5 rounds half up
    assert labeled_count_for(24, 100) == 24
    for bad in (0, -5, 101):
        with pytest.raises(DplError, match="--percent"):
            labeled_count_for(24, bad)


def test_split_is_deterministic_disjoint_and_complete(synth_dataset):
    coco = load_coco(synth_dataset)
    a = split_coco(coco, percent=25, fold=1, seed=0)
    assert _ids(a.labeled) == _ids(split_coco(coco, percent=25, fold=1, seed=0).labeled)
    assert len(a.labeled["images"]) == 6 and len(a.unlabeled["images"]) == 18
    assert _ids(a.labeled) != _ids(split_coco(coco, percent=25, fold=2, seed=0).labeled)
    assert _ids(a.labeled) != _ids(split_coco(coco, percent=25, fold=1, seed=1).labeled)
    labeled, unlabeled = set(_ids(a.labeled)), set(_ids(a.unlabeled))
    assert not labeled & unlabeled and labeled | unlabeled == {im["id"] for im in coco.images}
    assert _ids(a.unlabeled_gt) == _ids(a.unlabeled)
    assert a.unlabeled["annotations"] == []
    assert {x["image_id"] for x in a.labeled["annotations"]} <= labeled
    assert {x["image_id"] for x in a.unlabeled_gt["annotations"]} <= unlabeled
    assert len(a.labeled["annotations"]) + len(a.unlabeled_gt["annotations"]) == len(
        coco.annotations
    )
    assert a.labeled["categories"] == coco.categories == a.unlabeled["categories"]
    assert a.labeled["dpl_split"]["part"] == "labeled" and a.info["fold"] == 1
    assert len(split_coco(coco, labeled_count=5, fold=3).labeled["images"]) == 5
    with pytest.raises(DplError, match="--labeled-count must be in 1..24"):
        split_coco(coco, labeled_count=25)


def test_written_files_reload_as_valid_coco(synth_dataset, tmp_path):
    split = split_coco(load_coco(synth_dataset), percent=50, fold=1, seed=0)
    paths = write_split(split, tmp_path / "split")
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "labeled.json",
        "unlabeled.json",
        "unlabeled_gt.json",
    ]
    images = synth_dataset.parent / "images"
    labeled = load_coco(paths["labeled"], images)
    unlabeled = load_coco(paths["unlabeled"], images)
    gt = load_coco(paths["unlabeled_gt"], images)
    assert labeled.report.clean and unlabeled.report.clean and gt.report.clean
    assert len(labeled.images) == len(unlabeled.images) == 12
    assert len(labeled.annotations) == len(split.labeled["annotations"]) > 0


def test_cli_split_writes_into_run_dir(synth_dataset, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    args = [
        "split",
        str(synth_dataset),
        "--percent",
        "10",
        "--fold",
        "2",
        "--run-dir",
        str(run_dir),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    labeled = json.loads((run_dir / "split" / "labeled.json").read_text())
    unlabeled = json.loads((run_dir / "split" / "unlabeled.json").read_text())
    assert len(labeled["images"]) == 2 and len(unlabeled["images"]) == 22  # 2.4 -> 2
    assert unlabeled["annotations"] == []
    again = tmp_path / "again"
    result = runner.invoke(app, args[:-2] + ["--out-dir", str(again)])
    assert result.exit_code == 0, result.output
    assert json.loads((again / "labeled.json").read_text()) == labeled
    result = runner.invoke(app, ["split", str(synth_dataset), "-p", "5", "--labeled-count", "3"])
    assert isinstance(result.exception, DplError) and "not both" in str(result.exception)


def test_split_replaces_only_an_earlier_splits_files(synth_dataset, tmp_path):
    coco = load_coco(synth_dataset)
    out = tmp_path / "split"
    out.mkdir()
    mine = out / "unlabeled.json"
    mine.write_text('{"mine": 1}')
    (out / "notes.txt").write_text("keep")
    with pytest.raises(DplError, match="unlabeled.json: exists and was not written by dpl split"):
        write_split(split_coco(coco, percent=50, fold=1, seed=0), out)
    assert mine.read_text() == '{"mine": 1}' and not (out / "labeled.json").exists()
    mine.unlink()
    write_split(split_coco(coco, percent=50, fold=1, seed=0), out)
    # a new split replaces the earlier split's files; other files stay
    paths = write_split(split_coco(coco, percent=25, fold=1, seed=0), out)
    assert json.loads(paths["labeled"].read_text())["dpl_split"]["percent"] == 25
    assert (out / "notes.txt").read_text() == "keep"
