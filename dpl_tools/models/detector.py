"""Faster R-CNN + FPN detectors built from torchvision parts.

Every architecture is a plain ``torchvision.models.detection.FasterRCNN`` whose backbone
returns an OrderedDict of 256-channel FPN maps, so later stages use the same pieces
(``model.transform``, ``model.backbone``, ``model.rpn``, ``model.roi_heads.box_roi_pool``)
whatever the backbone.

- ``r50_fpn``: the paper's ResNet-50-FPN (strides 4..32 + pool), as torchvision's
  ``fasterrcnn_resnet50_fpn``.
- ``resnet18_fpn``: the same layout on ResNet-18 (lighter).
- ``mobilenet_v2_fpn``: MobileNetV2 features at strides 8/16/32 (end of each stage) + FPN
  + a stride-64 pool level; small objects are still seen at stride 8. CPU-friendly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from dpl_tools.defaults import ARCHS
from dpl_tools.errors import DplError

# arch -> (classification constructor, its ImageNet weights enum member)
_CLASSIFIERS: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "r50_fpn": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet18_fpn": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "mobilenet_v2_fpn": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1),
}

# MobileNetV2 ``features`` indices ending the stride-8, -16 and -32 stages, and their widths.
_MOBILENET_V2_RETURN = {"6": "0", "13": "1", "18": "2"}
_MOBILENET_V2_CHANNELS = [32, 96, 1280]
# Layers frozen when starting from ImageNet weights (stem and stride-2/4 stages).
_MOBILENET_V2_FROZEN = 4


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A classification state dict from a torchvision-style checkpoint file."""
    if not path.is_file():
        raise DplError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DplError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DplError(f"{path}: no state dict in this checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_classifier(arch: str, backbone_weights: str, norm_layer: Callable[..., nn.Module]):
    """The ImageNet classification network behind ``arch``, with the requested weights.

    ``backbone_weights``: ``imagenet`` (torchvision's weights mechanism: downloaded once or
    read from ``$TORCH_HOME/hub/checkpoints``), ``none``, or a checkpoint file path.
    """
    constructor, imagenet = _CLASSIFIERS[arch]
    if backbone_weights == "none":
        return constructor(weights=None, norm_layer=norm_layer)
    if backbone_weights == "imagenet":
        try:
            return constructor(weights=imagenet, norm_layer=norm_layer)
        except (OSError, RuntimeError) as e:
            file = Path(imagenet.url).name
            raise DplError(
                f"--backbone-weights imagenet: cannot fetch {file} ({type(e).__name__}); offline, "
                f"put it in $TORCH_HOME/hub/checkpoints or pass its path"
            ) from None
    path = Path(backbone_weights)
    net = constructor(weights=None, norm_layer=norm_layer)
    try:
        net.load_state_dict(_read_state_dict(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DplError(
            f"{path}: not a {arch.split('_')[0]} classification checkpoint ({first})"
        ) from None
    return net


def mobilenet_v2_fpn_backbone(
    backbone_weights: str, frozen_bn: bool, frozen_stem: bool
) -> BackboneWithFPN:
    """MobileNetV2 stage outputs at strides 8/16/32 + FPN (256 ch) + max-pool level."""
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    features = load_classifier("mobilenet_v2_fpn", backbone_weights, norm).features
    if frozen_stem:
        for layer in features[:_MOBILENET_V2_FROZEN]:
            layer.requires_grad_(False)
    return BackboneWithFPN(
        features,
        return_layers=_MOBILENET_V2_RETURN,
        in_channels_list=_MOBILENET_V2_CHANNELS,
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
    )


def resnet_fpn_backbone(
    arch: str, backbone_weights: str, frozen_bn: bool, frozen_stem: bool
) -> BackboneWithFPN:
    """ResNet C2..C5 + FPN (256 ch) + max-pool level, as in torchvision's R50-FPN."""
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    net = load_classifier(arch, backbone_weights, norm)
    return _resnet_fpn_extractor(net, 3 if frozen_stem else 5)


def multiscale_sizes(min_size: int, factors: list[float] | None) -> int | tuple[int, ...]:
    """Training shorter sides for multi-scale resize; the test size is kept last, since
    torchvision uses ``min_size[-1]`` in eval mode."""
    if not factors:
        return min_size
    sizes = sorted({max(1, round(min_size * f)) for f in factors} - {min_size})
    return (*sizes, min_size)


def build_detector(
    arch: str,
    num_classes: int,
    backbone_weights: str = "none",
    min_size: int | tuple[int, ...] = 480,
    max_size: int = 800,
    **kwargs: Any,
) -> FasterRCNN:
    """A Faster R-CNN + FPN with ``num_classes`` foreground classes (label 0 = background).

    ``min_size`` may be a tuple: in train mode torchvision picks one at random per batch
    (multi-scale training), in eval mode it uses the last. ``frozen_bn`` (default: frozen
    exactly when pretrained weights are loaded) picks FrozenBatchNorm2d vs BatchNorm2d;
    ``frozen_stem`` (same default) freezes the backbone's first layers; other keyword
    arguments go to ``FasterRCNN`` (e.g. ``box_score_thresh``). The resolved build options
    are kept in ``model.dpl_build`` so a checkpoint can rebuild the model.
    """
    if arch not in ARCHS:
        raise DplError(f"unknown detector architecture {arch!r} (choose from {', '.join(ARCHS)})")
    if num_classes < 1:
        raise DplError(f"a detector needs at least one class, got {num_classes}")
    pretrained = backbone_weights != "none"
    frozen_bn = kwargs.pop("frozen_bn", None)
    frozen_bn = pretrained if frozen_bn is None else frozen_bn
    frozen_stem = kwargs.pop("frozen_stem", None)
    frozen_stem = pretrained if frozen_stem is None else frozen_stem
    if arch == "mobilenet_v2_fpn":
        backbone = mobilenet_v2_fpn_backbone(backbone_weights, frozen_bn, frozen_stem)
        anchor_sizes = ((32,), (64,), (128,), (256,))
        featmaps = ["0", "1", "2"]
    else:
        backbone = resnet_fpn_backbone(arch, backbone_weights, frozen_bn, frozen_stem)
        anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
        featmaps = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    pooler = MultiScaleRoIAlign(featmap_names=featmaps, output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler,
        **kwargs,
    )
    model.dpl_build = {"frozen_bn": frozen_bn, "frozen_stem": frozen_stem, **kwargs}
    return model


def set_test_settings(
    model: FasterRCNN,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
) -> FasterRCNN:
    """Set the RoI head's test-time score threshold / NMS IoU / max detections per image."""
    heads = model.roi_heads
    if score_thresh is not None:
        heads.score_thresh = score_thresh
    if nms_thresh is not None:
        heads.nms_thresh = nms_thresh
    if detections_per_img is not None:
        heads.detections_per_img = detections_per_img
    return model
