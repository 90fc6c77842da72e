"""Polisher networks: the paper's layer shapes, vote-box features, checkpoint and EMA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpl_tools.boxes import clip_boxes
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import Polisher, load_polisher, save_polisher

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def test_layer_shapes_follow_the_paper():
    pol = Polisher(num_classes=3)
    reg, cls = pol.regression, pol.classification
    assert reg.fuse.weight.shape == (256, 1792, 1, 1)  # 7 x 256 channels -> 1x1 conv 256
    assert reg.fc1.weight.shape == (1024, 12544)  # 256 x 7 x 7
    assert reg.fc2.weight.shape == (1024, 1024)
    assert reg.delta.weight.shape == (4, 1024)
    assert cls.fc1.weight.shape == (1024, 12544)
    assert cls.fc2.weight.shape == (1024, 1024)
    assert cls.cls.weight.shape == (4, 1024)  # C + 1
    assert reg(torch.randn(5, 7, 256, 7, 7)).shape == (5, 4)
    assert cls(torch.randn(5, 256, 7, 7)).shape == (5, 4)


def _teacher(tmp_path, name: str, seed: int):
    torch.manual_seed(seed)
    model = build_detector("mobilenet_v2_fpn", 3, "none", min_size=64, max_size=96).eval()
    path = tmp_path / name
    save_detector(path, model, DetectorSpec("mobilenet_v2_fpn", CATEGORIES, 64, 96))
    return model, path


def test_vote_features_regress_classify_and_teacher_hash_check(tmp_path):
    teacher, path = _teacher(tmp_path, "teacher.pt", 0)
    _, other = _teacher(tmp_path, "other.pt", 1)
    pol = Polisher.for_teacher(teacher, 3).eval()
    assert pol.roi_pool.featmap_names == teacher.roi_heads.box_roi_pool.featmap_names
    with torch.no_grad():
        images, _ = teacher.transform([torch.rand(3, 80, 96)])
        features = teacher.backbone(images.tensors)
        boxes = [torch.tensor([[10.0, 10.0, 40.0, 30.0], [0.0, 5.0, 90.0, 60.0]])]
        votes = pol.vote_features(features, boxes, images.image_sizes)
        assert votes.shape == (2, 7, 256, 7, 7)
        own = pol.box_features(features, boxes, images.image_sizes)
        torch.testing.assert_close(votes[:, 0], own)  # vote box 0 is the box itself
        refined, probs = pol.refine(features, boxes, images.image_sizes)
    h, w = images.image_sizes[0]
    assert refined[0].shape == (2, 4) and (refined[0][:, 2] <= w).all()
    # freshly initialised deltas are ~0: the refined box is the input box clipped to the image
    torch.testing.assert_close(refined[0], clip_boxes(boxes[0], (h, w)), atol=0.5, rtol=0)
    assert refined[0][1, 2] == w
    assert probs[0].shape == (2, 4)
    torch.testing.assert_close(probs[0].sum(1), torch.ones(2))

    ckpt = save_polisher(tmp_path / "pol.pt", pol, teacher_path=path, categories=CATEGORIES)
    loaded = load_polisher(ckpt, teacher_sha=sha256_file(path))
    for (k, a), b in zip(pol.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(DplError, match="trained on teacher"):
        load_polisher(ckpt, teacher_sha=sha256_file(other))


def test_ema_update_formula_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, momentum=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[0].bias.fill_(2.0)
    model.train()(torch.randn(4, 3))  # moves BN running stats, bumps num_batches_tracked
    ema.update(model)
    now = model.state_dict()
    for name, value in ema.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * now[name])
        else:
            assert torch.equal(value, now[name])  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        ModelEMA(model, momentum=1.5)
