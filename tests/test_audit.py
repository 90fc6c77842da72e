"""dpl audit: planted label mistakes (a dropped box, a swapped class, a shifted box) are
found by out-of-fold detections that see the truth, scored above the clean labels."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.crossfit_detections import detections_table, write_crossfit
from dpl_tools.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Detections = the true boxes (score .9, one image also a low-score stray box); the
    labels: image 0 loses a box, image 1 has a class swapped, image 2 a box shifted by
    60% of its width; the other images are clean."""
    root = tmp_path_factory.mktemp("audit")
    ann = make_synthetic_dataset(root / "data", num_images=6, image_size=(128, 96),
                                 max_objects=3, seed=11)  # fmt: skip
    truth = json.loads(ann.read_text())
    ids, names, boxes, scores, cats = [], [], [], [], []
    for im in truth["images"]:
        for a in (a for a in truth["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            ids.append(im["id"]), names.append(im["file_name"])
            boxes.append([x, y, x + w, y + h]), scores.append(0.9), cats.append(a["category_id"])
    ids.append(truth["images"][3]["id"]), names.append(truth["images"][3]["file_name"])
    boxes.append([0, 0, 3, 3]), scores.append(0.2), cats.append(1)  # below --min-score
    table = detections_table(np.array(ids), names, np.zeros(len(ids)), np.array(boxes),
                             np.array(scores), np.array(cats))  # fmt: skip
    crossfit = write_crossfit(root / "crossfit.parquet", table, {"folds": 1})
    labels = copy.deepcopy(truth)
    first = {im["id"]: [a for a in labels["annotations"] if a["image_id"] == im["id"]]
             for im in labels["images"][:3]}  # fmt: skip
    dropped = first[labels["images"][0]["id"]][0]
    labels["annotations"].remove(dropped)
    swapped = first[labels["images"][1]["id"]][0]
    n_cls = len(labels["categories"])
    swapped["category_id"] = swapped["category_id"] % n_cls + 1
    shifted = first[labels["images"][2]["id"]][0]
    shifted["bbox"][0] += 0.6 * shifted["bbox"][2]
    noisy = root / "labeled.json"
    noisy.write_text(json.dumps(labels))
    return {"root": root, "ann": noisy, "crossfit": crossfit, "dropped": dropped,
            "swapped": swapped, "shifted": shifted}  # fmt: skip


def test_planted_mistakes_are_the_issues_found(planted, tmp_path) -> None:
    out, csv = tmp_path / "audit.parquet", tmp_path / "audit.csv"
    result = CliRunner().invoke(app, ["audit", "--ann", str(planted["ann"]), "--crossfit",
                                      str(planted["crossfit"]), "--out", str(out),
                                      "--csv", str(csv)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 missing, 1 wrong class, 1 misplaced" in result.output
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    by_kind = {r["issue"]: r for r in rows}
    assert len(rows) == 3  # the clean images and the stray low-score box raise nothing
    missing = by_kind["missing"]
    x, y, w, h = planted["dropped"]["bbox"]
    assert [missing[f"suggested_{c}"] for c in ("x1", "y1", "x2", "y2")] == pytest.approx(
        [x, y, x + w, y + h], abs=1e-3)  # fmt: skip
    assert by_kind["wrong_class"]["annotation_id"] == planted["swapped"]["id"]
    assert by_kind["misplaced"]["annotation_id"] == planted["shifted"]["id"]
    assert 0.1 <= by_kind["misplaced"]["iou"] < 0.5
    assert csv.read_text().splitlines()[0].startswith('"issue","score"')
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
