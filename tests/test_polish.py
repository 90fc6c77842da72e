"""dpl polish end to end: schema and metadata, bad images, shards, COCO input, exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.image_list import shard_of, shard_records
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    META_POLISHER,
    META_TEACHER,
    META_THRESHOLDS,
    SCHEMA,
    read_pseudo_labels,
)
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import Polisher, save_polisher

# Fast test settings: boxes exist with a random teacher, few per image.
FAST = ["--initial-threshold", "0.0", "--max-dets", "3", "--workers", "0", "--device", "cpu"]


def make_run(root: Path, num_images: int = 8) -> tuple[Path, Path]:
    """Tiny synthetic images plus an untrained teacher and polisher in ``root/run``.

    Returns (images folder, run dir).
    """
    ann = make_synthetic_dataset(root / "data", num_images=num_images, image_size=(80, 64), seed=1)
    categories = json.loads(ann.read_text())["categories"]
    run = root / "run"
    torch.manual_seed(0)
    teacher = build_detector(
        "mobilenet_v2_fpn", len(categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
    )  # fmt: skip
    spec = DetectorSpec("mobilenet_v2_fpn", categories, 64, 96)
    save_detector(run / "teacher.pt", teacher, spec)
    polisher = Polisher(num_classes=len(categories))
    save_polisher(
        run / "polisher.pt", polisher, teacher_path=run / "teacher.pt", categories=categories
    )
    return ann.parent / "images", run


def _rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def invoke(*args: str, env: dict | None = None):
    result = CliRunner().invoke(app, ["polish", *args], env=env)
    return result


@pytest.fixture(scope="module")
def run_setup(module_dir) -> tuple[Path, Path]:
    return make_run(module_dir("polish"))


def test_schema_metadata_bad_images_and_exports(run_setup, tmp_path):
    images, run = run_setup
    folder = tmp_path / "unlabeled"
    shutil.copytree(images, folder / "sub")
    (folder / "zero.jpg").write_bytes(b"")
    good = sorted((folder / "sub").glob("*.png"))[0].read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "labels.parquet"
    result = invoke(
        "--images", str(folder), "--out", str(out), "--run-dir", str(run),
        "--coco-out", str(tmp_path / "pseudo.json"), "--yolo-out", str(tmp_path / "yolo"),
        "--coco-view", "teacher", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "zero.jpg" in result.output and "truncated.png" in result.output

    file = pq.ParquetFile(out)
    assert file.schema_arrow.remove_metadata().equals(SCHEMA)
    table, meta = read_pseudo_labels(out)
    assert meta[META_TEACHER] == sha256_file(run / "teacher.pt")
    assert meta[META_POLISHER] == sha256_file(run / "polisher.pt")
    assert [c["name"] for c in meta[META_CATEGORIES]] == ["square", "disc", "triangle"]
    assert meta[META_THRESHOLDS]["initial"] == 0.0 and meta[META_THRESHOLDS]["cls_prob"] == 0.9
    rows = table.to_pylist()
    names = {r["file_name"] for r in rows}
    assert len(names) == 10 and "sub/synth_00000.png" in names
    skipped = {r["file_name"]: r["error"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {"zero.jpg", "truncated.png"}
    assert "empty" in skipped["zero.jpg"]
    boxes = [r for r in rows if r["status"] == "ok"]
    assert len(boxes) == 8 * 3  # 3 teacher boxes per image with --max-dets 3
    for r in boxes:
        assert 0 <= r["polished_x1"] <= r["polished_x2"] <= r["width"]
        assert r["use_reg"] and r["teacher_score"] >= 0.0
        assert r["use_cls"] == (r["polisher_prob"] >= 0.9 or r["teacher_score"] > 0.9)
        assert r["polisher_label"] in (1, 2, 3)  # the polisher's own class, kept or not
        relabel = r["polisher_prob"] >= 0.9 and r["teacher_score"] < 0.9
        assert r["polished_label"] == (r["polisher_label"] if relabel else r["teacher_label"])

    coco = json.loads((tmp_path / "pseudo.json").read_text())
    assert len(coco["images"]) == 8 and len(coco["annotations"]) == 24
    assert len(list((tmp_path / "yolo" / "sub").glob("*.txt"))) == 8

    again = invoke("--images", str(folder), "--out", str(out), "--run-dir", str(run), *FAST)
    assert again.exit_code == 0 and "retried 2 image(s)" in again.output  # only the unreadable
    assert sorted(map(str, _rows_of(out))) == sorted(map(str, rows))  # same rows, none twice
    strict = invoke(
        "--images", str(folder), "--out", str(tmp_path / "s.parquet"), "--run-dir", str(run),
        "--strict", *FAST,
    )  # fmt: skip
    assert strict.exit_code == 1
    assert not (tmp_path / "s.parquet").exists()


def test_shards_and_ranks_partition_the_images(run_setup, tmp_path):
    images, run = run_setup
    out = tmp_path / "parts"
    common = ["--images", str(images), "--out", str(out), "--run-dir", str(run), *FAST]
    assert invoke(*common, "--shard", "0/2").exit_code == 0
    # The second half as torchrun rank 1 of 2 would run it.
    rank1 = invoke(*common, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert rank1.exit_code == 0, rank1.output
    assert sorted(p.name for p in out.iterdir()) == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    parts = [pq.read_table(p)["file_name"].to_pylist() for p in sorted(out.iterdir())]
    assert set(parts[0]).isdisjoint(parts[1])
    dataset = ds.dataset(out, format="parquet").to_table()
    table, _ = read_pseudo_labels(out)
    assert dataset.num_rows == table.num_rows == 8 * 3
    assert sorted(set(table["file_name"].to_pylist())) == sorted(p.name for p in images.iterdir())
    export = invoke("--out", str(out), "--export-only", "--coco-out", str(tmp_path / "all.json"))
    assert export.exit_code == 0, export.output
    assert len(json.loads((tmp_path / "all.json").read_text())["images"]) == 8
    # a run with another shard count into the same folder would label images twice
    three = invoke(*common, "--shard", "0/3")
    assert three.exit_code == 1 and "a run with 2 shard(s); this one has 3" in str(three.exception)
    assert len(list(out.iterdir())) == 2
    # ... and such parts, put there by hand, are refused when read, not read twice
    import shutil

    shutil.copy(out / "part-00001-of-00002.parquet", out / "part-00000-of-00003.parquet")
    with pytest.raises(DplError, match="different shard counts \\(2, 3\\)"):
        read_pseudo_labels(out)
    (out / "part-00000-of-00003.parquet").rename(out / "part-00002-of-00002.parquet")
    with pytest.raises(DplError, match="is in more than one part file"):
        read_pseudo_labels(out)
    # ... and parts of another teacher (their images renamed apart)
    table = pq.read_table(out / "part-00002-of-00002.parquet")
    names = pa.array([f"other_{n}" for n in table["file_name"].to_pylist()])
    meta = dict(table.schema.metadata)
    meta[META_TEACHER.encode()] = json.dumps("0" * 64).encode()
    table = table.set_column(table.schema.get_field_index("file_name"), "file_name", names)
    pq.write_table(table.replace_schema_metadata(meta), out / "part-00002-of-00002.parquet")
    with pytest.raises(DplError, match="written by another run than .*its teacher_sha256 differ"):
        read_pseudo_labels(out)


def test_shards_started_as_the_folder_grows_give_each_image_its_own_id(run_setup, tmp_path):
    """Each shard numbers its own folder images apart from the others' (shard I of N:
    I+1, I+1+N, ...): shard 1 runs, images are added, shard 0 runs, shard 1 resumes; every
    image has one id, and the parts export as one set."""
    images, run = run_setup
    folder = tmp_path / "unlabeled"
    shutil.copytree(images, folder)
    out = tmp_path / "parts"
    common = ["--images", str(folder), "--out", str(out), "--run-dir", str(run), *FAST]
    assert invoke(*common, "--shard", "1/2").exit_code == 0
    first = read_pseudo_labels(out)[0]
    assert {i % 2 for i in first["image_id"].to_pylist()} == {0}  # shard 1's ids: 2, 4, ...
    png = next(folder.glob("*.png")).read_bytes()
    added = [f"added_{i}.png" for i in range(10)]
    for name in added:  # new images for both shards
        (folder / name).write_bytes(png)
    assert {shard_of(n, 2) for n in added} == {0, 1}
    assert invoke(*common, "--shard", "0/2").exit_code == 0
    assert invoke(*common, "--shard", "1/2").exit_code == 0  # resumes: the new images
    table, _ = read_pseudo_labels(out)
    ids = {}
    for name, image_id in zip(table["file_name"].to_pylist(), table["image_id"].to_pylist(),
                              strict=True):  # fmt: skip
        assert ids.setdefault(name, image_id) == image_id
    assert len(ids) == len(list(folder.iterdir())) and len(set(ids.values())) == len(ids)
    assert {ids[n] for n in first["file_name"].to_pylist()} == set(first["image_id"].to_pylist())
    export = invoke("--out", str(out), "--export-only", "--coco-out", str(tmp_path / "all.json"))
    assert export.exit_code == 0, export.output


def test_shards_stay_put_when_the_folder_grows():
    """A shard started after images were added never takes an image another shard had:
    the shards of a growing list still polish each image once."""
    before = [{"id": i, "file_name": f"img_{i:03d}.jpg"} for i in range(200)]
    after = sorted(before + [{"id": 0, "file_name": f"new_{i}.jpg"} for i in range(37)],
                   key=lambda r: r["file_name"])  # fmt: skip
    for count in (2, 3, 4):
        shards = [shard_records(before, k, count) for k in range(count)]
        names = [r["file_name"] for shard in shards for r in shard]
        assert sorted(names) == sorted(r["file_name"] for r in before)  # a partition
        assert min(len(s) for s in shards) > 200 / count * 0.6  # roughly balanced
        for k in range(count):  # shard k of the grown list = old shard k + some new images
            grown = {r["file_name"] for r in shard_records(after, k, count)}
            assert {r["file_name"] for r in shards[k]} <= grown
            assert all(n.startswith("new_") for n in grown - {r["file_name"] for r in shards[k]})


def test_coco_json_image_list_with_image_root(run_setup, tmp_path):
    images, run = run_setup
    ann = json.loads((images.parent / "annotations.json").read_text())
    image_list = tmp_path / "unlabeled.json"
    image_list.write_text(json.dumps({"images": ann["images"][:3]}))
    out = tmp_path / "labels.parquet"
    result = invoke(
        "--images", str(image_list), "--image-root", str(images), "--out", str(out),
        "--run-dir", str(run), *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table, _ = read_pseudo_labels(out)
    assert sorted(set(table["image_id"].to_pylist())) == [a["id"] for a in ann["images"][:3]]
    empty_run = ["--run-dir", str(tmp_path / "empty-run")]
    missing = invoke("--images", str(image_list), "--out", str(out), *empty_run, *FAST)
    assert missing.exit_code == 1 and "teacher not found" in str(missing.exception)


def test_evaluate_pseudo_compares_teacher_and_polished_views(tmp_path):
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 40, 40],
                "iscrowd": 0,
                "area": 1600,
            },
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    row = {
        "image_id": 1, "file_name": "a.png", "width": 100, "height": 80, "status": "ok",
        "teacher_x1": 14.0, "teacher_y1": 14.0, "teacher_x2": 54.0, "teacher_y2": 54.0,
        "teacher_label": 1, "teacher_score": 0.8, "polished_x1": 10.0, "polished_y1": 10.0,
        "polished_x2": 50.0, "polished_y2": 50.0, "polished_label": 1, "polisher_prob": 0.95,
        "use_cls": True, "use_reg": True,
    }  # fmt: skip
    pq.write_table(rows_to_table({k: [v] for k, v in row.items()}), tmp_path / "p.parquet")
    result = CliRunner().invoke(
        app,
        ["evaluate", "--pseudo", str(tmp_path / "p.parquet"), "--ann", str(tmp_path / "gt.json"),
         "--json", str(tmp_path / "q.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Pseudo-label quality" in result.output
    figures = json.loads((tmp_path / "q.json").read_text())
    assert figures["views"]["reg"]["mean_iou"] == pytest.approx(1.0)
    assert figures["views"]["teacher"]["mean_iou"] < 0.75
    assert figures["box_quality"]["improved_fraction"] == 1.0
