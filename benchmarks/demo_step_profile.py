"""Where a CPU training step of the demo's detector goes, and what fewer RoI samples save.

Builds the ``demo`` preset's MobileNetV2-FPN (from scratch unless ``--backbone-weights``
says otherwise: the timing is the same, and it runs offline) on 4 synthetic 160x128 images,
times training steps with 128 and 64 RoI samples per image, and profiles one setting's
steps with torch.profiler (top operators by self CPU time). Prints a Markdown summary.

    python benchmarks/demo_step_profile.py [--steps 5] [--threads 1] [--backbone-weights PATH]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from dpl_tools.config import load_config
from dpl_tools.models.detector import build_detector, multiscale_sizes


def demo_detector(box_samples: int, backbone_weights: str = "none") -> torch.nn.Module:
    """The demo preset's detector in train mode, with ``box_samples`` RoIs per image;
    ``backbone_weights``: none, imagenet or a checkpoint path (pretrained weights freeze the
    stem, which changes the step's cost a little)."""
    cfg = load_config("demo")
    model_cfg = cfg["model"]
    kwargs = {**model_cfg["detector_kwargs"], "box_batch_size_per_image": box_samples}
    model = build_detector(
        model_cfg["arch"], 3, backbone_weights,
        min_size=multiscale_sizes(model_cfg["min_size"], cfg["teacher"]["multiscale"]),
        max_size=model_cfg["max_size"], **kwargs,
    )  # fmt: skip
    return model.train()


def batch() -> tuple[list[torch.Tensor], list[dict]]:
    images = [torch.rand(3, 128, 160) for _ in range(4)]
    boxes = torch.tensor([[10.0, 10, 50, 60], [70, 20, 120, 90]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])} for _ in images]
    return images, targets


def step_seconds(
    model: torch.nn.Module,
    steps: int,
    data: tuple[list[torch.Tensor], list[dict]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Mean wall time of a forward + backward + SGD step on ``data`` (default: ``batch()``),
    after 3 warm-up steps; ``optimizer`` defaults to plain SGD over every parameter."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.001)
    images, targets = data or batch()
    for i in range(steps + 3):
        if i == 3:
            began = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--backbone-weights", default="none", help="none (default), imagenet, or a checkpoint path"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| RoI samples per image | s / step (4 images) |\n|---:|---:|")
    for samples in (128, 64, 32):
        seconds = step_seconds(demo_detector(samples, args.backbone_weights), args.steps)
        print(f"| {samples} | {seconds:.2f} |")
    model = demo_detector(64, args.backbone_weights)
    images, targets = batch()
    with profile() as prof:
        for _ in range(args.steps):
            sum(model(images, targets).values()).backward()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    print("\n| operator (64 samples) | share of self CPU time |\n|---|---:|")
    for event in top:
        print(f"| {event.key} | {100 * event.self_cpu_time_total / total:.1f}% |")


if __name__ == "__main__":
    main()
