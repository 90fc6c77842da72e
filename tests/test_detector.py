"""Detector builder, checkpoints and config presets (no training)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import mobilenet_v2, resnet18

from dpl_tools.config import DEFAULTS, load_config
from dpl_tools.engine.train_detector import TrainConfig
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec, load_detector, save_detector
from dpl_tools.models.detector import build_detector, multiscale_sizes, set_test_settings

CATS = [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}]


def _features(model, size=(96, 128)):
    images, _ = model.transform([torch.rand(3, *size)])
    return images, model.backbone(images.tensors)


@pytest.mark.parametrize("arch", ["mobilenet_v2_fpn", "resnet18_fpn", "r50_fpn"])
def test_archs_share_the_torchvision_pieces(arch):
    model = build_detector(arch, 2, min_size=96, max_size=128).eval()
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # 2 classes + background
    with torch.no_grad():
        images, features = _features(model)
        assert all(f.shape[1] == 256 for f in features.values())
        boxes = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [0.0, 0.0, 20.0, 20.0]])]
        pooled = model.roi_heads.box_roi_pool(features, boxes, images.image_sizes)
        assert pooled.shape == (2, 256, 7, 7)
        proposals, _ = model.rpn(images, features)
        assert proposals[0].shape[1] == 4 and len(proposals[0]) > 0


def test_mobilenet_strides_8_16_32():
    model = build_detector("mobilenet_v2_fpn", 1, min_size=128, max_size=128).eval()
    with torch.no_grad():
        images, features = _features(model, (128, 128))
    side = images.tensors.shape[-1]
    strides = [side // f.shape[-1] for f in features.values()]
    assert strides == [8, 16, 32, 64]  # + the max-pool level


def test_backbone_weights_from_file(tmp_path):
    net = mobilenet_v2()
    with torch.no_grad():
        net.features[5].conv[0][0].weight.fill_(0.125)
    path = tmp_path / "mnv2.pth"
    torch.save(net.state_dict(), path)
    model = build_detector("mobilenet_v2_fpn", 2, str(path))
    body = model.backbone.body
    assert torch.all(body["5"].conv[0][0].weight == 0.125)
    assert model.dpl_build["frozen_bn"] is True
    assert not any(p.requires_grad for p in body["0"].parameters())  # stem frozen
    # A checkpoint of another network, or no file: one clear error each.
    other = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), other)
    with pytest.raises(DplError, match="r18.pth: not a mobilenet classification"):
        build_detector("mobilenet_v2_fpn", 2, str(other))
    with pytest.raises(DplError, match="not found"):
        build_detector("mobilenet_v2_fpn", 2, str(tmp_path / "missing.pth"))
    with pytest.raises(DplError, match="unknown detector architecture"):
        build_detector("vgg_fpn", 2)


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = build_detector("mobilenet_v2_fpn", 2, min_size=(80, 96), max_size=128).eval()
    model.transform.min_size = (96,)
    spec = DetectorSpec("mobilenet_v2_fpn", CATS, 96, 128, extra={"note": "x"})
    path = save_detector(tmp_path / "det.pt", model, spec, {"iteration": 3})
    loaded, loaded_spec = load_detector(path)
    assert loaded_spec == spec and loaded_spec.label_to_cat == {1: 7, 2: 3}
    assert not loaded.training
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))]
    for m in (model, loaded):
        set_test_settings(m, score_thresh=0.0, detections_per_img=50)
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert len(a["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key])


def test_load_detector_errors(tmp_path):
    with pytest.raises(DplError, match="checkpoint not found"):
        load_detector(tmp_path / "none.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DplError, match="garbage.pt: not a readable checkpoint"):
        load_detector(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DplError, match="foreign.pt: not a dpl detector checkpoint"):
        load_detector(foreign)


def test_config_precedence_and_presets(tmp_path):
    cfg = load_config("cpu_mobilenet", {"teacher": {"iters": 7, "lr": None}})
    assert cfg["teacher"]["iters"] == 7  # flag beats preset
    assert cfg["teacher"]["lr"] == 0.01  # unset flag keeps the preset's value
    assert cfg["model"]["backbone_weights"] == "imagenet"  # preset beats default
    assert cfg["teacher"]["momentum"] == DEFAULTS["teacher"]["momentum"]  # default kept
    assert load_config("coco_r50_fpn")["model"]["arch"] == "r50_fpn"
    custom = tmp_path / "mine.yaml"
    custom.write_text("model:\n  min_size: 320\n")
    assert load_config(str(custom))["model"]["min_size"] == 320
    with pytest.raises(DplError, match="unknown config preset"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(DplError, match="bad.yaml"):
        load_config(str(bad))


def test_lr_schedule_and_multiscale():
    cfg = TrainConfig(iters=90, lr=0.1, warmup_iters=10, warmup_factor=0.0, lr_steps=[0.5, 0.8])
    assert cfg.lr_at(0) == 0.0
    assert cfg.lr_at(5) == pytest.approx(0.05)
    assert cfg.lr_at(10) == pytest.approx(0.1)
    assert cfg.lr_at(45) == pytest.approx(0.01)
    assert cfg.lr_at(80) == pytest.approx(0.001)
    assert multiscale_sizes(100, [0.8, 1.0, 1.2]) == (80, 120, 100)  # test size last
    assert multiscale_sizes(100, None) == 100


def test_checkpoint_rebuilds_the_frozen_backbone_stem(tmp_path):
    """Training continues with the parameters it trained (a resumed optimizer needs the same
    ones): the stem frozen on pretrained weights stays frozen, also for checkpoints written
    before ``frozen_stem`` was recorded; fine-tuning a teacher into a student trains it."""
    from dpl_tools.models.checkpoint import detector_from_checkpoint, read_checkpoint

    def frozen(model):
        return sorted(n for n, p in model.named_parameters() if not p.requires_grad)

    weights = tmp_path / "mnv2.pth"
    torch.save(mobilenet_v2().state_dict(), weights)
    model = build_detector("mobilenet_v2_fpn", 2, str(weights), min_size=64, max_size=96)
    assert model.dpl_build["frozen_stem"] is True and frozen(model)
    spec = DetectorSpec("mobilenet_v2_fpn", CATS, 64, 96, extra={"backbone_weights": str(weights)})
    path = save_detector(tmp_path / "t.pt", model, spec)
    payload = read_checkpoint(path)
    assert frozen(detector_from_checkpoint(payload, path, [0.5, 1.0])[0]) == frozen(model)
    del payload["build"]["frozen_stem"]  # an older checkpoint
    assert frozen(detector_from_checkpoint(payload, path, [0.5, 1.0])[0]) == frozen(model)
    assert frozen(detector_from_checkpoint(payload, path, None, frozen_stem=False)[0]) == []
    scratch = build_detector("mobilenet_v2_fpn", 2, min_size=64, max_size=96)
    assert scratch.dpl_build["frozen_stem"] is False and frozen(scratch) == []
