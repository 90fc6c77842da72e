"""Peak memory of ``dpl polish`` for 1k vs 10k images: it must not grow with the image count.

Synthetic 64x48 px images, an untrained tiny teacher (MobileNetV2-FPN, 64 px input,
few RPN proposals) and an untrained polisher, --initial-threshold 0 and --max-dets 10
so every image writes 10 rows. Each size runs the real CLI in a fresh process; its peak
RSS (largest single process: the main one or a decoding worker) is read with
``getrusage(RUSAGE_CHILDREN)`` in a separate measuring process. Appends to RESULTS.md.

    python benchmarks/polish_memory.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/out/polish_memory"
DATE = "2026-11-24"
POLISH_ARGS = [
    "--initial-threshold", "0.0", "--max-dets", "10", "--batch-size", "8",
    "--workers", "1", "--device", "cpu", "--no-progress",
]  # fmt: skip


def prepare(num_images: int) -> tuple[Path, Path]:
    """Synthetic images (reused when present) and a tiny untrained teacher + polisher."""
    from dpl_tools.data.synthetic import make_synthetic_dataset
    from dpl_tools.models.checkpoint import DetectorSpec, save_detector
    from dpl_tools.models.detector import build_detector
    from dpl_tools.models.polisher import Polisher, save_polisher

    ann = OUT / "data/annotations.json"
    if not ann.exists() or len(json.loads(ann.read_text())["images"]) < num_images:
        make_synthetic_dataset(OUT / "data", num_images=num_images, image_size=(64, 48), seed=0)
    categories = json.loads(ann.read_text())["categories"]
    run = OUT / "run"
    torch.manual_seed(0)
    teacher = build_detector(
        "mobilenet_v2_fpn", len(categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
    )  # fmt: skip
    save_detector(run / "teacher.pt", teacher, DetectorSpec("mobilenet_v2_fpn", categories, 64, 96))
    save_polisher(
        run / "polisher.pt",
        Polisher(num_classes=len(categories)),
        teacher_path=run / "teacher.pt",
        categories=categories,
    )
    return ann, run


def measure(ann: Path, run: Path, count: int) -> dict:
    """Run ``dpl polish`` on the first ``count`` images in a child; its peak RSS and time."""
    images = json.loads(ann.read_text())["images"][:count]
    image_list = OUT / f"list_{count}.json"
    image_list.write_text(json.dumps({"images": images}))
    out = OUT / f"labels_{count}.parquet"
    cmd = [
        sys.executable, "-m", "dpl_tools.cli", "polish", "--images", str(image_list),
        "--image-root", str(ann.parent / "images"), "--out", str(out), "--run-dir", str(run),
        "--overwrite", *POLISH_ARGS,
    ]  # fmt: skip
    began = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(out).metadata.num_rows
    return {"images": count, "rows": rows, "peak_rss_mib": peak_kib / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ann, run = OUT / "data/annotations.json", OUT / "run"
    if args.measure:  # child mode: one measurement, printed as JSON
        print(json.dumps(measure(ann, run, args.measure)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    prepare(max(sizes))
    results = []
    for size in sizes:
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(size)],
            cwd=ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    lines = [
        "",
        f"## dpl polish peak memory vs image count ({DATE})",
        "",
        "Command: `python benchmarks/polish_memory.py --sizes "
        f"{args.sizes}` (real `dpl polish` CLI per size: {' '.join(POLISH_ARGS)}; synthetic "
        "64x48 px images, untrained MobileNetV2-FPN teacher at 64 px, untrained polisher).",
        f"Machine: {platform.machine()}, 2 CPU cores, no GPU; torch {torch.__version__}.",
        "",
        "| images | rows | peak RSS (MiB) | wall (s) | images/s |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['images']} | {r['rows']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} | "
            f"{r['images'] / r['seconds']:.1f} |"
            for r in results
        ),
        "",
        f"Peak RSS ratio {results[-1]['images']} / {results[0]['images']} images: "
        f"{ratio:.3f} (target <= 1.1).",
    ]
    with open(ROOT / "benchmarks/RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
