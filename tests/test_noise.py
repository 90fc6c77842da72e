"""Pair synthesis: noise statistics, the 0.7 label rule, degenerate boxes, Parquet, CLI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.ops import box_iou
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.noise_models import EmpiricalNoise, GaussianNoise
from dpl_tools.data.polisher_pairs import (
    GroundTruth,
    PairSettings,
    read_noise_metadata,
    synthesize_pairs,
)
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector


def _gt(boxes_per_image: list[list[tuple]], labels: list[list[int]]) -> GroundTruth:
    starts = np.cumsum([0] + [len(b) for b in boxes_per_image])
    return GroundTruth(
        np.arange(1, len(boxes_per_image) + 1),
        starts,
        np.array([b for img in boxes_per_image for b in img], np.float32).reshape(-1, 4),
        np.array([lab for img in labels for lab in img], np.int32),
    )


def _all(tables) -> pa.Table:
    return pa.concat_tables(list(tables))


def test_gaussian_offsets_have_std_s_w_and_s_h():
    gt = _gt([[(100, 100, 300, 200)]], [[1]])  # w = 200, h = 100
    settings = PairSettings(reg_copies=20000, reg_scale=0.1, cls_copies=[0], cls_scales=[0.1])
    t = _all(synthesize_pairs(gt, GaussianNoise(), settings, seed=3))
    reg = t.filter(pa.compute.equal(t["kind"], "reg"))
    noisy = reg.filter(pa.compute.greater(reg["scale"], 0))
    off = np.stack([noisy[c].to_numpy() for c in ("x1", "y1", "x2", "y2")], 1) - [
        100,
        100,
        300,
        200,
    ]
    np.testing.assert_allclose(off.std(axis=0), [20, 10, 20, 10], rtol=0.03)
    np.testing.assert_allclose(off.mean(axis=0), 0, atol=0.5)
    exact = reg.filter(pa.compute.equal(reg["scale"], 0)).to_pylist()  # the GT itself
    assert len(exact) == 1 and exact[0]["iou"] == 1.0 and exact[0]["group"] == -1


def test_labels_follow_the_07_rule_targets_are_best_gt_and_degenerate_boxes_drop():
    boxes = [[(10, 10, 50, 40), (30, 20, 90, 70), (5, 60, 25, 95)], [(0, 0, 40, 40)]]
    gt = _gt(boxes, [[1, 2, 3], [2]])
    settings = PairSettings(reg_copies=300, reg_scale=0.5, cls_copies=[200, 200])
    t = _all(synthesize_pairs(gt, GaussianNoise(), settings, seed=0, max_cells=2000))
    rows = t.to_pydict()
    noisy = np.stack([rows[c] for c in ("x1", "y1", "x2", "y2")], 1)
    target = np.stack([rows[f"target_{c}"] for c in ("x1", "y1", "x2", "y2")], 1)
    assert ((noisy[:, 2] > noisy[:, 0]) & (noisy[:, 3] > noisy[:, 1])).all()
    per_kind = {k: rows["kind"].count(k) for k in ("reg", "cls")}
    # x2 - x1 ~ w + N(0, 2 (s w)^2): P(kept per axis) = Phi(1 / (s sqrt 2)) = 0.9214 at s = 0.5
    kept = 0.9214**2
    assert abs(per_kind["reg"] - (4 + 1200 * kept)) < 4 * np.sqrt(1200 * kept * (1 - kept))
    assert 1600 < per_kind["cls"] <= 4 * 401  # s = 0.06 / 0.2 copies are hardly ever degenerate
    label, iou, image = np.array(rows["label"]), np.array(rows["iou"]), np.array(rows["image_id"])
    for k, img_boxes in enumerate(boxes):
        sel = image == k + 1
        gt_t = torch.tensor(img_boxes, dtype=torch.float32)
        ious = box_iou(torch.from_numpy(noisy[sel]), gt_t)
        best_iou, best = ious.max(dim=1)
        np.testing.assert_allclose(iou[sel], best_iou.numpy(), atol=1e-5)
        np.testing.assert_allclose(target[sel], gt_t[best].numpy())
        is_cls = np.array(rows["kind"])[sel] == "cls"
        gt_labels = np.array(gt.labels[gt.starts[k] : gt.starts[k + 1]])[best.numpy()]
        expected = np.where(best_iou.numpy() >= 0.7, gt_labels, 0)
        np.testing.assert_array_equal(label[sel][is_cls], expected[is_cls])
    cls_label = label[np.array(rows["kind"]) == "cls"]
    assert (cls_label == 0).any() and (cls_label > 0).any()


def test_rounds_are_independent_and_seeded_and_chunking_does_not_matter():
    gt = _gt([[(10, 10, 50, 40)], [(0, 0, 40, 40), (20, 20, 60, 60)]], [[1], [2, 1]])
    settings = PairSettings(reg_copies=10, cls_copies=[5, 5])
    a = _all(synthesize_pairs(gt, GaussianNoise(), settings, rounds=2, seed=1))
    b = _all(synthesize_pairs(gt, GaussianNoise(), settings, rounds=2, seed=1, max_cells=10))
    assert a.equals(b)
    r0 = a.filter(pa.compute.equal(a["round"], 0))["x1"].to_numpy()
    r1 = a.filter(pa.compute.equal(a["round"], 1))["x1"].to_numpy()
    assert len(r0) == len(r1) and not np.allclose(r0, r1)


def test_empirical_noise_resamples_fitted_offsets_by_score():
    confident = np.tile([[0.01, -0.02, 0.03, 0.0]], (20, 1))
    low = np.tile([[0.2, 0.2, -0.1, 0.1]], (20, 1))
    model = EmpiricalNoise(
        np.concatenate([confident, low]),
        np.full(40, 50.0),
        np.r_[np.full(20, 0.9), np.full(20, 0.1)],
        np.full(40, 0.8),
    )
    gt = _gt([[(0, 0, 100, 50)]], [[1]])
    settings = PairSettings(reg_copies=30, cls_copies=[30, 30], include_gt=False)
    t = _all(synthesize_pairs(gt, model, settings)).to_pydict()
    noisy = np.stack([t[c] for c in ("x1", "y1", "x2", "y2")], 1)
    kind, group = np.array(t["kind"]), np.array(t["group"])
    strict = (kind == "reg") | (group == 0)
    np.testing.assert_allclose(
        noisy[strict], np.tile([1, -1, 103, 50], (strict.sum(), 1)), atol=1e-4
    )
    loose = {tuple(np.round(b, 3)) for b in noisy[~strict]}
    assert loose == {(1, -1, 103, 50), (20, 10, 90, 55)}  # low-score errors join cls group 1
    assert model.describe()["confident_detections"] == 20


def _tiny_teacher(tmp_path, categories):
    torch.manual_seed(0)
    teacher = build_detector(
        "mobilenet_v2_fpn", len(categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
    )  # fmt: skip
    path = tmp_path / "teacher.pt"
    save_detector(path, teacher, DetectorSpec("mobilenet_v2_fpn", categories, 64, 96))
    return path


def test_cli_writes_row_groups_metadata_and_summary(synth_dataset, tmp_path):
    out = tmp_path / "noise.parquet"
    args = ["synth-noise", "--ann", str(synth_dataset), "--out", str(out), "--rounds", "2",
            "--reg-copies", "30", "--cls-copies", "10,10", "--seed", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "reg" in result.output and "cls" in result.output and "mean" in result.output
    meta = read_noise_metadata(out)
    assert meta["rounds"] == 2 and meta["settings"]["cls_scales"] == [0.06, 0.2]
    assert meta["noise"]["model"] == "gaussian"
    assert [c["name"] for c in meta["categories"]] == ["square", "disc", "triangle"]
    file = pq.ParquetFile(out)
    assert file.metadata.num_row_groups >= 2  # rounds never share a row group
    for g in range(file.metadata.num_row_groups):
        assert len(set(file.read_row_group(g, columns=["round"])["round"].to_pylist())) == 1
    t = file.read()
    assert set(t["round"].to_pylist()) == {0, 1}
    assert set(t["scale"].to_pylist()) <= {0.0, np.float32(0.06), np.float32(0.2)}

    bad = CliRunner().invoke(app, [*args[:5], "--cls-scales", "0.1"])
    assert bad.exit_code == 1 and "same length" in str(bad.exception)
    warn = CliRunner().invoke(
        app,
        ["synth-noise", "--ann", str(synth_dataset), "--out", str(tmp_path / "emp.parquet"),
         "--rounds", "1", "--reg-copies", "5", "--cls-copies", "3,3", "--noise-model",
         "empirical", "--teacher", str(_tiny_teacher(tmp_path, meta["categories"])),
         "--images", str(synth_dataset.parent / "images"), "--device", "cpu", "--workers", "0",
         "--config", str(_loose_match_config(tmp_path))],
    )  # fmt: skip
    assert warn.exit_code == 0, warn.output
    assert "understate" in warn.output and "empirical noise:" in warn.output
    assert read_noise_metadata(tmp_path / "emp.parquet")["noise"]["model"] == "empirical"


def _loose_match_config(tmp_path):
    """An untrained teacher's boxes barely overlap the truth: accept any overlap."""
    path = tmp_path / "loose.yaml"
    path.write_text(
        "polisher:\n  empirical_min_match_iou: 0.01\n  empirical_reg_min_score: 0.0\n"
        "  empirical_cls_min_score: 0.0\n"
    )
    return path


def test_bad_noise_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("nope")
    with pytest.raises(DplError, match="not a readable Parquet file"):
        read_noise_metadata(bad)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(DplError, match="not a dpl noise file"):
        read_noise_metadata(plain)
    with pytest.raises(DplError, match="noise file not found"):
        read_noise_metadata(tmp_path / "missing.parquet")
