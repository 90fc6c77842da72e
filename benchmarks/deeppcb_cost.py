"""What a DeepPCB bench costs per training step and per inference image, at the sizes a
CPU bench could use: whole images resized to 480 px (the old plan), whole images at their
native 640 px, and 640 px with random training windows (``train_crop``), interleaved so that
every setting sees the same machine load.

Uses real DeepPCB training images with their boxes (../shared/data/deeppcb), the bench's
detector (MobileNetV2-FPN, the offline ImageNet backbone, batch 2), the detector's own
transform (the crop happens there, as in training).

    python benchmarks/deeppcb_cost.py [--settings 480,640,640/320] [--steps 4] [--repeats 2]
        [--light]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from demo_step_profile import step_seconds
from torchvision.io import read_image

from dpl_tools.data.coco import load_coco
from dpl_tools.models.detector import build_detector
from dpl_tools.models.transform import set_train_crop

ROOT = Path(__file__).resolve().parents[1]
DEEPPCB = (ROOT / "../shared/data/deeppcb").resolve()
WEIGHTS = (ROOT / "../shared/weights/mobilenet_v2-b0353104.pth").resolve()
LIGHT = {"box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 1000,
         "rpn_post_nms_top_n_train": 500}  # fmt: skip


def deeppcb_batch(start: int, size: int = 2) -> tuple[list[torch.Tensor], list[dict]]:
    """``size`` DeepPCB training images (from the ``start``-th) and their targets."""
    coco = load_coco(DEEPPCB / "train.json")
    by_image = coco.annotations_by_image()
    images, targets = [], []
    for record in coco.images[start : start + size]:
        image = read_image(str(DEEPPCB / "images" / record["file_name"])).float() / 255
        images.append(image.expand(3, -1, -1).contiguous())
        anns = by_image.get(record["id"], [])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        labels = torch.tensor([a["category_id"] for a in anns])
        targets.append({"boxes": boxes.reshape(-1, 4).float(), "labels": labels})
    return images, targets


def detector(setting: str, light: bool = False) -> torch.nn.Module:
    """``"480"``: whole images at 480 px; ``"640/320"``: 640 px, 320 px training windows;
    ``light``: 128 sampled RoIs per image and 1,000 / 500 RPN proposals in training
    (torchvision's defaults: 512 and 2,000 / 2,000)."""
    size, _, crop = setting.partition("/")
    kwargs = LIGHT if light else {}
    model = build_detector("mobilenet_v2_fpn", 6, str(WEIGHTS), min_size=int(size),
                           max_size=int(size), **kwargs)  # fmt: skip
    if crop:
        set_train_crop(model, int(crop))
    return model.train()


def inference_seconds(model: torch.nn.Module, images: list[torch.Tensor]) -> float:
    """Wall time per image of an eval pass over ``images`` (after one warm-up pass)."""
    model.eval()
    with torch.no_grad():
        model(images[:1])
        began = time.perf_counter()
        model(images)
    model.train()
    return (time.perf_counter() - began) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="480,640,640/320")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--light", action="store_true", help="fewer RoI samples and proposals")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = deeppcb_batch(0)
    test_images = deeppcb_batch(10, 4)[0]
    print("| px / training window | training step, 2 images (s) | inference (s / image) |")
    print("|---|---:|---:|")
    for _ in range(args.repeats):
        for setting in args.settings.split(","):
            model = detector(setting, args.light)
            train = step_seconds(model, args.steps, data)
            infer = inference_seconds(model, test_images)
            print(f"| {setting} | {train:.2f} | {infer:.2f} |", flush=True)


if __name__ == "__main__":
    main()
