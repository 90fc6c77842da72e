"""Reliability: bad pseudo-label rows, bad checkpoints, the user's environment, dying workers.

Every reader of a pseudo-label Parquet drops unusable rows (NaN / Inf, inverted or empty
boxes) with one warning line, or refuses the file (one line, exit 2); writers never emit
NaN or Infinity; OSErrors are the user's environment (exit 2, naming the path), not defects.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpl_tools.cli.cli import main
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    drop_unusable_rows,
    read_pseudo_labels,
    usable_boxes,
)
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.errors import DplError

BOX = ("x1", "y1", "x2", "y2")
W, H = 96, 64


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _row(image_id, name, teacher, polished=None, label=1, width=W, height=H, **extra):
    polished = teacher if polished is None else polished
    return {
        "image_id": image_id, "file_name": name, "width": width, "height": height,
        "status": "ok", **{f"teacher_{c}": v for c, v in zip(BOX, teacher, strict=True)},
        **{f"polished_{c}": v for c, v in zip(BOX, polished, strict=True)},
        "teacher_label": label, "polished_label": label, "teacher_score": 0.9,
        "polisher_prob": 0.95, "use_cls": True, "use_reg": True, **extra,
    }  # fmt: skip


def _write(path: Path, rows: list[dict], categories: list[dict]) -> Path:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    cols = {k: [r.get(k) for r in rows] for k in keys}
    meta = {META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in categories]}
    pq.write_table(rows_to_table(cols, meta), path)
    return path


@pytest.fixture(scope="module")
def data(module_dir) -> dict:
    """4 images of 96x64; pseudo labels = the truth, plus 4 unusable rows (NaN and Inf
    boxes, an inverted box, a box of width -5) on images 0 and 1."""
    root = module_dir("rows")
    ann = make_synthetic_dataset(root / "data", num_images=4, image_size=(W, H), seed=5)
    coco = json.loads(ann.read_text())
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    good = []
    for im in coco["images"]:
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            good.append(
                _row(im["id"], im["file_name"], (x, y, x + w, y + h), label=a["category_id"])
            )
    im0, im1 = coco["images"][0], coco["images"][1]
    bad = [
        _row(im0["id"], im0["file_name"], (math.nan, 5, 30, 30)),
        _row(im0["id"], im0["file_name"], (5, 5, 30, 30), (5, 5, math.inf, 30)),
        _row(im1["id"], im1["file_name"], (40, 30, 10, 5)),  # inverted
        _row(im1["id"], im1["file_name"], (20, 5, 15, 30)),  # width -5
    ]
    cats = coco["categories"]
    return {
        "root": root,
        "ann": ann,
        "images": ann.parent / "images",
        "coco": coco,
        "cats": cats,
        "good": good,
        "clean": _write(root / "clean.parquet", good, cats),
        "bad": _write(root / "bad.parquet", good + bad, cats),
        "n_bad": len(bad),
        "im0": im0,
    }


def dpl(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the dpl CLI in-process (its ``main``, error mapping included)."""
    monkeypatch.setattr(sys, "argv", ["dpl", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "internal error" not in lines[0], err
    return lines[0]


# D10, D11: unusable rows are dropped and counted (one warning), never written.


def test_usable_boxes_is_the_student_rule():
    boxes = np.array(
        [[1, 1, 5, 5], [np.nan, 1, 5, 5], [1, 1, np.inf, 5], [5, 1, 1, 5], [-9, 1, -1, 5]],
        dtype=np.float32,
    )
    clipped, usable = usable_boxes(boxes, 4, 10)
    assert usable.tolist() == [True, False, False, False, False]
    assert clipped[0].tolist() == [1, 1, 4, 5]
    assert not usable_boxes([[1, 1, 5, 5]], -5, 0)[1].any()  # an image of no size


def test_drop_unusable_rows_keeps_the_images(data):
    table, _ = read_pseudo_labels(data["bad"])
    cleaned, dropped = drop_unusable_rows(table)
    assert dropped == data["n_bad"]
    assert cleaned.num_rows == table.num_rows  # the rows stay, box-less: images still processed
    assert set(cleaned["file_name"].to_pylist()) == set(table["file_name"].to_pylist())
    good, _ = read_pseudo_labels(data["clean"])
    assert cleaned.filter(cleaned["teacher_x1"].is_valid()).num_rows == good.num_rows


def test_report_and_show_drop_bad_rows(data, tmp_path, monkeypatch, capsys):
    code, out, err = dpl(
        monkeypatch, capsys, "report", data["bad"], "--images", data["images"],
        "--ann", data["ann"], "--out", tmp_path / "report",
    )  # fmt: skip
    assert code == 0, err
    warnings = [ln for ln in out.splitlines() if "row(s) dropped" in ln]
    assert len(warnings) == 1 and f"{data['n_bad']} pseudo-label row(s)" in warnings[0], out
    assert (tmp_path / "report" / "index.html").is_file()
    image = data["images"] / data["im0"]["file_name"]
    code, out, err = dpl(
        monkeypatch, capsys, "show", image, "--labels", data["bad"], "--out", tmp_path / "s.png"
    )
    assert code == 0, err
    assert "2 pseudo-label row(s) dropped" in out and (tmp_path / "s.png").is_file()


def _yolo_numbers(folder: Path) -> list[float]:
    values = []
    for txt in folder.rglob("*.txt"):
        if txt.name == "classes.txt":
            continue
        for line in txt.read_text().splitlines():
            values += [float(v) for v in line.split()[1:]]
    return values


def test_polish_export_only_writes_no_nan(data, tmp_path, monkeypatch, capsys):
    labels = tmp_path / "labels.parquet"
    labels.write_bytes(data["bad"].read_bytes())
    for view in ("polished", "teacher"):
        coco_out, yolo_out = tmp_path / f"{view}.json", tmp_path / f"yolo-{view}"
        code, out, err = dpl(
            monkeypatch, capsys, "polish", "--out", labels, "--export-only", "--coco-out",
            coco_out, "--yolo-out", yolo_out, "--coco-view", view,
        )  # fmt: skip
        assert code == 0, err
        assert len([ln for ln in out.splitlines() if "row(s) dropped" in ln]) == 1, out
        coco = _strict_json(coco_out.read_text())
        # a view reads its own box: the Inf polished box's teacher box is usable
        assert len(coco["annotations"]) == len(data["good"]) + (view == "teacher")
        assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in coco["annotations"])
        values = _yolo_numbers(yolo_out)
        assert values and all(0 <= v <= 1 for v in values)  # finite, normalised


def test_export_drops_bad_rows(data, tmp_path, monkeypatch, capsys):
    for fmt in ("coco", "yolo"):
        out_dir = tmp_path / fmt
        code, out, err = dpl(
            monkeypatch, capsys, "export", "--labels", data["bad"], "--labeled", data["ann"],
            "--images", data["images"], "--out", out_dir, "--format", fmt, "--view", "teacher",
        )  # fmt: skip
        assert code == 0, err
        assert len([ln for ln in out.splitlines() if "row(s) dropped" in ln]) == 1, out
        summary = _strict_json((out_dir / "dpl_export.json").read_text())
        assert summary["dropped_rows"] == data["n_bad"] - 1  # the Inf polished box is usable
        if fmt == "coco":
            _strict_json((out_dir / "train.json").read_text())
        else:
            assert all(math.isfinite(v) for v in _yolo_numbers(out_dir / "labels"))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("category", "category id(s) [99]"),
        ("size", "has size -5x0"),
        ("shared_id", "is given to 2 file names"),
    ],
)
def test_corrupt_files_are_refused(data, tmp_path, monkeypatch, capsys, case, expect):
    """A category the file does not list, an image of no size, two images under one id
    (D13: every reader keyed by id would merge their boxes): one line, exit 2."""
    good = data["good"]
    first = good[0]
    if case == "category":
        rows = good + [{**first, "teacher_label": 99, "polished_label": 99}]
    elif case == "size":
        rows = good + [_row(first["image_id"] + 1000, "tiny.png", (1, 1, 2, 2), width=-5, height=0)]
    else:
        other = next(r for r in good if r["file_name"] != first["file_name"])
        rows = good + [{**other, "image_id": first["image_id"]}]
    labels = _write(tmp_path / f"{case}.parquet", rows, data["cats"])
    code, _, err = dpl(
        monkeypatch, capsys, "polish", "--out", labels, "--export-only", "--coco-out",
        tmp_path / "x.json", "--yolo-out", tmp_path / "yolo",
    )  # fmt: skip
    assert code == 2
    line = _one_error_line(err)
    assert str(labels) in line and expect in line, line
    assert not (tmp_path / "x.json").exists()
    if case != "category":  # a reader keyed by id or drawing sizes refuses it too
        with pytest.raises(DplError, match=expect.replace("(", r"\(").replace("[", r"\[")):
            read_pseudo_labels(labels)


