"""What a narrower box head saves on the demo's detector: CPU time of a training step and
of an inference pass (4 synthetic 160x128 images) with torchvision's 1024-wide TwoMLPHead
and with narrower ones, interleaved so that both see the same machine load.

    python benchmarks/box_head_width.py [--widths 1024,256] [--steps 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from demo_step_profile import batch, demo_detector, step_seconds
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead


def detector(width: int) -> torch.nn.Module:
    """The demo detector (32 RoI samples per image) with a ``width``-wide box head."""
    model = demo_detector(32)
    if width != model.roi_heads.box_predictor.cls_score.in_features:
        classes = model.roi_heads.box_predictor.cls_score.out_features
        model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, width)
        model.roi_heads.box_predictor = FastRCNNPredictor(width, classes)
    return model


def inference_seconds(model: torch.nn.Module, passes: int = 3) -> float:
    """Mean wall time of an eval-mode pass over ``batch()``'s images, after one warm-up."""
    model.eval()
    images = batch()[0]
    with torch.no_grad():
        model(images)
        began = time.perf_counter()
        for _ in range(passes):
            model(images)
    model.train()
    return (time.perf_counter() - began) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1024,256")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| box head width | training step, 4 images (s) | inference, 4 images (s) |")
    print("|---:|---:|---:|")
    for _ in range(args.repeats):
        for width in (int(w) for w in args.widths.split(",")):
            model = detector(width)
            train = step_seconds(model, args.steps)
            print(f"| {width} | {train:.2f} | {inference_seconds(model):.2f} |", flush=True)


if __name__ == "__main__":
    main()
