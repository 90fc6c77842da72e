"""`dpl audit` on planted errors (issue #24), with cleanlab's per-box scores beside it.

A copy of a labeled set gets known mistakes: 5% of its boxes dropped (missing), 5% given
another class (wrong class) and 5% shifted by 30% of their size (misplaced), three disjoint
draws. A teacher and cross-fitting run on the corrupted copy (`dpl train-teacher`, `dpl
synth-noise --noise-model crossfit`: the fold teachers train on the mistakes, as a user's
would), then `dpl audit` ranks the issues. For each kind, with K the number planted:
precision of the audit's top K of that kind (a hit: a missing flag whose box has IoU >= 0.5
with a dropped box; a wrong-class or misplaced flag on an annotation that was swapped or
shifted) and the recall it gives.
The original labels have their own mistakes (BCCD is known to leave cells unlabeled), which
count as misses here: the figures are a lower bound. The top-K missing-box flags that match
neither a planted drop nor any original box are counted and drawn (`missing-unplanted.png`
in the output folder), so a person can check whether an unlabeled object is there.

cleanlab (`cleanlab.object_detection.rank`, a benchmark only, not a dependency) scores the
same out-of-fold detections: its overlooked / swap / badloc box scores, lowest first, are
ranked the same way. Run it where cleanlab imports (`--python` of a venv holding it).

    python benchmarks/audit_planted.py --dataset demo --out benchmarks/out/audit
    python benchmarks/audit_planted.py --dataset bccd10 --out benchmarks/out/audit
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpl_tools.data.crossfit_detections import read_crossfit_detections  # noqa: E402
from dpl_tools.demo import prepare_demo_data  # noqa: E402
from dpl_tools.evaluation.matching import box_iou_np  # noqa: E402

WEIGHTS = (ROOT / "../shared/weights/mobilenet_v2-b0353104.pth").resolve()
BCCD = (ROOT / "../shared/data/bccd").resolve()
KINDS = ("missing", "wrong_class", "misplaced")
SHIFT = 0.3  # of the box's width / height


def dpl(*args: str | Path) -> None:
    """Run one dpl command (the installed CLI of this interpreter)."""
    subprocess.run([sys.executable, "-m", "dpl_tools.cli", *map(str, args)], check=True)


def xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def plant_errors(coco: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """A corrupted copy of ``coco`` and what was planted: dropped boxes (image id, xyxy,
    class), swapped and shifted annotation ids; three disjoint draws of ``fraction``."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(coco)
    anns = [a for a in out["annotations"] if not a.get("iscrowd")]
    n = max(1, round(fraction * len(anns)))
    order = rng.permutation(len(anns))
    drop, swap, shift = (order[i * n : (i + 1) * n] for i in range(3))
    cats = [c["id"] for c in out["categories"]]
    sizes = {im["id"]: (im["width"], im["height"]) for im in out["images"]}
    planted: dict = {"missing": [], "wrong_class": [], "misplaced": []}
    for i in swap:
        a = anns[i]
        a["category_id"] = int(rng.choice([c for c in cats if c != a["category_id"]]))
        planted["wrong_class"].append(a["id"])
    for i in shift:
        a = anns[i]
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        dx, dy = SHIFT * w * rng.choice([-1, 1]), SHIFT * h * rng.choice([-1, 1])
        x = float(np.clip(x + dx, 0, width - w))
        y = float(np.clip(y + dy, 0, height - h))
        a["bbox"] = [x, y, w, h]
        planted["misplaced"].append(a["id"])
    dropped = {anns[i]["id"] for i in drop}
    for a in anns:
        if a["id"] in dropped:
            planted["missing"].append({"image_id": a["image_id"], "box": xyxy(a["bbox"]),
                                       "category_id": a["category_id"]})  # fmt: skip
    out["annotations"] = [a for a in out["annotations"] if a["id"] not in dropped]
    return out, planted


def hits_at_k(ranked: list[dict], planted: dict, kind: str) -> dict:
    """Precision and recall of the first K flags of ``kind`` (K = how many were planted)."""
    k = len(planted[kind])
    top = [r for r in ranked if r["issue"] == kind][:k]
    if kind == "missing":
        found = set()
        for r in top:
            for j, p in enumerate(planted["missing"]):
                if p["image_id"] == r["image_id"] and j not in found:
                    if box_iou_np(np.array([r["box"]]), np.array([p["box"]]))[0, 0] >= 0.5:
                        found.add(j)
                        break
        hits = len(found)
    else:
        hits = len({r["annotation_id"] for r in top} & set(planted[kind]))
    # with K flags, precision and recall coincide; fewer flags than K: precision is higher
    return {"planted": k, "flagged": len(top), "hits": hits,
            "precision_at_k": hits / len(top) if top else None,
            "recall_at_k": hits / k if k else None}  # fmt: skip