# D12: evaluate --pseudo scores only usable rows.


def test_evaluate_pseudo_leaves_bad_rows_out(data, tmp_path, monkeypatch, capsys):
    results = {}
    for name in ("clean", "bad"):
        json_out = tmp_path / f"{name}.json"
        code, out, err = dpl(
            monkeypatch, capsys, "evaluate", "--ann", data["ann"], "--pseudo", data[name],
            "--json", json_out,
        )  # fmt: skip
        assert code == 0, err
        results[name] = (_strict_json(json_out.read_text()), out)
    (clean, clean_out), (bad, bad_out) = results["clean"], results["bad"]
    assert "row(s) dropped" not in clean_out
    assert len([ln for ln in bad_out.splitlines() if "row(s) dropped" in ln]) == 1, bad_out
    assert bad["unusable_rows"] == data["n_bad"] and clean["unusable_rows"] == 0
    assert bad["views"] == clean["views"] and bad["box_quality"] == clean["box_quality"]


# D16, D19: checkpoints.


@pytest.fixture(scope="module")
def checkpoint(module_dir, data) -> Path:
    from dpl_tools.models.checkpoint import DetectorSpec, save_detector
    from dpl_tools.models.detector import build_detector

    cats = data["cats"]
    model = build_detector("mobilenet_v2_fpn", len(cats), "none", 64, 96)
    path = module_dir("ckpt") / "teacher.pt"
    save_detector(path, model, DetectorSpec("mobilenet_v2_fpn", cats, 64, 96))
    return path


