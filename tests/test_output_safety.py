"""Output safety (issue 11): dpl never deletes or replaces what it did not write, never writes
outside an output folder, never lets an output overwrite an input, locks its outputs,
publishes a split as one set, writes readable (umask) modes and cleans its stale temps."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco
from dpl_tools.data.export import write_yolo
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, output_file, rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.split import split_coco, write_split
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path, write_json
from dpl_tools.outputs import MARKER, lock_path, output_lock
from dpl_tools.report.build import build_report

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
META = {META_CATEGORIES: CATS}
DPL = Path(sys.executable).parent / "dpl"


def _labels(names=("a.jpg", "sub/b.jpg")):
    """A pseudo-label table: one polished box per image."""
    rows = []
    for i, name in enumerate(names, start=1):
        box = {f"{p}_{c}": v for p in ("teacher", "polished") for c, v in zip(
            ("x1", "y1", "x2", "y2"), (10, 10, 40, 30), strict=True)}  # fmt: skip
        rows.append({
            "image_id": i, "file_name": name, "width": 100, "height": 50, "status": "ok", **box,
            "teacher_label": 1, "teacher_score": 0.9, "polished_label": 2, "polisher_prob": 0.95,
            "use_cls": True, "use_reg": True,
        })  # fmt: skip
    return rows_to_table({k: [r[k] for r in rows] for k in rows[0]}, META)


def _parquet(path: Path, names=("a.jpg", "sub/b.jpg")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_labels(names), path)
    return path


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# D1: --yolo-out writes only its own files ------------------------------------------------


def test_yolo_out_refuses_a_foreign_folder_and_never_deletes_its_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"\xff\xd8 user image")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("keep me")
    before = _snapshot(folder)
    with pytest.raises(DplError, match=f"not a dpl YOLO export.*{MARKER}"):
        write_yolo(_labels(), META, folder)
    assert _snapshot(folder) == before
    # --overwrite: dpl adds its files beside the user's, and lists them in the marker.
    assert write_yolo(_labels(), META, folder, overwrite=True) == 2
    marker = json.loads((folder / MARKER).read_text())
    assert marker["kind"] == "yolo-labels" and "dpl polish" in marker["command"]
    assert sorted(marker["files"]) == ["a.txt", "classes.txt", "sub/b.txt"]
    assert all(_snapshot(folder)[name] == data for name, data in before.items())
    # A later export replaces dpl's own files only: sub/b.txt (no longer exported) goes,
    # the user's files stay.
    write_yolo(_labels(["a.jpg"]), META, folder)
    assert not (folder / "sub").exists()
    assert (folder / "a.txt").is_file()
    assert all(_snapshot(folder)[name] == data for name, data in before.items())


def test_yolo_out_never_replaces_a_file_it_did_not_write(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "classes.txt").write_text("my own classes\n")
    with pytest.raises(DplError, match="classes.txt: exists and was not written by dpl"):
        write_yolo(_labels(), META, folder, overwrite=True)
    assert (folder / "classes.txt").read_text() == "my own classes\n"
    assert sorted(p.name for p in folder.iterdir()) == ["classes.txt"]  # nothing else left


def test_export_to_dot_or_the_images_folder_deletes_nothing(tmp_path, monkeypatch):
    work = tmp_path / "work"
    images = work / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"jpeg bytes")
    labels = _parquet(work / "labels.parquet")
    monkeypatch.chdir(work)
    before = _snapshot(work)
    for target in (".", str(images)):
        result = _cli("polish", "--out", str(labels), "--export-only", "--yolo-out", target)
        assert isinstance(result.exception, DplError), result.output
        assert "not a dpl YOLO export" in str(result.exception)
        assert _snapshot(work) == before
    # Even with --overwrite only label files are added; every image stays.
    result = _cli(
        "polish", "--out", str(labels), "--export-only", "--yolo-out", str(images), "--overwrite"
    )
    assert result.exit_code == 0, result.output
    after = _snapshot(work)
    assert all(after[name] == data for name, data in before.items())
    assert (images / "a.txt").is_file() and (images / MARKER).is_file()


def test_folder_of_another_dpl_output_is_refused(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    write_json(folder / MARKER, {"kind": "report", "command": "dpl report", "files": []})
    with pytest.raises(DplError, match="holds another dpl output"):
        write_yolo(_labels(), META, folder, overwrite=True)


def test_report_rebuild_keeps_files_it_did_not_write(tmp_path):
    labels = _parquet(tmp_path / "labels.parquet")
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "report"
    build_report(labels, images, out, max_images=2)
    (out / "my-notes.md").write_text("mine")
    build_report(labels, images, out, max_images=2)
    assert (out / "my-notes.md").read_text() == "mine"
    assert (out / "index.html").is_file()
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>my website</html>")
    with pytest.raises(DplError, match="not a dpl report"):
        build_report(labels, images, site, max_images=2)
    assert (site / "index.html").read_text() == "<html>my website</html>"


# D2: one writer per output -----------------------------------------------------------------


def test_second_polish_on_the_same_out_fails_naming_the_holder(tmp_path):
    out = tmp_path / "labels.parquet"
    (tmp_path / "teacher.pt").write_bytes(b"x")  # only their existence is checked before
    (tmp_path / "polisher.pt").write_bytes(b"x")  # the lock
    (tmp_path / "images").mkdir()
    code = (
        "import sys, time; from pathlib import Path; from dpl_tools.outputs import output_lock\n"
        "with output_lock(sys.argv[1], 'dpl polish'):\n"
        "    Path(sys.argv[2]).touch(); time.sleep(60)\n"
    )
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out), str(ready)])
    try:
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        result = _cli(
            "polish", "--images", str(tmp_path / "images"), "--out", str(out),
            "--run-dir", str(tmp_path), "--device", "cpu",
        )  # fmt: skip
        assert isinstance(result.exception, DplError), result.output
        message = str(result.exception)
        assert str(out) in message and f"pid {holder.pid}" in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is released by the kernel and taken over.
    with output_lock(out, "dpl polish") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released cleanly


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "labels.parquet"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": _dead_pid(), "command": "dpl polish"}))
    with output_lock(out, "dpl polish"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(DplError, match=f"pid {os.getpid()}"):
            with output_lock(out, "dpl polish"):
                pass


# D3: output paths stay inside their folder -------------------------------------------------


@pytest.mark.parametrize("name", ["../x.jpg", "sub/../../x.jpg", "ABSOLUTE"])
def test_yolo_export_never_writes_outside_its_folder(tmp_path, name):
    folder = tmp_path / "export" / "yolo"
    name = str(tmp_path / "abs" / "x.jpg") if name == "ABSOLUTE" else name
    with pytest.raises(DplError, match="leads outside the output folder"):
        write_yolo(_labels(["a.jpg", name]), META, folder)
    assert not (tmp_path / "export" / "x.txt").exists()
    assert not (tmp_path / "x.txt").exists()
    assert not (tmp_path / "abs").exists()
    assert not folder.exists() or _snapshot(folder) == {}


def test_export_only_with_an_escaping_file_name_is_a_one_line_error(tmp_path):
    labels = _parquet(tmp_path / "labels.parquet", ["a.jpg", "../escape.jpg"])
    yolo = tmp_path / "yolo"
    result = _cli("polish", "--out", str(labels), "--export-only", "--yolo-out", str(yolo))
    assert isinstance(result.exception, DplError)
    assert "../escape" in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "escape.txt").exists()


def test_yolo_labels_of_two_images_never_merge(tmp_path):
    with pytest.raises(DplError, match="a.txt is also that of"):
        write_yolo(_labels(["a.jpg", "a.png"]), META, tmp_path / "yolo")


# D4 / D5: an output is never an input or another output -----------------------------------


def test_coco_out_equal_to_out_is_refused_and_the_parquet_kept(tmp_path):
    labels = _parquet(tmp_path / "labels.parquet")
    before = labels.read_bytes()
    result = _cli("polish", "--out", str(labels), "--export-only", "--coco-out", str(labels))
    assert isinstance(result.exception, DplError)
    assert "--coco-out is the input --out" in str(result.exception)
    assert labels.read_bytes() == before
    folder = tmp_path / "adir"
    folder.mkdir()
    result = _cli("polish", "--out", str(labels), "--export-only", "--coco-out", str(folder))
    assert isinstance(result.exception, DplError)
    assert "names an existing directory" in str(result.exception)


def test_polish_outputs_may_not_be_its_inputs(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"x")
    (tmp_path / "polisher.pt").write_bytes(b"x")
    image_list = tmp_path / "unlabeled.json"
    image_list.write_text("{}")
    base = ["polish", "--images", str(image_list), "--run-dir", str(tmp_path), "--device", "cpu"]
    cases = [
        (["--coco-out", str(image_list)], "--coco-out is the input --images"),
        (["--out", str(tmp_path / "teacher.pt")], "--out is the input --teacher"),
        (["--coco-out", str(tmp_path / "x.json"), "--yolo-out", str(tmp_path / "x.json")],
         "are the same path"),
    ]  # fmt: skip
    for extra, expected in cases:
        result = _cli(*base, *extra)
        assert isinstance(result.exception, DplError), (extra, result.output)
        assert expected in str(result.exception)
    assert image_list.read_text() == "{}" and (tmp_path / "teacher.pt").read_bytes() == b"x"


def test_split_into_the_input_folder_never_overwrites_the_input(synth_dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ann = data / "labeled.json"
    ann.write_bytes(synth_dataset.read_bytes())
    before = ann.read_bytes()
    result = _cli("split", str(ann), "--out-dir", str(data))
    assert isinstance(result.exception, DplError)
    assert "is the input ANN" in str(result.exception)
    assert ann.read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["labeled.json"]


def test_other_commands_refuse_an_output_equal_to_an_input(synth_dataset, tmp_path):
    ann = tmp_path / "gt.json"
    ann.write_bytes(synth_dataset.read_bytes())
    before = ann.read_bytes()
    labels = _parquet(tmp_path / "labels.parquet")
    images = synth_dataset.parent / "images"
    cases = [
        (["convert", str(ann), "--format", "coco", "--out", str(ann)], "is the input SRC"),
        (["evaluate", "--ann", str(ann), "--pseudo", str(labels), "--json", str(ann)],
         "--json is the input --ann"),
        (["report", str(labels), "--images", str(images), "--out", str(images)],
         "--out is the input --images"),
    ]  # fmt: skip
    for args, expected in cases:
        result = _cli(*args)
        assert isinstance(result.exception, DplError), (args, result.output)
        assert expected in str(result.exception)
    assert ann.read_bytes() == before


def test_cli_prints_one_error_line_with_status_2(tmp_path):
    labels = _parquet(tmp_path / "labels.parquet")
    proc = subprocess.run(
        [str(DPL), "polish", "--out", str(labels), "--export-only", "--coco-out", str(labels)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--coco-out" in lines[0]


# S2: a split is published as one set -------------------------------------------------------


def test_failed_split_leaves_the_previous_set_whole(synth_dataset, tmp_path):
    coco = load_coco(synth_dataset)
    out = tmp_path / "split"
    write_split(split_coco(coco, 25, fold=1, seed=0), out)
    before = _snapshot(out)
    second = split_coco(coco, 25, fold=1, seed=1)
    second.unlabeled["not json"] = {1, 2}  # the second file of the set fails to serialize
    with pytest.raises(TypeError):
        write_split(second, out)
    assert _snapshot(out) == before  # old code: labeled.json of seed 1 beside seed 0's rest
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temp left
    write_split(split_coco(coco, 25, fold=1, seed=1), out)
    seeds = {json.loads((out / n).read_text())["dpl_split"]["seed"] for n in before}
    assert seeds == {1}


# S8: outputs are readable by others (umask default) ----------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_umask_default_mode(tmp_path, synth_dataset, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"1")
        writer = PseudoLabelWriter(tmp_path / "labels.parquet", META)
        writer.open()
        chunk = writer.write_chunk(_labels(), 0)
        assert stat.S_IMODE(chunk.stat().st_mode) == mode
        writer.finish()
        write_yolo(_labels(), META, tmp_path / "yolo")
        write_split(split_coco(load_coco(synth_dataset), 25), tmp_path / "split")
    finally:
        os.umask(old)
    files = [tmp_path / "a.json", tmp_path / "b.bin", tmp_path / "labels.parquet"]
    files += [p for p in (tmp_path / "yolo").rglob("*") if p.is_file()]
    files += list((tmp_path / "split").glob("*.json"))
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: mode for f in files}


# U5: stale temps of a killed run are cleaned on the next run -------------------------------


def test_stale_temps_of_dead_runs_are_removed_on_the_next_write(tmp_path):
    dest = tmp_path / "labels.json"
    dead, live = _dead_pid(), os.getpid()
    old = time.time() - 600
    stale = tmp_path / f".labels.json.{dead}.abcd1234.tmp"
    fresh_dead = tmp_path / f".labels.json.{dead}.efgh5678.tmp"
    running = tmp_path / f".labels.json.{live}.ijkl9012.tmp"
    legacy = tmp_path / ".labels.json.mnop3456.tmp"  # older dpl, no pid: removed when > 1 h
    user = tmp_path / ".labels.json.notes.tmp"  # not our pattern: never touched
    for path in (stale, fresh_dead, running, legacy, user):
        path.write_text("partial")
    for path in (stale, running, user):
        os.utime(path, (old, old))
    os.utime(legacy, (time.time() - 7200,) * 2)
    write_json(dest, {"ok": True})
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"labels.json", fresh_dead.name, running.name, user.name}
    # Holding the output's lock, a dead run's temp goes whatever its age.
    with output_lock(dest, "dpl polish"):
        pass
    assert not fresh_dead.exists() and running.exists() and user.exists()


# U1: the --out message matches the situation ----------------------------------------------


def test_out_file_message_matches_the_situation(tmp_path):
    plain = tmp_path / "labels.pq"
    plain.write_text("x")
    with pytest.raises(DplError) as err:
        output_file(plain)
    assert "shard" not in str(err.value) and ".parquet" in str(err.value)
    parquet = _parquet(tmp_path / "labels.parquet")
    with pytest.raises(DplError, match=r"sharded run \(shard 1 of 4\).*directory"):
        output_file(parquet, 1, 4)
    assert output_file(parquet) == parquet
