"""Reliability of outputs: an output never lies inside a folder the command reads nor is a
file it reads (D1, D2); dpl's lock, marker and staging files are never written through a
link (D3, D4); a resumed trainer removes the temps a killed checkpoint left (D20); an image
folder's linked folders leading outside it are not read by default (D22)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.image_list import load_image_list
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, rows_to_table, staging_dir
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.engine.loop import TrainConfig, last_checkpoint_path, train
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path
from dpl_tools.outputs import FOLDER_LOCK, MARKER, lock_path, output_lock

ROOT = Path(__file__).resolve().parents[1]
CATS = [{"id": 1, "name": "cat"}]
META = {META_CATEGORIES: CATS}


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result, *expected: str) -> str:
    assert isinstance(result.exception, DplError), result.output
    message = str(result.exception)
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    return message


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _png(path: Path, size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path)
    return path


def _labels(path: Path, names=("a.png",)) -> Path:
    n = len(names)
    box = {f"{p}_{c}": [v] * n for p in ("teacher", "polished")
           for c, v in zip(("x1", "y1", "x2", "y2"), (1, 1, 10, 10), strict=True)}  # fmt: skip
    columns = {
        "image_id": list(range(1, n + 1)), "file_name": list(names), "width": [32] * n,
        "height": [24] * n, "status": ["ok"] * n, **box, "teacher_label": [1] * n,
        "teacher_score": [0.9] * n, "polished_label": [1] * n, "polisher_prob": [0.9] * n,
        "use_cls": [True] * n, "use_reg": [True] * n,
    }  # fmt: skip
    pq.write_table(rows_to_table(columns, META), path)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def voc(tmp_path) -> Path:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    _png(root / "JPEGImages" / "good.png")
    (root / "Annotations" / "good.xml").write_text(
        "<annotation><filename>good.png</filename><size><width>32</width><height>24</height>"
        "</size><object><name>cat</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>"
    )
    return root


@pytest.fixture
def yolo(tmp_path) -> Path:
    root = tmp_path / "yolo"
    _png(root / "images" / "good.png")
    (root / "labels").mkdir()
    (root / "labels" / "good.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text("path: .\nnames:\n  0: cat\n")
    return root


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder whose teacher and polisher exist (only their existence is checked
    before the output checks and the lock)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "teacher.pt").write_bytes(b"x")
    (folder / "polisher.pt").write_bytes(b"x")
    return folder


# D1: convert never writes inside a folder input -----------------------------------------


def test_convert_refuses_an_out_inside_the_voc_or_yolo_folder(voc, yolo, tmp_path):
    cases = [
        ("voc", voc, voc / "Annotations" / "good.xml"),
        ("voc", voc, voc / "JPEGImages" / "good.png"),
        ("voc", voc, voc / "new.json"),
        ("yolo", yolo, yolo / "labels" / "good.txt"),
        ("yolo", yolo, yolo / "data.yaml"),
    ]
    for fmt, src, out in cases:
        before = _snapshot(src)
        result = _cli("convert", "--format", fmt, src, "--out", out)
        _refused(result, str(out), "lies inside the input folder SRC")
        assert _snapshot(src) == before  # nothing written, nothing replaced
    images = tmp_path / "imgs"
    _png(images / "good.png")
    result = _cli("convert", "-f", "voc", voc, "--images", images, "--out", images / "x.json")
    _refused(result, "lies inside the input folder --images")
    result = _cli("convert", "-f", "voc", voc, "--out", tmp_path / "ok.json")  # outside: fine
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok.json").read_text())["images"]


def test_convert_refusal_is_exit_2_with_one_line(voc):
    good = voc / "Annotations" / "good.xml"
    before = good.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "convert", "--format", "voc", str(voc),
         "--out", str(good)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert good.read_bytes() == before


# D2: no output of a command is a file it reads -------------------------------------------


def test_polish_outputs_never_replace_an_image(tmp_path, run):
    images = tmp_path / "imgs"
    image = _png(images / "synth_00061.png")
    before = image.read_bytes()
    base = ["polish", "--images", images, "--run-dir", run, "--device", "cpu"]
    _refused(
        _cli(*base, "--out", tmp_path / "l.parquet", "--coco-out", image),
        "--coco-out lies inside the input folder --images",
    )
    _refused(_cli(*base, "--out", images / "l.parquet"), "--out lies inside")
    _refused(
        _cli(*base, "--out", tmp_path / "l.parquet", "--yolo-out", images / "y"),
        "--yolo-out lies inside",
    )
    assert image.read_bytes() == before
    assert sorted(p.name for p in images.iterdir()) == ["synth_00061.png"]
    # A COCO image list: its folder is not an input folder, but its images are inputs.
    data = tmp_path / "data"
    listed = _png(data / "a.png")
    (data / "list.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}))
    before = listed.read_bytes()
    result = _cli(
        "polish", "--images", data / "list.json", "--run-dir", run, "--device", "cpu",
        "--out", tmp_path / "l.parquet", "--coco-out", listed,
    )  # fmt: skip
    _refused(result, "--coco-out is an image that --images reads")
    assert listed.read_bytes() == before
    assert not lock_path(tmp_path / "l.parquet").exists()


def test_report_show_and_export_never_write_inside_their_image_folders(tmp_path):
    images = tmp_path / "imgs"
    _png(images / "a.png")
    labels = _labels(tmp_path / "labels.parquet")
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    before = _snapshot(images)
    result = _cli("report", labels, "--images", images, "--out", images / "report")
    _refused(result, "--out lies inside the input folder --images")
    result = _cli(
        "show", "--augment", "--ann", ann, "--images", images, "--out", images / "grid.png"
    )
    _refused(result, "--out lies inside the input folder --images")
    result = _cli(
        "export", "--format", "coco", "--labels", labels, "--labeled", ann, "--images", images,
        "--out", images / "export",
    )  # fmt: skip
    _refused(result, "--out lies inside the input folder --images")
    assert _snapshot(images) == before
    assert sorted(p.name for p in images.iterdir()) == ["a.png"]


# D3: lock and marker files are never written through a link ------------------------------


def test_a_planted_lock_link_is_refused_and_its_target_kept(tmp_path, run):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out" / "l.parquet"
    out.parent.mkdir()
    lock_path(out).symlink_to(victim)
    images = tmp_path / "imgs"
    _png(images / "a.png")
    result = _cli("polish", "--images", images, "--out", out, "--run-dir", run, "--device", "cpu")
    _refused(result, "the lock file is a symbolic link")
    assert victim.read_text() == "precious"
    assert lock_path(out).is_symlink()  # left for the user to look at
    # A hard link in place of the lock is refused too (its other name is the user's file).
    lock_path(out).unlink()
    os.link(victim, lock_path(out))
    with pytest.raises(DplError, match="not a plain file of its own"):
        with output_lock(out, "dpl polish"):
            pass
    assert victim.read_text() == "precious"


def test_report_into_a_folder_holding_a_planted_folder_lock_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    images = tmp_path / "imgs"
    _png(images / "a.png")
    labels = _labels(tmp_path / "labels.parquet")
    report = tmp_path / "rep"
    report.mkdir()
    (report / FOLDER_LOCK).symlink_to(victim)
    proc = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "report", str(labels), "--images", str(images),
         "--out", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "symbolic link" in proc.stderr and "Traceback" not in proc.stderr
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in report.iterdir()) == [FOLDER_LOCK]
    # A marker link is refused as well (never read or replaced through the link).
    (report / FOLDER_LOCK).unlink()
    (report / MARKER).symlink_to(victim)
    _refused(_cli("report", labels, "--images", images, "--out", report), "symbolic link")
    assert victim.read_text() == "precious"


def test_temp_files_are_new_entries_with_the_default_mode(tmp_path):
    dest = tmp_path / "x.json"
    with atomic_path(dest) as tmp:
        assert not tmp.is_symlink() and tmp.stat().st_nlink == 1
        tmp.write_text("{}")
    assert dest.read_text() == "{}"


# D4: a link in place of the staging folder ----------------------------------------------


def test_a_staging_folder_link_is_refused_and_nothing_written_through_it(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "out" / "l.parquet"
    dest.parent.mkdir()
    staging_dir(dest).symlink_to(elsewhere, target_is_directory=True)
    for overwrite in (False, True):
        writer = PseudoLabelWriter(dest, META, overwrite=overwrite)
        with pytest.raises(DplError, match="staging folder is a symbolic link"):
            writer.open()
    assert list(elsewhere.iterdir()) == []
    assert staging_dir(dest).is_symlink() and not dest.exists()


# D20: the resuming trainer removes the temp a killed checkpoint left ---------------------


class _Points(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return torch.full((2,), float(i)), {"y": torch.tensor(float(i))}


def _mse(net, images, targets):
    pred = net(torch.stack(images)).squeeze(1)
    return {"mse": ((pred - torch.stack([t["y"] for t in targets])) ** 2).mean()}


def test_resumed_training_removes_a_killed_checkpoints_temp_at_once(tmp_path):
    out = tmp_path / "kt.pt"
    last = last_checkpoint_path(out)
    dead = tmp_path / f".{last.name}.{_dead_pid()}.abcd1234.pt.tmp"  # a kill mid-write
    dead.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".{last.name}.{os.getppid()}.efgh5678.pt.tmp"  # a live writer's
    alive.write_bytes(b"x")
    held = []

    def save(net, state, final):
        held.append(lock_path(out).is_file())
        with atomic_path(out if final else last, suffix=".pt") as tmp:
            torch.save({"state": state}, tmp)

    cfg = TrainConfig(iters=3, batch_size=2, lr=0.01, warmup_iters=0, lr_steps=[], workers=0)
    torch.manual_seed(0)
    train(
        nn.Linear(2, 1), _Points(), cfg, torch.device("cpu"), loss_fn=_mse,
        save=save, description="train-teacher", out=out,
    )  # fmt: skip
    assert not dead.exists()  # fresh (seconds old), removed at once: the lock is held
    assert alive.exists()  # a running process's temp is never touched
    assert held and all(held)  # the output lock is held while checkpoints are written
    assert not lock_path(out).exists() and out.is_file()
    with output_lock(out, "x"):  # released
        pass


def test_a_second_trainer_of_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "kt.pt"
    cfg = TrainConfig(iters=1, batch_size=2, lr=0.01, warmup_iters=0, lr_steps=[], workers=0)
    with output_lock(out, "dpl train-teacher"):
        with pytest.raises(DplError, match="is writing this output"):
            train(
                nn.Linear(2, 1), _Points(), cfg, torch.device("cpu"), loss_fn=_mse,
                save=lambda *a: None, out=out,
            )  # fmt: skip


# D22: linked folders leading out of an image folder -------------------------------------


def test_linked_folders_leading_outside_the_image_folder_are_not_read(tmp_path, run):
    images = tmp_path / "imgs"
    _png(images / "a.png")
    _png(images / "sub" / "b.png")
    _png(tmp_path / "secret_outside.png")
    (images / "up").symlink_to("..", target_is_directory=True)
    (images / "alias").symlink_to(images / "sub" / "deep", target_is_directory=True)
    _png(images / "sub" / "deep" / "c.png")  # a linked folder that stays inside: read
    listed = load_image_list(images)
    names = sorted(r["file_name"] for r in listed)
    assert names[0] == "a.png" and "sub/b.png" in names
    assert sum(n.endswith("/c.png") for n in names) == 1  # listed once, through either name
    assert not any("secret" in n for n in names)
    assert listed.outside == 1
    allowed = load_image_list(images, allow_outside_root=True)
    assert "up/secret_outside.png" in {r["file_name"] for r in allowed}
    assert allowed.outside == 0
    # Only outside images: a one-line error naming the option that reads them.
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(DplError, match="--allow-outside-root"):
        load_image_list(lonely)
    # The CLI warns with the count (then fails here on the dummy teacher).
    out = tmp_path / "l.parquet"
    result = _cli("polish", "--images", images, "--out", out, "--run-dir", run, "--device", "cpu")
    assert "1 image(s) in linked folders leading outside" in " ".join(result.output.split())
    help_text = " ".join(_cli("polish", "--help").output.split())
    assert "linked folders leading outside it" in help_text


def test_the_guarantees_are_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What dpl guarantees", 1)[1].split("\n## ", 1)[0]
    assert "symbolic link" in section and "inside a folder it reads" in section


def test_a_checkpoint_or_parquet_may_live_in_an_image_folder(tmp_path):
    """Only outputs of a kind dpl reads from folders (images, annotations, whole folders)
    are refused inside an input folder: a teacher.pt beside the images is a normal layout."""
    from dpl_tools.outputs import check_distinct_outputs

    images = tmp_path / "data"
    _png(images / "a.png")
    check_distinct_outputs({"--images": images}, {"--out": images / "teacher.pt"})
    check_distinct_outputs({"--images": images}, {"--out": images / "labels.parquet"})
    for out, folders in ((images / "labels.json", ()), (images / "b.PNG", ()),
                         (images / "report", ("--out",))):  # fmt: skip
        with pytest.raises(DplError, match="lies inside the input folder --images"):
            check_distinct_outputs({"--images": images}, {"--out": out}, folders)


def test_an_atomic_write_is_flushed_to_disk_before_its_rename(tmp_path, monkeypatch):
    """The temp file is fsynced, whole, before it replaces the output: after a power loss
    the output is the old file or the new one, not an empty one."""
    import dpl_tools.io as dpl_io

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else fd)  # fmt: skip
        real_fsync(fd)

    monkeypatch.setattr(dpl_io.os, "fsync", fsync)
    out = tmp_path / "figures.json"
    dpl_io.write_json(out, {"ap": 0.5})
    assert len(synced) == 1 and json.loads(out.read_text()) == {"ap": 0.5}
    if isinstance(synced[0], str):  # the temp beside the output, not the output itself
        assert Path(synced[0]).parent == tmp_path and Path(synced[0]) != out