def test_out_of_range_build_option_is_refused(checkpoint, data, tmp_path, monkeypatch, capsys):
    import torch

    from dpl_tools.models.checkpoint import read_checkpoint

    payload = torch.load(checkpoint, weights_only=True)
    payload["build"]["rpn_pre_nms_top_n_test"] = -1
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(DplError, match="rpn_pre_nms_top_n_test: must be >= 1"):
        read_checkpoint(bad)
    code, _, err = dpl(
        monkeypatch, capsys, "evaluate", "--ann", data["ann"], "--images", data["images"],
        "--model", bad, "--device", "cpu",
    )  # fmt: skip
    assert code == 2
    assert str(bad) in _one_error_line(err) and "rpn_pre_nms_top_n_test" in err
    payload["build"] = {"rpn_pre_nms_top_n_tset": 5}  # a typo: unknown key
    torch.save(payload, bad)
    with pytest.raises(DplError, match="unknown key build.rpn_pre_nms_top_n_tset"):
        read_checkpoint(bad)


def test_raw_pickle_checkpoint_is_one_line(data, tmp_path):
    import pickle
    import subprocess

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "x": {1, 2}}, protocol=4))
    done = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "evaluate", "--ann", str(data["ann"]), "--images",
         str(data["images"]), "--model", str(raw), "--device", "cpu"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert str(raw) in _one_error_line(done.stderr)
    assert "Warning" not in done.stderr


# D17: the user's environment is exit 2 with one line naming the path.


