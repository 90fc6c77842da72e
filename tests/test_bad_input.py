"""Bad input, as a new user would give it: each case pins one defect of issue 11.

Every test here failed on the code before the fix (ids renumbered on a resume, sizes
never checked against the image, unreadable images never retried, ids 1 / 1.0 / "1",
non-finite numbers, file names leaving the image folder, tracebacks instead of one-line
errors, one bad annotation file stopping a conversion, empty conversions written, odd
folder entries skipped without a word). Tiny synthetic files; one untrained teacher.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_polish import FAST, make_run
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.coco import load_coco, read_json, validate_coco
from dpl_tools.data.convert import convert, require_usable
from dpl_tools.data.image_list import load_image_list, stable_ids
from dpl_tools.data.images import image_size, read_image, scan_images
from dpl_tools.data.polisher_pairs import read_noise_metadata
from dpl_tools.data.pseudo_label_writer import PseudoLabelWriter, rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES, read_pseudo_labels
from dpl_tools.data.voc import convert_voc
from dpl_tools.data.yolo_labels import convert_yolo
from dpl_tools.errors import DplError

CATS = [{"id": 1, "name": "thing"}]
# Should a check be missing, a teacher run ends in seconds (and the test fails) rather
# than training a default detector.
TINY_TRAIN = ["--arch", "mobilenet_v2_fpn", "--backbone-weights", "none", "--iters", "1",
              "--min-size", "64", "--max-size", "96", "--workers", "0"]  # fmt: skip


def _coco(images: list[dict], annotations: list[dict] | None = None) -> dict:
    return {"images": images, "annotations": annotations or [], "categories": CATS}


def _image(i: int = 1, name: str = "a.png", w: float = 64, h: float = 48) -> dict:
    return {"id": i, "file_name": name, "width": w, "height": h}


def _ann(i: int, image_id, bbox: list) -> dict:
    return {"id": i, "image_id": image_id, "category_id": 1, "bbox": bbox}


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def cli(*args: str):
    # a wide terminal: rich cuts long option names in --help at 80 columns
    return CliRunner().invoke(app, [*args], env={"COLUMNS": "200"})


# ----------------------------------------------------- S7 ids, numbers, file names


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # 1 and 1.0 are the same id: a duplicate, not two images
        (_coco([_image(1), _image(1.0, "b.png")]), r"duplicate image id"),
        (_coco([_image(1.5)]), r"image #0: id = 1.5, a float\); ids must be integers"),
        (_coco([_image("1")]), r"image #0: id = \"1\", a str\)"),
        (_coco([_image(None)]), r"image #0: id = null"),
        (_coco([_image([1])]), r"image #0: id = \[1\], a list"),
        (_coco([_image()], [_ann(1, "1", [1, 1, 5, 5])]), r"annotation #0 \(id 1\): image_id"),
        (_coco([_image(1, None)]), r"image 1: file_name = null\); it must be a non-empty"),
        (_coco([_image(1, 7)]), r"image 1: file_name = 7\)"),
        (_coco([_image(1, ["a.png"])]), r"image 1: file_name = \[\"a.png\"\]"),
        (_coco([_image(1, "a.png", float("inf"))]), r"without a positive width/height"),
        # a JSON integer too large for a float is a size like any other, not a crash
        (_coco([_image(1, "a.png", 10**400)]), r"without a positive width/height"),
        # ./a.png is the file a.png: two records of one image
        (_coco([_image(1, "a.png"), _image(2, "./a.png")]), r"duplicate image file_name"),
    ],
)
def test_ids_file_names_and_sizes_are_checked_naming_the_record(raw, message):
    with pytest.raises(DplError, match=r"^ann.json: .*" + message):
        validate_coco(raw, "ann.json")


def test_integral_float_ids_become_ints_and_non_finite_boxes_are_dropped(tmp_path):
    raw = _coco(
        [_image(1.0)],
        [
            _ann(1.0, 1.0, [1, 2, 10, 10]),
            _ann(2, 1, [float("inf"), 2, 10, 10]),
            _ann(3, 1, [1, 2, float("nan"), 10]),
            _ann(4, 1, [1, 2, 10, 10]) | {"area": float("inf")},
        ],
    )
    coco = validate_coco(raw, "ann.json")
    assert coco.images[0]["id"] == 1 and type(coco.images[0]["id"]) is int
    kept = coco.annotations
    assert [(a["id"], a["image_id"]) for a in kept] == [(1, 1), (4, 1)]
    assert all(type(a["id"]) is int and type(a["image_id"]) is int for a in kept)
    assert kept[1]["area"] == 100.0  # an Infinity area is recomputed
    assert coco.report.counts["malformed bbox (annotation dropped)"] == 2
    # Infinity / NaN as JSON read them (Python's json accepts the literals).
    path = tmp_path / "ann.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a", "width": Infinity, "height": 9}],'
                    ' "annotations": [], "categories": []}')  # fmt: skip
    with pytest.raises(DplError, match="without a positive width/height"):
        load_coco(path)


def test_sub_pixel_box_is_dropped_not_a_training_crash():
    raw = _coco([_image()], [_ann(1, 1, [10, 10, 1e-9, 5]), _ann(2, 1, [10, 10, 5, 5])])
    coco = validate_coco(raw, "ann.json")
    assert [a["id"] for a in coco.annotations] == [2]
    assert coco.report.counts["box smaller than 0.01 px (dropped)"] == 1
    # ... and a box that vanishes in float32 far from the origin (the dtype trained in)
    far = _coco([_image(1, "a.png", 3e7, 10)], [_ann(1, 1, [2.5e7, 1, 0.5, 5])])
    assert validate_coco(far, "ann.json").annotations == []


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (64, 48)).save(root / "a.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "outside.png")
    return root


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_file_names_leaving_the_image_folder_are_refused(image_root, tmp_path, name):
    raw = _coco([_image(1, "a.png"), _image(2, name)])
    with pytest.raises(DplError, match=r"1 file name\(s\) outside the image folder .*image 2"):
        validate_coco(raw, "ann.json", images_dir=image_root)
    listed = _write(tmp_path / "list.json", raw)
    with pytest.raises(DplError, match=r"unless --allow-outside-root"):
        load_image_list(listed, image_root)
    if name.startswith(".."):  # the flag reads it (it exists)
        coco = validate_coco(raw, "ann.json", images_dir=image_root, allow_outside_root=True)
        assert [im["id"] for im in coco.images] == [1, 2]
        records = load_image_list(listed, image_root, allow_outside_root=True)
        assert read_image(records[1]["path"]).size == (64, 48)
    # "x/../a.png" stays inside: allowed
    (image_root / "x").mkdir(exist_ok=True)
    inside = _coco([_image(1, "x/../a.png")])
    assert validate_coco(inside, "ann.json", images_dir=image_root).images


def test_outside_root_refused_by_every_command_reading_images(image_root, tmp_path):
    raw = _coco([_image(1, "../outside.png")], [_ann(1, 1, [1, 1, 9, 9])])
    ann = _write(tmp_path / "ann.json", raw)
    out = tmp_path / "o"
    for argv in (
        [
            "train-teacher",
            "--ann",
            str(ann),
            "--images",
            str(image_root),
            "--out",
            str(out),
            *TINY_TRAIN,
        ],  # fmt: skip
        ["split", str(ann), "--images", str(image_root), "--out-dir", str(out)],
        ["convert", str(ann), "-f", "coco", "--images", str(image_root), "--out", str(out)],
    ):
        result = cli(*argv)
        assert isinstance(result.exception, DplError), (argv, result.output)
        assert "outside the image folder" in str(result.exception)
    ok = cli(*["convert", str(ann), "-f", "coco", "--images", str(image_root)],
             "--out", str(tmp_path / "ok.json"), "--allow-outside-root")  # fmt: skip
    assert ok.exit_code == 0, ok.output
    for command in ("train-polisher", "synth-noise", "polish", "train-student", "evaluate"):
        assert "--allow-outside-root" in cli(command, "--help").output, command
    assert "--allow-outside-root" in cli("report", "--help").output


def test_image_list_ids_and_names_are_checked(tmp_path, image_root):
    for images, message in [
        ([{"id": "1", "file_name": "a.png"}], r"image #0 has id \"1\" \(a str\)"),
        ([{"id": 2.5, "file_name": "a.png"}], r"image #0 has id 2.5"),
        ([{"id": 1, "file_name": None}], r"image #0 \(id 1\) has file_name null"),
        ([{"id": 1, "file_name": ["a.png"]}], r"has file_name \[\"a.png\"\]"),
        ([{"id": 1, "file_name": "a.png"}, {"id": 1.0, "file_name": "b.png"}], "duplicate"),
    ]:
        listed = _write(tmp_path / "list.json", {"images": images})
        with pytest.raises(DplError, match=message):
            load_image_list(listed, image_root)
    listed = _write(tmp_path / "list.json", {"images": [{"id": 3.0, "file_name": "a.png"}]})
    assert load_image_list(listed, image_root)[0]["id"] == 3


def test_string_image_ids_in_synth_noise_are_one_line_errors(tmp_path):
    ann = _write(tmp_path / "ann.json", _coco([_image("x")], [_ann(1, "x", [1, 1, 9, 9])]))
    result = cli("synth-noise", "--ann", str(ann), "--out", str(tmp_path / "n.parquet"))
    assert isinstance(result.exception, DplError)
    assert "ann.json: 1 image(s) with a non-integer 'id'" in str(result.exception)


# -------------------------------------------------------------- U2 read_json


def test_json_read_errors_name_file_line_and_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,, }\n]}')
    with pytest.raises(DplError, match=r"bad.json: not valid JSON \(.* line 2 column 12\)"):
        read_json(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(DplError, match=r"latin.json: not UTF-8 text \(byte 0xe9 at offset 13\)"):
        read_json(latin)
    with pytest.raises(DplError, match=r": is a directory, not a JSON file"):
        read_json(tmp_path)


def test_error_lines_keep_square_brackets_of_file_names(tmp_path):
    # the CLI prints errors through rich: a name like "[abc]x.json" is not markup
    missing = tmp_path / "[abc]x.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "convert", "--format", "coco", str(missing),
         "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"error: {missing}: file not found" in " ".join(proc.stderr.split())


# ------------------------------------------------------------- S4 image sizes


def _exif_image(path: Path, orientation: int, stored: tuple[int, int]) -> None:
    """A JPEG whose stored pixels hold a red block at x 0..10, y 0..stored height."""
    arr = np.full((stored[1], stored[0], 3), 40, np.uint8)
    arr[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=98)


def _red_box(image: Image.Image) -> list[float]:
    arr = np.asarray(image)
    ys, xs = np.nonzero((arr[..., 0] > 150) & (arr[..., 1] < 100))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_boxes_on_the_stored_pixels_of_exif_rotated_jpegs_are_rotated(tmp_path, orientation):
    _exif_image(tmp_path / "r.jpg", orientation, (40, 20))
    raw = _coco([_image(1, "r.jpg", 40, 20)], [_ann(1, 1, [0, 0, 10, 20])])
    coco = validate_coco(raw, "ann.json", images_dir=tmp_path)
    decoded = read_image(tmp_path / "r.jpg")
    assert decoded.size == (20, 40) == image_size(tmp_path / "r.jpg")
    assert (coco.images[0]["width"], coco.images[0]["height"]) == (20, 40)
    x, y, w, h = coco.annotations[0]["bbox"]
    assert np.allclose([x, y, x + w, y + h], _red_box(decoded), atol=1.0)
    assert coco.annotations[0]["area"] == pytest.approx(200.0)
    assert (
        coco.report.counts[
            "annotated on the stored pixels of an EXIF-rotated image (boxes rotated upright)"
        ]
        == 1
    )
    assert "image 1 r.jpg: annotated 40x20, file 20x40" in "\n".join(coco.report.lines())


def test_resized_files_rescale_boxes_and_unexplained_sizes_drop_the_image(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "half.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "odd.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "same.png")
    raw = _coco(
        [_image(1, "half.png", 128, 96), _image(2, "odd.png", 100, 100), _image(3, "same.png")],
        [_ann(1, 1, [20, 20, 40, 40]), _ann(2, 2, [1, 1, 9, 9]), _ann(3, 3, [1, 1, 9, 9])],
    )
    coco = validate_coco(raw, "ann.json", images_dir=tmp_path)
    assert [im["id"] for im in coco.images] == [1, 3]
    assert (coco.images[0]["width"], coco.images[0]["height"]) == (64, 48)
    assert coco.annotations[0]["bbox"] == [10.0, 10.0, 20.0, 20.0]
    assert coco.annotations[0]["area"] == 400.0
    counts = coco.report.counts
    assert counts["width/height differ from the image file by a resize (boxes rescaled to it)"] == 1
    assert counts["width/height differ from the image file, not by a resize (image dropped)"] == 1
    assert counts["annotation of a dropped image (dropped)"] == 1


def test_pseudo_labeled_images_resized_after_polish_are_left_out(tmp_path, synth_dataset):
    from dpl_tools.config import load_config
    from dpl_tools.engine.train_student import load_student_data

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    Image.new("RGB", (64, 48)).save(unlabeled / "same.png")
    Image.new("RGB", (32, 24)).save(unlabeled / "resized.png")  # polish saw 64x48
    categories = json.loads(synth_dataset.read_text())["categories"]
    rows: dict[str, list] = {k: [] for k in ("image_id", "file_name", "width", "height")}
    for i, name in enumerate(("same.png", "resized.png"), 1):
        box = {"teacher_x1": 2.0, "teacher_y1": 2.0, "teacher_x2": 30.0, "teacher_y2": 30.0}
        row = {"image_id": i, "file_name": name, "width": 64, "height": 48, "status": "ok",
               **box, **{k.replace("teacher", "polished"): v for k, v in box.items()},
               "teacher_label": 1, "polished_label": 1, "teacher_score": 0.99,
               "use_cls": True, "use_reg": True}  # fmt: skip
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
    pseudo = tmp_path / "labels.parquet"
    pq.write_table(rows_to_table(rows, {META_CATEGORIES: categories}), pseudo)
    scfg = load_config(None)["student"]
    dataset, stats = load_student_data(
        synth_dataset, synth_dataset.parent / "images", pseudo, unlabeled, scfg, verbose=False
    )
    assert [t.file_name for t in dataset.unlabeled.items] == ["same.png"]
    assert stats.unlabeled_images == 1
    outside = tmp_path / "outside.parquet"
    rows["file_name"] = ["../same.png", "resized.png"]
    pq.write_table(rows_to_table(rows, {META_CATEGORIES: categories}), outside)
    with pytest.raises(DplError, match=r"outside.parquet: 1 file name\(s\) outside"):
        load_student_data(synth_dataset, synth_dataset.parent / "images", outside, unlabeled,
                          scfg, verbose=False)  # fmt: skip


# ------------------------------------------------------- S1 / S5 / U6 in polish


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def polish_run(module_dir) -> tuple[Path, Path]:
    """Three tiny images and an untrained teacher + polisher (images folder, run dir)."""
    return make_run(module_dir("polish"), num_images=3)


def test_polish_resume_keeps_ids_retries_unreadable_and_reports_odd_entries(tmp_path, polish_run):
    images, run = polish_run
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for p in sorted(images.glob("*.png")):
        shutil.copy(p, folder / f"m_{p.name}")
    (folder / "z_broken.png").write_bytes(b"not yet an image")
    (folder / "loop.jpg").symlink_to("loop.jpg")  # a link to itself
    (folder / "dir.jpg").mkdir()  # a folder named like an image
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")  # a folder loop
    out = tmp_path / "labels.parquet"
    argv = ["polish", "--images", str(folder), "--out", str(out), "--run-dir", str(run), *FAST]
    first = cli(*argv)
    assert first.exit_code == 0, first.output
    said = "".join(first.output.split())  # rich wraps (and folds long paths)
    assert "skippedwhilelisting" in said
    for entry in ("loop.jpg: symbolic link loop", "dir.jpg: a folder named like an image",
                  "sub/up: symlink loop: folder already listed"):  # fmt: skip
        assert "".join(entry.split()) in said, entry
    ids = {r["file_name"]: r["image_id"] for r in _rows(out)}
    assert sorted(ids.values()) == [1, 2, 3, 4]
    assert {r["file_name"]: r["status"] for r in _rows(out)}["z_broken.png"] == "skipped"

    # A new image sorting first, and the broken one repaired: rerun.
    shutil.copy(next(images.glob("*.png")), folder / "a_new.png")
    shutil.copy(next(images.glob("*.png")), folder / "z_broken.png")
    second = cli(*argv, "--coco-out", str(tmp_path / "pseudo.json"))
    assert second.exit_code == 0, second.output
    assert "retried 1 image(s) skipped as unreadable by an earlier run: 1 read now" in (
        " ".join(second.output.split())
    )
    rows = _rows(out)
    assert all(r["status"] == "ok" for r in rows)  # the old skipped row is gone
    new_ids = {}
    for r in rows:
        assert new_ids.setdefault(r["file_name"], r["image_id"]) == r["image_id"]
    assert {k: new_ids[k] for k in ids} == ids  # no image renumbered
    assert new_ids["a_new.png"] == 5  # above every id in use
    coco = json.loads((tmp_path / "pseudo.json").read_text())
    exported = [im["id"] for im in coco["images"]]
    assert sorted(exported) == [1, 2, 3, 4, 5]  # unique ids in the export

    # Broken again: retried, one skipped row with the new reason (no duplicate rows).
    (folder / "a_new.png").write_bytes(b"")
    third = cli(*argv, "--overwrite")
    assert third.exit_code == 0
    (folder / "a_new.png").write_bytes(b"broken again")
    fourth = cli(*argv)
    assert "retried 1 image(s)" in fourth.output and "0 read now, 1 still skipped" in (
        " ".join(fourth.output.split())
    )
    skipped = [r for r in _rows(out) if r["file_name"] == "a_new.png"]
    assert len(skipped) == 1 and "not a recognised image format" in skipped[0]["error"]


def test_polish_image_list_sizes_are_checked_and_string_ids_refused(tmp_path, polish_run):
    images, run = polish_run
    first = sorted(images.glob("*.png"))[0]
    listed = tmp_path / "list.json"
    out = tmp_path / "l.parquet"
    argv = ["polish", "--images", str(listed), "--image-root", str(images), "--out", str(out),
            "--run-dir", str(run), *FAST]  # fmt: skip
    _write(listed, {"images": [{"id": "1", "file_name": first.name}]})
    refused = cli(*argv)
    assert isinstance(refused.exception, DplError) and 'image #0 has id "1"' in str(
        refused.exception
    )
    _write(listed, {"images": [{"id": 1, "file_name": first.name, "width": 10, "height": 10}]})
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "1 image(s) whose width/height in the image list differ from the decoded" in said
    assert {(r["width"], r["height"]) for r in _rows(out)} == {Image.open(first).size}


def _writer_rows(dest: Path, table_rows: list[dict], meta: dict) -> None:
    writer = PseudoLabelWriter(dest, meta)
    writer.open()
    cols = {k: [r.get(k) for r in table_rows] for k in ("image_id", "file_name", "status")}
    writer.write_chunk(rows_to_table(cols), 0)
    writer.finish()


def test_writer_retries_skipped_and_never_replaces_an_earlier_chunk(tmp_path):
    dest, meta = tmp_path / "l.parquet", {META_CATEGORIES: CATS}
    _writer_rows(dest, [{"image_id": 1, "file_name": "a", "status": "skipped"},
                        {"image_id": 2, "file_name": "b", "status": "ok"}], meta)  # fmt: skip
    writer = PseudoLabelWriter(dest, meta)
    assert writer.open() == {"b"} and writer.retry == {"a"}
    assert writer.known_ids == {"a": 1, "b": 2}
    # An unfinished earlier run left chunk 0; a new chunk for position 0 is another file.
    first = writer.write_chunk(rows_to_table({"image_id": [3], "file_name": ["c"]}), 0)
    second = writer.write_chunk(rows_to_table({"image_id": [1], "file_name": ["a"],
                                               "status": ["ok"]}), 0)  # fmt: skip
    assert first != second and first.exists() and second.exists()
    writer.finish()
    got = sorted((r["file_name"], r["status"]) for r in _rows(dest))
    assert got == [("a", "ok"), ("b", "ok"), ("c", None)]


def test_stable_ids_number_new_images_above_all_and_check_list_ids():
    folder = [{"id": i, "file_name": n, "numbered": True} for i, n in enumerate("abc", 1)]
    assert [r["id"] for r in stable_ids(folder, {"b": 1, "c": 2})] == [3, 1, 2]
    assert [r["id"] for r in stable_ids(folder, {"b": 1}, floor=9)] == [10, 1, 11]
    listed = [{"id": 7, "file_name": "a"}]
    assert stable_ids(listed, {"a": 7})[0]["id"] == 7
    with pytest.raises(DplError, match=r"'a' was written with id 3 but the image list now"):
        stable_ids(listed, {"a": 3})
    with pytest.raises(DplError, match=r"image id 7 of 'a' .* already used by 'z'"):
        stable_ids(listed, {"z": 7})


# ------------------------------------------------------------------ U6 listing


def test_folder_listing_reports_loops_broken_links_and_image_named_folders(tmp_path):
    root = tmp_path / "scan"  # the folder listed; the linked one beside it
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "gone.png").symlink_to("nowhere.png")
    (root / "x.jpg").mkdir()
    Image.new("RGB", (8, 8)).save(root / "x.jpg" / "inner.png")
    (root / "sub").mkdir()
    (root / "sub" / "back").symlink_to("..")
    linked = tmp_path / "linked"
    linked.mkdir()
    Image.new("RGB", (8, 8)).save(linked / "l.png")
    (root / "more").symlink_to(linked)  # a symlinked folder is followed once
    scan = scan_images(root)
    assert [p.relative_to(root).as_posix() for p in scan.files] == [
        "a.png", "more/l.png", "x.jpg/inner.png",
    ]  # fmt: skip
    reasons = {p.name: r for p, r in scan.skipped}
    assert reasons == {
        "loop.jpg": "symbolic link loop",
        "gone.png": "broken symbolic link (its target does not exist)",
        "x.jpg": "a folder named like an image (its files listed)",
        "back": "symlink loop: folder already listed (not followed)",
    }
    assert len(load_image_list(root).skipped) == 4
    with pytest.raises(Exception) as e:
        read_image(root / "loop.jpg")
    assert "symbolic link loop" in str(e.value)


def test_non_utf8_file_names_are_one_line_errors_in_polish(tmp_path, polish_run):
    images, run = polish_run
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    shutil.copy(next(images.glob("*.png")), folder / "ok.png")
    shutil.copy(next(images.glob("*.png")), os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    with pytest.raises(DplError, match=r"caf\\xe9.png: file name is not valid UTF-8"):
        load_image_list(folder)
    out = tmp_path / "l.parquet"
    result = cli("polish", "--images", str(folder), "--run-dir", str(run), "--out", str(out))
    assert isinstance(result.exception, DplError)
    message = str(result.exception)
    assert "caf\\xe9.png: file name is not valid UTF-8" in message and message.isascii()
    assert not out.exists()


# -------------------------------------------------------- Parquet metadata


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (b"dpl.categories", b"[{oops", "does not hold valid JSON"),
        (b"dpl.categories", b'{"id": 1}', r'must be a list of \{"id": <int>, "name": <str>\}'),
        (b"dpl.categories", b'[{"id": "1", "name": "a"}]', "must be a list of"),
        (b"dpl.thresholds", b"[1, 2]", "must be an object of numbers"),
        (b"dpl.teacher_sha256", b"\xff\xfe", "does not hold valid JSON"),
    ],
)
def test_malformed_parquet_metadata_is_a_one_line_error(tmp_path, key, value, message):
    table = rows_to_table({"image_id": [1], "file_name": ["a"], "status": ["ok"]})
    path = tmp_path / "labels.parquet"
    pq.write_table(table.replace_schema_metadata({key: value}), path)
    pattern = rf"labels.parquet: Parquet metadata key '{key.decode(errors='replace')}' {message}"
    with pytest.raises(DplError, match=pattern):
        read_pseudo_labels(path)
    with pytest.raises(DplError, match=pattern):  # a resume reads it too
        PseudoLabelWriter(path, {META_CATEGORIES: CATS}).open()
    for command in (
        ["show", str(tmp_path / "a"), "--labels", str(path)],
        ["report", str(path), "--images", str(tmp_path), "--out", str(tmp_path / "r")],
        ["evaluate", "--pseudo", str(path), "--ann", str(tmp_path / "x.json")],
    ):
        result = cli(*command)
        assert isinstance(result.exception, DplError), (command, result.output)  # fmt: skip


def test_wrong_column_types_and_bad_noise_metadata(tmp_path):
    table = rows_to_table({"image_id": [1], "file_name": ["a"], "status": ["ok"]})
    bad = table.set_column(0, "image_id", pa.array(["one"]))
    pq.write_table(bad, tmp_path / "l.parquet")
    with pytest.raises(DplError, match=r"l.parquet: pseudo-label columns of the wrong type"):
        read_pseudo_labels(tmp_path / "l.parquet")
    from dpl_tools.data.polisher_pairs import META_KEY, PAIR_SCHEMA

    noise = PAIR_SCHEMA.empty_table().replace_schema_metadata({META_KEY: b"{not json"})
    pq.write_table(noise, tmp_path / "n.parquet")
    with pytest.raises(DplError, match=r"n.parquet: Parquet metadata dpl_noise is not JSON"):
        read_noise_metadata(tmp_path / "n.parquet")


# -------------------------------------------------- U3 / U4 conversions


def _voc_xml(filename: str, box: tuple) -> str:
    coords = "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    return (f"<annotation><filename>{filename}</filename><size><width>64</width><height>48"
            f"</height></size><object><name>dog</name><bndbox>{coords}</bndbox></object>"
            "</annotation>")  # fmt: skip


@pytest.fixture
def voc(tmp_path) -> Path:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem in ("good", "broken", "infinite"):
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / "good.xml").write_text(_voc_xml("good.jpg", (2, 2, 20, 20)))
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    (root / "Annotations" / "infinite.xml").write_text(_voc_xml("infinite.jpg", (1, 1, "inf", 9)))
    return root


def test_one_bad_voc_file_is_skipped_listed_and_strict_stops(voc, tmp_path):
    result = convert_voc(voc, progress=False)
    assert [im["file_name"] for im in result.coco.images] == ["good.jpg"]
    problems = dict(result.skipped_files)
    assert set(problems) == {str(voc / "Annotations" / n) for n in ("broken.xml", "infinite.xml")}
    assert problems[str(voc / "Annotations" / "broken.xml")].startswith("not valid XML")
    assert "non-finite box" in problems[str(voc / "Annotations" / "infinite.xml")]
    with pytest.raises(DplError, match=r"broken.xml: not valid XML"):
        convert_voc(voc, progress=False, strict=True)
    out = cli("convert", str(voc), "--out", str(tmp_path / "c.json"))
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "2 file(s) skipped" in text and "broken.xml" in out.output
    assert text.rindex("file(s) skipped") > text.index("wrote")  # the table comes at the end
    assert len(json.loads((tmp_path / "c.json").read_text())["images"]) == 1


@pytest.fixture
def yolo(tmp_path) -> Path:
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("good", "latin", "inf", "badrow", "nolabels"):
        Image.new("RGB", (40, 20)).save(root / "images" / f"{stem}.jpg")
    (root / "labels" / "good.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "labels" / "latin.txt").write_bytes(b"# caf\xe9\n0 0.5 0.5 0.5 0.5\n")
    (root / "labels" / "inf.txt").write_text("0 0.5 0.5 inf 0.5\n")
    (root / "labels" / "badrow.txt").write_text("0 0.5 0.5 0.5 0.5\n0 0.5\n")
    (root / "classes.txt").write_text("thing\n")
    return root


def test_one_bad_yolo_label_file_skips_its_image_not_its_boxes(yolo):
    result = convert_yolo(yolo, progress=False)
    # A bad label file drops the image: kept without boxes it would teach "background".
    assert [im["file_name"] for im in result.coco.images] == ["good.jpg", "nolabels.jpg"]
    problems = {Path(f).name: p for f, p in result.skipped_files}
    assert problems == {
        "latin.txt": "not UTF-8 text (byte 0xe9 at offset 5)",
        "inf.txt": "1: non-finite value in '0 0.5 0.5 inf 0.5'",
        "badrow.txt": "2: expected 'class cx cy w h': a box row needs 5 values, got 2 in '0 0.5'",
    }
    with pytest.raises(DplError, match=r"badrow.txt:2: expected 'class cx cy w h'"):
        convert_yolo(yolo, progress=False, strict=True)


def test_convert_with_nothing_usable_left_fails_and_writes_nothing(tmp_path, voc):
    ann = _write(tmp_path / "ann.json", _coco([_image(1, "a.png"), _image(2, "b.png")],
                                              [_ann(1, 1, [1, 1, 9, 9])]))  # fmt: skip
    empty = tmp_path / "no-images"
    empty.mkdir()
    out = tmp_path / "out.json"
    result = cli("convert", str(ann), "-f", "coco", "--images", str(empty), "--out", str(out))
    assert isinstance(result.exception, DplError)
    assert "no usable image left, nothing written (2 x missing image file (image dropped)" in (
        str(result.exception)
    )
    assert not out.exists()
    # the good file's box (not a cat) and the objects of the two skipped files
    with pytest.raises(DplError, match=r"all 3 boxes of the input were dropped"):
        require_usable(convert("voc", voc, classes=["cat"], progress=False), voc)
    for xml in (voc / "Annotations").glob("*.xml"):
        xml.write_text("<annotation>")
    with pytest.raises(DplError, match=r"no usable image left.*3 file\(s\) skipped"):
        require_usable(convert("voc", voc, progress=False), voc)


def test_a_missing_model_is_named_as_given_or_as_the_run_directorys_teacher(tmp_path):
    """``dpl evaluate --model`` names the missing file a model checkpoint; without
    --model, the run directory's teacher it looked for."""
    ann = _write(tmp_path / "gt.json", {"images": [], "annotations": [], "categories": []})
    given = cli("evaluate", "--model", str(tmp_path / "m.pt"), "--ann", str(ann),
                "--images", str(tmp_path))  # fmt: skip
    assert given.exit_code == 1 and "m.pt: model checkpoint not found" in str(given.exception)
    default = cli("evaluate", "--run-dir", str(tmp_path / "run"), "--ann", str(ann),
                  "--images", str(tmp_path))  # fmt: skip
    assert "teacher.pt: teacher not found (no --model given" in str(default.exception)
