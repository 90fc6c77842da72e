"""The multi-seed benchmark runner (benchmarks/student_seeds.py): which stages a row needs,
and the table it prints from recorded figures (mean ± std, gap closed, bench validity).
No stage runs here: the stage graph is declared from a stand-in dataset, and the table is
read from figures written the way ``--record`` writes them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dpl_tools.pipeline import PipelineData

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    """benchmarks/student_seeds.py as a module, its run and record folders under tmp_path."""
    spec = importlib.util.spec_from_file_location(
        "student_seeds", ROOT / "benchmarks/student_seeds.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "student_seeds", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    monkeypatch.setattr(module, "RECORD", tmp_path / "record")

    def stand_in_data(dataset: str, seed: int, run_dir: Path):
        data = PipelineData(ann=tmp_path / "train.json", images=tmp_path / "images",
                            percent=2.0, seed=seed, test_ann=tmp_path / "test.json",
                            test_images=tmp_path / "images")  # fmt: skip
        return data, str(ROOT / "benchmarks/configs/demo_bench.yaml")

    monkeypatch.setattr(module, "dataset_data", stand_in_data)
    return module


def stage_names(runner, rows: set[str], tmp_path: Path) -> set[str]:
    stages = runner.seed_stages("demo-bench", 0, tmp_path / "run")
    return {stage.name for stage in runner.needed_stages(stages, rows)}


def test_controls_from_imagenet_need_no_teacher(runner, tmp_path):
    """The bench's student starts from ImageNet: its controls read only the split."""
    names = stage_names(runner, {"labeled-only", "oracle"}, tmp_path)
    assert names == {
        "split",
        "train-student-labeled-only",
        "evaluate-student-labeled-only",
        "train-student-oracle",
        "evaluate-student-oracle",
    }


def test_pseudo_label_rows_wait_for_their_inputs(runner, tmp_path):
    """raw needs the teacher and the polished labels' file (it reads their raw view);
    perfect only the truth's pseudo labels."""
    raw = stage_names(runner, {"raw"}, tmp_path)
    assert {"split", "train-teacher", "polish", "train-student-raw"} <= raw
    assert "train-student" not in raw  # the full method's student is a row of its own
    # the bench's student starts from ImageNet: perfect reads the split's truth, no teacher
    perfect = stage_names(runner, {"perfect"}, tmp_path)
    assert perfect == {"split", "perfect-labels", "train-student-perfect",
                       "evaluate-student-perfect"}  # fmt: skip


def record(runner, seed: int, row_files: dict[str, float]) -> None:
    """Write one seed's test metrics as ``--record`` keeps them."""
    folder = runner.RECORD / "demo-bench" / "v" / f"seed{seed}" / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    for name, ap in row_files.items():
        (folder / f"{name}.json").write_text(json.dumps({"AP": ap, "AP50": ap + 0.2}))


def test_table_means_gap_closed_and_validity(runner):
    """Mean ± std over the recorded seeds, gap closed against the matched control, the
    three validity rules, and what is still missing."""
    aps = {  # seed -> teacher, labeled-only, raw, full, oracle
        0: (0.60, 0.605, 0.63, 0.66, 0.70),
        1: (0.62, 0.625, 0.64, 0.68, 0.72),
    }
    for seed, (teacher, labeled, raw, full, oracle) in aps.items():
        record(runner, seed, {"teacher": teacher, "student-labeled-only": labeled,
                              "student-raw": raw, "student": full,
                              "student-oracle": oracle})  # fmt: skip
    record(runner, 2, {"teacher": 0.61})
    text = runner.table("demo-bench", [0, 1, 2], ["teacher", "labeled-only", "raw", "full",
                                                  "oracle"], "v")  # fmt: skip
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if "|" in line}
    full = lines["full"]
    assert "| 2 | 0.670 ± 0.014 (0.660, 0.680)" in full
    # gap closed per seed: (0.66 - 0.605) / (0.70 - 0.605) = 57.9%, (0.68 - 0.625) / 0.095
    assert full.rstrip(" |").endswith("58%")
    assert "| 0.035 ± 0.007 |" in full  # full - raw
    assert "| teacher | 3 |" in lines["teacher"]
    validity = next(line for line in text.splitlines() if line.startswith("bench validity"))
    # teacher mean over 3 seeds (0.61) against labeled-only over 2 (0.615): +0.5 AP
    assert "(a) labeled-only - teacher = +0.5 AP (<= +1: holds)" in validity
    assert "(b) oracle - labeled-only = +9.5 AP (>= +8: holds)" in validity
    assert "(c) 300 test images (>= 300: holds)" in validity
    assert "missing: labeled-only@seed2, raw@seed2, full@seed2, oracle@seed2" in text


def test_validity_fails_when_labels_do_not_matter(runner):
    """A bench whose oracle is close to labeled-only and whose control beats its teacher
    says both rules fail."""
    record(runner, 0, {"teacher": 0.50, "student-labeled-only": 0.55, "student-oracle": 0.58})
    text = runner.table("demo-bench", [0], ["teacher", "labeled-only", "oracle"], "v")
    assert "(a) labeled-only - teacher = +5.0 AP (<= +1: FAILS)" in text
    assert "(b) oracle - labeled-only = +3.0 AP (>= +8: FAILS)" in text
