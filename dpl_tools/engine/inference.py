"""Batched detector inference: images decoded in DataLoader workers, AMP on GPU.

Boxes come back in original image coordinates (torchvision's postprocess undoes the
resize), as xyxy float tensors on the CPU, with scores and contiguous labels 1..C.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import FasterRCNN

from dpl_tools.data.detection import image_tensor
from dpl_tools.data.images import ImageReadError
from dpl_tools.errors import DplError
from dpl_tools.runtime import amp_enabled

Detection = tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]

# Longest wait (s) for a batch from DataLoader workers: a worker that can neither send its
# batch nor its error (out of shared memory, a file-size limit) would otherwise hang the run.
WORKER_TIMEOUT_S = 120.0


def image_loader(
    dataset: Dataset, batch_size: int, workers: int, collate_fn: Callable, pin_memory: bool
) -> DataLoader:
    """An inference DataLoader: in order, with ``WORKER_TIMEOUT_S`` when it has workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
    )


def worker_batches(loader: DataLoader, what: str) -> Iterator[Any]:
    """The batches of ``loader``; when it has workers, a worker's failure (killed, out of
    shared memory, a file-size limit, an error, no batch within its timeout) ends the run
    with one DplError line saying what happened and suggesting ``--workers 0``."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            if loader.num_workers == 0:
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            cause = lines[-1] if lines else type(e).__name__
            if isinstance(e, DplError):  # a user error met in a worker: its own line
                raise DplError(cause.removeprefix("dpl_tools.errors.DplError: ")) from None
            raise DplError(
                f"{what}: a DataLoader worker failed ({cause}); out of shared memory "
                "(/dev/shm) or over a file-size limit? rerun with --workers 0"
            ) from None
        yield batch


class ImageRecords(Dataset):
    """Items ``(record, image tensor or None, error reason or None)`` for COCO image records."""

    def __init__(self, records: Sequence[dict[str, Any]], images_dir: str | Path) -> None:
        self.records = list(records)
        self.images_dir = Path(images_dir)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[dict[str, Any], torch.Tensor | None, str | None]:
        record = self.records[index]
        try:
            return record, image_tensor(self.images_dir / record["file_name"]), None
        except ImageReadError as e:
            return record, None, e.reason


def _as_list(batch: list) -> list:
    return batch


@torch.inference_mode()
def predict_detections(
    model: FasterRCNN,
    image_records: Sequence[dict[str, Any]],
    images_dir: str | Path,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    workers: int = 2,
    on_error: Callable[[dict[str, Any], str], None] | None = None,
) -> Iterator[Detection]:
    """Yield ``(record, boxes [N,4] xyxy, scores [N], labels [N])`` per readable image, in
    order. Unreadable images are skipped and passed to ``on_error(record, reason)``."""
    device = torch.device(device)
    model.to(device).eval()
    loader = image_loader(
        ImageRecords(image_records, images_dir), batch_size, workers, _as_list,
        device.type == "cuda",
    )  # fmt: skip
    for batch in worker_batches(loader, str(images_dir)):
        for record, _, reason in batch:
            if reason is not None and on_error is not None:
                on_error(record, reason)
        batch = [(record, image) for record, image, reason in batch if reason is None]
        if not batch:
            continue
        images = [image.to(device, non_blocking=True) for _, image in batch]
        with torch.autocast(device.type, enabled=amp_enabled(device)):
            outputs = model(images)
        for (record, _), out in zip(batch, outputs, strict=True):
            yield (
                record,
                out["boxes"].float().cpu(),
                out["scores"].float().cpu(),
                out["labels"].cpu(),
            )


def to_coco_results(
    record: dict[str, Any],
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    label_to_cat: dict[int, int],
) -> list[dict[str, Any]]:
    """One image's detections as COCO results (xywh bbox, COCO category ids)."""
    results = []
    for (x1, y1, x2, y2), score, label in zip(
        boxes.tolist(), scores.tolist(), labels.tolist(), strict=True
    ):
        results.append(
            {
                "image_id": record["id"],
                "category_id": label_to_cat[int(label)],
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
            }
        )
    return results
