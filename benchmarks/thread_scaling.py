"""Seconds per training step of the demo preset's detector at a given torch thread count.

The measurement behind ``dpl run --jobs``: a small detector uses a second core poorly.
ImageNet MobileNetV2-FPN (the offline backbone in ../shared/weights), 160x160 random
images with two boxes each, 32 RoI samples per image; 20 timed steps after 3 warm-up ones.

    python benchmarks/thread_scaling.py THREADS IMAGES_PER_STEP
    python benchmarks/thread_scaling.py 1 2 & python benchmarks/thread_scaling.py 1 2; wait
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from demo_step_profile import step_seconds  # the sibling script (benchmarks/)

from dpl_tools.models.detector import build_detector

WEIGHTS = Path(__file__).resolve().parents[1] / "../shared/weights/mobilenet_v2-b0353104.pth"


def main() -> None:
    threads, batch = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_detector("mobilenet_v2_fpn", 6, str(WEIGHTS.resolve()), min_size=128,
                           max_size=160, box_batch_size_per_image=32,
                           rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=250)  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    images = [torch.rand(3, 160, 160) for _ in range(batch)]
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 80.0, 120.0, 130.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])} for _ in range(batch)]
    seconds = step_seconds(model, 20, (images, targets), optimizer)
    print(f"threads {threads}, images per step {batch}: {seconds:.3f} s/step")


if __name__ == "__main__":
    main()