def test_output_under_a_file_is_a_user_error(data, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, _, err = dpl(
        monkeypatch, capsys, "polish", "--out", data["clean"], "--export-only", "--coco-out",
        blocker / "x.json",
    )  # fmt: skip
    assert code == 2
    assert str(blocker) in _one_error_line(err)
    code, _, err = dpl(
        monkeypatch, capsys, "report", data["clean"], "--images", data["images"], "--out",
        blocker / "report",
    )  # fmt: skip
    assert code == 2 and str(blocker) in _one_error_line(err)


def _limited(limit_bytes: int):
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_file_size_limit_is_a_user_error(data, tmp_path):
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "big.json"
    done = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "polish", "--out", str(data["clean"]),
         "--export-only", "--coco-out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=300, preexec_fn=_limited(200),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done.stderr)
    assert f"{out}: File too large" in line, line
    assert not out.exists()
    # torch.save's short write ("unexpected pos N vs M") names the checkpoint
    script = (
        "import torch\n"
        "from dpl_tools.models.checkpoint import write_payload\n"
        "from dpl_tools.errors import DplError\n"
        "try:\n"
        f"    write_payload({str(tmp_path / 'x.pt')!r}, 'dpl-detector', 1, "
        "{'w': torch.zeros(100000)})\n"
        "except DplError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True,
        timeout=300, preexec_fn=_limited(4096),
    )  # fmt: skip
    assert done.stdout.startswith(f"{tmp_path / 'x.pt'}: cannot write the checkpoint"), done
    assert not list(tmp_path.glob("*.pt*"))


def test_train_checks_its_output_before_training(data, tmp_path, monkeypatch, capsys):
    from dpl_tools.engine.loop import check_writable

    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(DplError, match="cannot write the checkpoint there"):
        check_writable(blocker / "teacher.pt")
    with pytest.raises(DplError, match="is a folder"):
        check_writable(tmp_path)
    check_writable(tmp_path / "new" / "teacher.pt")  # a folder it can make is fine
    assert not [p for p in (tmp_path / "new").iterdir()]  # the probe is gone
    code, _, err = dpl(
        monkeypatch, capsys, "train-teacher", "--ann", data["ann"], "--images", data["images"],
        "--out", tmp_path, "--iters", "100000", "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    assert code == 2 and str(tmp_path) in _one_error_line(err)


# D7: a DataLoader worker that dies or cannot send its batch ends the run.


class _FailingImages:
    """A dataset whose worker dies (SIGKILL), fails (as out of shared memory) or hangs."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        import os
        import signal
        import time

        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.how == "shm":
            raise RuntimeError("unable to write to file </torch_1_0>: No space left on device")
        time.sleep(60)


@pytest.mark.parametrize("how", ["kill", "shm", "hang"])
def test_worker_failure_ends_the_run(how, monkeypatch):
    from dpl_tools.engine import inference

    monkeypatch.setattr(inference, "WORKER_TIMEOUT_S", 3.0)
    loader = inference.image_loader(_FailingImages(how), 2, 1, list, False)
    with pytest.raises(DplError, match="--workers 0") as e:
        list(inference.worker_batches(loader, "images/"))
    assert "\n" not in str(e.value) and "DataLoader worker failed" in str(e.value)


def test_predict_detections_worker_killed(data, monkeypatch):
    import os
    import signal

    import torch

    from dpl_tools.engine import inference

    def die(path):
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(inference, "image_tensor", die)
    records = [{"id": 1, "file_name": data["im0"]["file_name"]}]
    stream = inference.predict_detections(
        torch.nn.Identity(), records, data["images"], batch_size=1, workers=1
    )
    with pytest.raises(DplError, match="rerun with --workers 0"):
        list(stream)


def test_json_writers_never_emit_nan_or_infinity(tmp_path):
    """write_json and the Parquet metadata write strict JSON: non-finite floats become null."""
    import math

    from dpl_tools.data.pseudo_labels import encode_metadata
    from dpl_tools.io import write_json

    out = tmp_path / "figures.json"
    write_json(out, {"loss": math.nan, "ap": [0.5, math.inf, -math.inf], "n": 3})
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "ap": [0.5, None, None], "n": 3}
    meta = encode_metadata({"dpl:thresholds": {"cls_prob": math.nan}})
    assert json.loads(meta[b"dpl:thresholds"]) == {"cls_prob": None}