def unplanted_missing(ranked: list[dict], planted: dict, coco: dict) -> list[dict]:
    """The top-K missing-box flags that hit no planted drop and no box of the original
    labels either (IoU < 0.5 to all): objects the original annotators left out, or false
    alarms; ``missing_flags_gallery`` draws them so a person can tell which."""
    k = len(planted["missing"])
    boxes: dict[int, list[list[float]]] = {}
    for a in coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(xyxy(a["bbox"]))
    out = []
    for r in [r for r in ranked if r["issue"] == "missing"][:k]:
        known = boxes.get(r["image_id"], []) + [
            p["box"] for p in planted["missing"] if p["image_id"] == r["image_id"]
        ]
        if not known or box_iou_np(np.array([r["box"]]), np.array(known)).max() < 0.5:
            out.append(r)
    return out


def missing_flags_gallery(flags: list[dict], coco: dict, images: Path, out: Path) -> None:
    """A PNG of 240 px crops around ``flags`` (red) with the labels given to the audit
    (green), for checking by eye whether an object is there."""
    from PIL import Image, ImageDraw

    names = {im["id"]: im["file_name"] for im in coco["images"]}
    tiles = []
    for i, r in enumerate(flags):
        image = Image.open(images / names[r["image_id"]]).convert("RGB")
        draw = ImageDraw.Draw(image)
        for a in coco["annotations"]:
            if a["image_id"] == r["image_id"]:
                draw.rectangle(xyxy(a["bbox"]), outline=(0, 255, 0), width=2)
        draw.rectangle(r["box"], outline=(255, 0, 0), width=4)
        cx, cy = (r["box"][0] + r["box"][2]) / 2, (r["box"][1] + r["box"][3]) / 2
        tile = image.crop((int(cx - 120), int(cy - 120), int(cx + 120), int(cy + 120)))
        ImageDraw.Draw(tile).text((4, 4), f"{i} {names[r['image_id']]}", fill=(255, 255, 0))
        tiles.append(tile)
    columns = 5
    grid = Image.new("RGB", (240 * columns, 240 * max(1, -(-len(tiles) // columns))))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * 240, (i // columns) * 240))
    grid.save(out)


def dpl_ranking(audit_parquet: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(audit_parquet).to_pylist()
    for r in rows:  # a missing box is the detection, the suggested box; others the label's
        prefix = "suggested_" if r["issue"] == "missing" else ""
        r["box"] = [r[f"{prefix}{c}"] for c in ("x1", "y1", "x2", "y2")]
    return rows  # most likely first


def cleanlab_ranking(coco: dict, crossfit: Path) -> list[dict]:
    """cleanlab's three per-box scores on the same out-of-fold detections, as flags ranked
    lowest score first (cleanlab: low = likely an issue)."""
    from cleanlab.object_detection import rank

    dets = read_crossfit_detections(crossfit)
    cats = [c["id"] for c in coco["categories"]]
    index = {c: i for i, c in enumerate(cats)}
    labels, predictions, images, ann_ids = [], [], [], []
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in coco["images"]:
        det = dets.get(im["file_name"])
        if det is None:
            continue
        anns = by_image.get(im["id"], [])
        boxes = np.array([xyxy(a["bbox"]) for a in anns], np.float32).reshape(-1, 4)
        classes = np.array([index[a["category_id"]] for a in anns], np.int64)
        labels.append({"bboxes": boxes, "labels": classes})
        boxes, scores, cls = det.boxes, det.scores, det.labels
        predictions.append([
            np.concatenate([boxes[cls == c], scores[cls == c, None]], axis=1).astype(np.float32)
            .reshape(-1, 5) for c in cats
        ])  # fmt: skip
        images.append(im["id"])
        ann_ids.append([a["id"] for a in anns])
    flags = []
    overlooked = rank.compute_overlooked_box_scores(labels=labels, predictions=predictions)
    swap = rank.compute_swap_box_scores(labels=labels, predictions=predictions)
    badloc = rank.compute_badloc_box_scores(labels=labels, predictions=predictions)
    for i, image_id in enumerate(images):
        boxes = np.concatenate([p[:, :4] for p in predictions[i]], axis=0)
        for score, box in zip(overlooked[i], boxes, strict=True):
            if not np.isnan(score):
                flags.append({"issue": "missing", "score": float(score), "image_id": image_id,
                              "box": box.tolist()})  # fmt: skip
        for kind, scores in (("wrong_class", swap[i]), ("misplaced", badloc[i])):
            for score, ann_id in zip(scores, ann_ids[i], strict=True):
                if not np.isnan(score):
                    flags.append({"issue": kind, "score": float(score), "image_id": image_id,
                                  "annotation_id": ann_id})  # fmt: skip
    return sorted(flags, key=lambda r: r["score"])


def prepare(dataset: str, out: Path) -> tuple[Path, Path, str]:
    """The labeled set to corrupt, its image folder and the config of its fold teachers."""
    labeled = out / "split/labeled.json"
    if dataset == "demo":
        data = prepare_demo_data(out, 0)
        if not labeled.is_file():  # 200 images (20%): K = 5% of ~500 boxes, ~25 per kind
            dpl("split", data.ann, "--labeled-count", 200, "--fold", 1, "--seed", 0,
                "--out-dir", labeled.parent)  # fmt: skip
        return labeled, data.images, str(ROOT / "dpl_tools/configs/demo.yaml")
    percent = int(dataset.removeprefix("bccd"))
    train = out / "bccd-train.json"
    if not train.is_file():
        dpl("convert", "--format", "voc", BCCD, "--split", "train", "--out", train)
    if not labeled.is_file():
        dpl("split", train, "--percent", percent, "--fold", 1, "--seed", 0,
            "--out-dir", labeled.parent)  # fmt: skip
    return labeled, BCCD / "JPEGImages", str(ROOT / "benchmarks/configs/bccd_seeds.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo", help="demo or bccd<P> (P%% labeled)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/audit")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crossfit-iters-fraction", type=float, default=None)
    args = parser.parse_args()
    out = args.out / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    labeled, images, config = prepare(args.dataset, out)
    coco = json.loads(labeled.read_text())
    corrupted, planted = plant_errors(coco, args.fraction, args.seed)
    (out / "corrupted.json").write_text(json.dumps(corrupted))
    (out / "planted.json").write_text(json.dumps(planted))
    crossfit = out / "crossfit.parquet"
    start = time.time()
    if not crossfit.is_file():
        sections = yaml.safe_load(Path(config).read_text())
        sections["model"]["backbone_weights"] = str(WEIGHTS)  # offline: the local backbone
        if args.crossfit_iters_fraction is not None:
            sections["polisher"]["crossfit_iters_fraction"] = args.crossfit_iters_fraction
        (out / "config.yaml").write_text(yaml.safe_dump(sections))
        common = ["--images", images, "--config", out / "config.yaml", "--seed", args.seed,
                  "--device", "cpu"]  # fmt: skip
        if not (out / "teacher.pt").is_file():  # the teacher a user would have, on the mistakes
            # --resume: continues an interrupted run from its periodic checkpoint
            dpl("train-teacher", "--ann", out / "corrupted.json", "--out", out / "teacher.pt",
                "--resume", *common)  # fmt: skip
        dpl("synth-noise", "--noise-model", "crossfit", "--ann", out / "corrupted.json",
            "--teacher", out / "teacher.pt", "--out", out / "noise.parquet", *common)  # fmt: skip
    crossfit_s = time.time() - start
    if crossfit_s < 60 and (out / "result.json").is_file():  # cached: keep the measured time
        crossfit_s = json.loads((out / "result.json").read_text())["crossfit_seconds"]
    dpl("audit", "--ann", out / "corrupted.json", "--crossfit", crossfit,
        "--out", out / "audit.parquet", "--csv", out / "audit.csv")  # fmt: skip
    ranked = dpl_ranking(out / "audit.parquet")
    unplanted = unplanted_missing(ranked, planted, coco)
    missing_flags_gallery(unplanted, corrupted, images, out / "missing-unplanted.png")
    result = {"dataset": args.dataset, "images": len(coco["images"]),
              "boxes": len(coco["annotations"]), "crossfit_seconds": round(crossfit_s, 1),
              "dpl": {k: hits_at_k(ranked, planted, k) for k in KINDS},
              # top-K missing flags on no planted and no original box: see the gallery
              "dpl_missing_not_in_original_labels": len(unplanted)}  # fmt: skip
    try:
        ranked = cleanlab_ranking(corrupted, crossfit)
        result["cleanlab"] = {k: hits_at_k(ranked, planted, k) for k in KINDS}
    except ImportError as e:
        result["cleanlab"] = f"not run ({e})"
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
