"""The defaults table and config checking: one table for every section, unknown keys and
wrong types refused with the file named, every preset loads, the polish section reaches
dpl polish, resume refuses another model, crafted checkpoint specs are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.config import DEFAULTS, list_presets, load_config, merge, preset_path
from dpl_tools.data.polisher_pairs import PairSettings
from dpl_tools.data.pseudo_labels import META_THRESHOLDS, read_pseudo_labels
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.defaults import SETTINGS
from dpl_tools.engine.polish import PolishSettings
from dpl_tools.engine.train_detector import TrainConfig, train_teacher
from dpl_tools.engine.train_student import requested_student_model, train_student
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    DetectorSpec,
    check_same_model,
    load_detector,
    read_checkpoint,
    save_detector,
    write_payload,
)
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import Polisher, save_polisher
from dpl_tools.pipeline import PipelineData, load_run_config, pipeline_stages

REPO = Path(__file__).resolve().parents[1]

# The defaults as they were before the table (registered from four modules, repeated in
# TrainConfig / PairSettings / PolishSettings / dpl polish's flags): they must not change.
OPTIMIZER = {
    "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "warmup_factor": 0.001,
    "lr_steps": [0.667, 0.889], "gamma": 0.1, "clip_grad_norm": 10.0,
}  # fmt: skip
DETECTOR_TRAINING = {
    "iters": 400, "batch_size": 2, **OPTIMIZER, "warmup_iters": 100,
    "multiscale": [0.8, 0.9, 1.0, 1.1, 1.2], "hflip": True, "workers": 2,
    "checkpoint_every": 100,
}  # fmt: skip
OLD_DEFAULTS = {
    "model": {
        "arch": "mobilenet_v2_fpn", "backbone_weights": "none", "min_size": 480,
        "max_size": 800, "detector_kwargs": {},
    },
    "teacher": DETECTOR_TRAINING,
    "polisher": {
        "rounds": 4, "reg_copies": 150, "reg_scale": 0.2, "cls_copies": [50, 50],
        "cls_scales": [0.06, 0.2], "fg_iou": 0.7, "noise_model": "gaussian",
        "empirical_min_match_iou": 0.5, "empirical_reg_min_score": 0.5,
        "empirical_cls_min_score": 0.05, "empirical_inflate": 1.0,
        "iters": 400, "batch_size": 2, **OPTIMIZER, "warmup_iters": 50, "workers": 2,
        "reg_per_image": 256, "cls_per_image": 512, "max_proposals": 1000,
        "ema_momentum": 0.99, "val_fraction": 0.1,
    },
    "polish": {
        "score_thresh": 0.001, "nms_thresh": 0.5, "detections_per_img": 100,
        "initial_thresh": 0.5, "cls_prob": 0.9, "teacher_score": 0.9,
        "batch_size": None, "workers": 2,
    },
    "student": {
        **DETECTOR_TRAINING, "unlabeled_ratio": 1.0, "unlabeled_weight": 1.0,
        "pseudo_view": "polished", "disentangle": True,
    },
}  # fmt: skip
# Keys the table adds: DDP's option (settable from a YAML before, through TrainConfig),
# the polisher's checkpoints for --resume (100: TrainConfig's default it ran with before)
# and the student's allow_empty (train-student --allow-empty; off: refuse 0 pseudo boxes).
AUGMENT_KEYS = {
    "aug_colour_prob": 1.0, "aug_colour_ops": "photometric", "aug_geometric_prob": 1.0,
    "aug_scale": [0.6, 1.4], "aug_translate": 0.1, "aug_erase_patches": [1, 5],
    "aug_erase_size": [0.05, 0.2],
    "aug_erase_fill": "noise", "aug_erase_drop": 0.7, "aug_min_visible": 0.3,
    "train_crop": None,  # random training windows for large images (off: whole images)
}  # fmt: skip
NEW_KEYS = {
    "teacher": {"find_unused_parameters": False, **AUGMENT_KEYS, "augment": "weak"},
    "student": {
        "find_unused_parameters": False,
        # issue 21: the student learns: strong augmentation (weak = the old flip), its init
        **AUGMENT_KEYS,
        "augment": "weak",
        "pseudo_augment": None,
        "online": False,
        "ema_momentum": 0.999,
        # issue 22: the polishers trained jointly in the online loop (off: frozen)
        "online_polisher": False,
        "online_polisher_lr": 0.001,
        "online_log_every": 50,
        "online_eval_images": 100,
        "online_eval_recall": None,
        "mixup": 0.0,
        "mosaic": 0.0,
        "init": "teacher",
        "iters": None,  # null: the teacher's iterations
        "allow_empty": False,
        # issue 13: uncertain teacher boxes are ignore regions, not background
        "negatives": "ignore",
    },
    "polisher": {
        "checkpoint_every": 100,
        "fit_keep_rule": True,
        "precision_target": None,
        # issue 14: cross-fitting (only used by --noise-model crossfit)
        "crossfit_folds": 3,
        # issue 26: fold teachers at the teacher's iterations per labeled image (null:
        # (K-1)/K), a fit that knows when it cannot fit, a checked regression polisher
        "crossfit_iters_fraction": None,
        "real_fraction": 0.5,
        "keep_fit_min_matches": 30,
        "keep_fallback": "keep_all",
        "reg_check_min_pairs": 10,
    },
    # issue 13: the keep thresholds come from the polisher (fitted) unless given
    "polish": {
        "keep_rule": "fitted",
        "cls_prob": None,
        "teacher_score": None,
        # issue 14: iterated polishing and the TTA + box fusion baseline (off: as before)
        "reg_steps": None,  # issue 26: null = 1, or 0 where the regression check chose so
        "tta": False,
        "tta_scales": [0.8, 1.2],
        "tta_fusion_iou": 0.55,
    },
}


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_one_table_holds_every_section_with_the_old_values():
    assert DEFAULTS == merge(OLD_DEFAULTS, NEW_KEYS)
    assert set(DEFAULTS) == set(SETTINGS) == {"model", "teacher", "polisher", "polish", "student"}
    # every section, polish included; the student's null iterations become the teacher's
    assert load_config().to_dict() == merge(DEFAULTS, {"student": {"iters": 400}})


def test_loaded_config_is_typed_read_only_and_plain_on_demand(tmp_path):
    import copy
    import pickle

    from dpl_tools.config import Config, Section

    path = write_yaml(tmp_path / "c.yaml", {"teacher": {"lr": 1, "iters": 30},
                                            "student": {"aug_scale": [1, 2]}})  # fmt: skip
    cfg = load_config(path)
    assert isinstance(cfg, Config) and isinstance(cfg.student, Section)
    assert cfg.teacher.iters == cfg["teacher"]["iters"] == 30
    assert cfg.teacher.lr == 1.0 and isinstance(cfg.teacher.lr, float)  # a float setting
    assert cfg.student.aug_scale == (1.0, 2.0) and cfg.student.iters == 30
    with pytest.raises(AttributeError, match="read-only"):
        cfg.teacher.iters = 5
    with pytest.raises(TypeError):
        cfg["teacher"]["iters"] = 5  # no item assignment either
    with pytest.raises(AttributeError, match="no setting 'iter'"):
        _ = cfg.teacher.iter
    plain = cfg.to_dict()
    assert plain["student"]["aug_scale"] == [1.0, 2.0] and isinstance(plain["model"], dict)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # what run directories store
    assert load_config(cfg).to_dict() == plain  # a Config is a config like a dict
    assert copy.deepcopy(cfg) is cfg and pickle.loads(pickle.dumps(cfg)).to_dict() == plain


def test_student_trains_as_long_as_its_teacher_unless_told():
    assert load_config(None, {"teacher": {"iters": 900}})["student"]["iters"] == 900
    given = load_config(None, {"teacher": {"iters": 900}, "student": {"iters": 50}})
    assert given["student"]["iters"] == 50
    assert load_config("demo")["student"]["iters"] >= load_config("demo")["teacher"]["iters"]


def test_settings_dataclasses_take_their_defaults_from_the_table():
    teacher = DEFAULTS["teacher"]
    cfg = TrainConfig()
    for key in ("iters", "batch_size", "warmup_iters", "workers", "checkpoint_every"):
        assert getattr(cfg, key) == teacher[key]
    assert {k: getattr(cfg, k) for k in OPTIMIZER} == {k: teacher[k] for k in OPTIMIZER}
    pairs = PairSettings()
    assert pairs == PairSettings.from_section(DEFAULTS["polisher"])
    assert (pairs.reg_copies, pairs.reg_scale, pairs.fg_iou) == (150, 0.2, 0.7)
    assert (pairs.cls_copies, pairs.cls_scales) == ([50, 50], [0.06, 0.2])
    polish = PolishSettings()
    assert polish == PolishSettings.from_section(DEFAULTS["polish"])
    assert polish.thresholds() == {
        "test_score": 0.001, "test_nms": 0.5, "test_max_dets": 100,
        "initial": 0.5, "cls_prob": 0.9, "teacher_score": 0.9, "reg_steps": 1, "tta": 0,
    }  # fmt: skip
    # from_section converts YAML numbers to the field types (as the old int()/float() did)
    built = PairSettings.from_section({"reg_scale": 1, "cls_copies": [5.0], "cls_scales": [1]})
    assert built.reg_scale == 1.0 and isinstance(built.reg_scale, float)
    assert built.cls_copies == [5] and isinstance(built.cls_copies[0], int)
    assert isinstance(built.cls_scales[0], float)


def test_load_config_imports_no_trainer():
    code = (
        "import sys; from dpl_tools.config import load_config; c = load_config(); "
        "print(sorted(c)); print(sorted(m for m in sys.modules "
        "if m.startswith(('dpl_tools.engine', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    sections, heavy = out.stdout.splitlines()
    assert sections == "['model', 'polish', 'polisher', 'student', 'teacher']"
    assert heavy == "[]"


def config_files() -> list[Path]:
    presets = [preset_path(name) for name in list_presets()]
    return presets + sorted((REPO / "benchmarks" / "configs").glob("*.yaml"))


def test_every_preset_and_benchmark_config_loads():
    files = config_files()
    assert {"cpu_mobilenet", "coco_r50_fpn", "voc_r50_fpn", "demo"} <= set(list_presets())
    assert any(f.parent.name == "configs" and f.parent.parent.name == "benchmarks" for f in files)
    for path in files:
        cfg = load_config(str(path)).to_dict()
        assert set(cfg) == set(DEFAULTS), path
        raw = yaml.safe_load(path.read_text())
        for section, values in raw.items():  # the file's values are what load_config gives
            for key, value in values.items():
                assert cfg[section][key] == value, (path, section, key)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"teacher": {"iter": 5}}, "unknown key teacher.iter (did you mean iters?)"),
        ({"techer": {"iters": 5}}, "unknown section techer (did you mean teacher?)"),
        ({"student": {"unlabeled_ratoi": 2}}, "(did you mean unlabeled_ratio?)"),
        ({"polish": {"cls_probability": 0.5}}, "unknown key polish.cls_probability (did you"),
        (
            {"model": {"detector_kwargs": {"rpn_post_nms_top_n_trian": 5}}},
            "unknown key model.detector_kwargs.rpn_post_nms_top_n_trian "
            "(did you mean rpn_post_nms_top_n_train?)",
        ),
        ({"data": {"ann": "x.json"}}, "section 'data' belongs in a `dpl run` config"),
        ({"teacher": {"iters": "abc"}}, "teacher.iters: expected an integer, got 'abc'"),
        ({"teacher": {"iters": 2.5}}, "teacher.iters: expected an integer, got 2.5"),
        ({"teacher": {"iters": None}}, "teacher.iters: expected an integer, got null"),
        ({"teacher": {"lr": "fast"}}, "teacher.lr: expected a number, got 'fast'"),
        ({"teacher": {"lr": float("nan")}}, "teacher.lr: expected a finite number"),
        ({"teacher": {"hflip": "yes"}}, "teacher.hflip: expected true or false, got 'yes'"),
        ({"teacher": {"workers": True}}, "teacher.workers: expected an integer, got True"),
        ({"teacher": {"lr_steps": 0.5}}, "teacher.lr_steps: expected a list of numbers"),
        ({"polisher": {"cls_copies": [50, "x"]}}, "polisher.cls_copies: item 1: expected an"),
        ({"model": {"arch": 3}}, "model.arch: expected text, got 3"),
        ({"model": {"arch": "resnet50"}}, "model.arch: 'resnet50' is not one of r50_fpn"),
        ({"model": {"detector_kwargs": [1]}}, "model.detector_kwargs: expected a mapping"),
        (
            {"model": {"detector_kwargs": {"box_score_thresh": "x"}}},
            "model.detector_kwargs.box_score_thresh: expected a number, got 'x'",
        ),
        ({"student": {"pseudo_view": "rwa"}}, "student.pseudo_view: 'rwa' is not one of"),
        # the flags' ranges hold for file values too
        ({"teacher": {"iters": 0}}, "teacher.iters: must be >= 1, got 0"),
        ({"student": {"batch_size": -1}}, "student.batch_size: must be >= 1, got -1"),
        ({"teacher": {"lr": -0.1}}, "teacher.lr: must be > 0, got -0.1"),
        ({"model": {"min_size": 0}}, "model.min_size: must be >= 1, got 0"),
        ({"polisher": {"fg_iou": 1.5}}, "polisher.fg_iou: must be in [0, 1], got 1.5"),
        ({"polish": {"cls_prob": -0.5}}, "polish.cls_prob: must be in [0, 1], got -0.5"),
        ({"polisher": {"cls_copies": [50, -1]}}, "polisher.cls_copies: item 1: must be >= 0"),
    ],
)
def test_bad_config_file_is_one_line_error_naming_the_file(tmp_path, raw, message):
    path = write_yaml(tmp_path / "mine.yaml", raw)
    with pytest.raises(DplError) as info:
        load_config(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text
    assert "\n" not in text


def test_numbers_and_nulls_where_the_table_allows_them(tmp_path):
    path = write_yaml(
        tmp_path / "ok.yaml",
        {
            "teacher": {"iters": 400.0, "lr": 1, "clip_grad_norm": None, "multiscale": None},
            "polish": {"batch_size": None, "cls_prob": 1},
            "model": {"detector_kwargs": {"box_batch_size_per_image": 64, "frozen_bn": None}},
        },
    )
    cfg = load_config(str(path))
    assert cfg["teacher"]["iters"] == 400 and isinstance(cfg["teacher"]["iters"], int)
    assert cfg["teacher"]["lr"] == 1 and cfg["teacher"]["clip_grad_norm"] is None
    assert cfg["teacher"]["multiscale"] is None and cfg["polish"]["batch_size"] is None
    assert cfg["model"]["detector_kwargs"] == {"box_batch_size_per_image": 64, "frozen_bn": None}
    # values given in code (flags parsed elsewhere) obey the same table
    with pytest.raises(DplError, match=r"command line: polisher\.cls_copies: item 0: must be"):
        load_config(None, {"polisher": {"cls_copies": [-5.0, 50.0]}})


def test_run_config_sections_are_checked(tmp_path):
    base = {"data": {"ann": "train.json", "images": "images"}, "run": {"run_dir": "r"}}
    write_yaml(tmp_path / "good.yaml", {**base, "polish": {"cls_prob": 0.8}})
    data, run_dir, resolved = load_run_config(tmp_path / "good.yaml", tmp_path / "run")
    assert data.ann == tmp_path / "train.json"
    assert yaml.safe_load(resolved.read_text()) == {"polish": {"cls_prob": 0.8}}
    for raw, message in [
        ({**base, "date": {}}, "unknown section date (did you mean data?)"),
        ({**base, "run": {"presett": "demo"}}, "unknown key run.presett (did you mean preset?)"),
        ({"data": {"ann": "a", "images": "i", "percent": "ten"}}, "data.percent: expected a"),
        ({"data": {"ann": "a", "images": "i", "percent": 0}}, "data.percent: must be in (0, 100]"),
        ({**base, "student": {"iters": 0}}, "student.iters: must be >= 1, got 0"),
        ({"data": {"ann": None, "images": "i"}}, "data.ann: expected text, got null"),
    ]:
        path = write_yaml(tmp_path / "bad.yaml", raw)
        with pytest.raises(DplError) as info:
            load_run_config(path, tmp_path / "run")
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_pipeline_passes_the_config_to_polish(tmp_path):
    config = write_yaml(tmp_path / "config.yaml", {"polish": {"cls_prob": 0.8}})
    data = PipelineData(ann=tmp_path / "a.json", images=tmp_path / "images")
    stages = {s.name: s for s in pipeline_stages(data, tmp_path / "run", str(config))}
    polish = stages["polish"]
    assert polish.argv[polish.argv.index("--config") + 1] == str(config)
    assert config in polish.inputs  # editing the thresholds reruns polish


@pytest.fixture(scope="module")
def tiny_run(module_dir) -> dict[str, Path]:
    """Six tiny images, an untrained teacher (64 px) and a polisher tied to it."""
    root = module_dir("cfgrun")
    ann = make_synthetic_dataset(root / "data", num_images=6, image_size=(80, 64), seed=3)
    categories = json.loads(ann.read_text())["categories"]
    torch.manual_seed(0)
    teacher = build_detector(
        "mobilenet_v2_fpn", len(categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
    )  # fmt: skip
    spec = DetectorSpec("mobilenet_v2_fpn", categories, 64, 96)
    save_detector(root / "teacher.pt", teacher, spec)
    save_polisher(
        root / "polisher.pt", Polisher(num_classes=len(categories)),
        teacher_path=root / "teacher.pt", categories=categories,
    )  # fmt: skip
    return {"root": root, "ann": ann, "images": ann.parent / "images"}


def polish(run: dict[str, Path], out: Path, *args: str):
    return CliRunner().invoke(
        app,
        [
            "polish", "--images", str(run["images"]), "--out", str(out),
            "--teacher", str(run["root"] / "teacher.pt"),
            "--polisher", str(run["root"] / "polisher.pt"), "--device", "cpu", *args,
        ],
    )  # fmt: skip


def test_polish_section_sets_the_thresholds_and_flags_override(tiny_run, tmp_path):
    config = write_yaml(
        tmp_path / "polish.yaml",
        {
            "polish": {
                "initial_thresh": 0.0, "detections_per_img": 2, "cls_prob": 0.6,
                "teacher_score": 0.7, "workers": 0, "batch_size": 3,
            }
        },
    )  # fmt: skip
    out = tmp_path / "labels.parquet"
    result = polish(tiny_run, out, "--config", str(config), "--teacher-score", "0.4")
    assert result.exit_code == 0, result.output
    table, meta = read_pseudo_labels(out)
    assert meta[META_THRESHOLDS] == {
        "test_score": 0.001, "test_nms": 0.5, "test_max_dets": 2,
        "initial": 0.0, "cls_prob": 0.6, "teacher_score": 0.4, "reg_steps": 1, "tta": 0,
        # config and flag values are the user's (the polisher holds no fitted ones)
        "keep_rule": "fitted", "cls_prob_source": "user", "teacher_score_source": "user",
        "keep_rule_source": "user",
        "reg_steps_source": "default (polisher not checked on real pairs)",
    }  # fmt: skip
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert len(rows) == 6 * 2  # detections_per_img from the config
    for r in rows:
        assert r["use_cls"] == (r["polisher_prob"] >= 0.6 or r["teacher_score"] > 0.4)
    bad = write_yaml(tmp_path / "bad.yaml", {"polish": {"cls_prob": 2}})
    refused = polish(tiny_run, tmp_path / "x.parquet", "--config", str(bad))
    assert isinstance(refused.exception, DplError)
    assert str(refused.exception) == f"{bad}: polish.cls_prob: must be in [0, 1], got 2"
    assert not (tmp_path / "x.parquet").exists()


def resumable(run: dict[str, Path], out: Path, kind: str, min_size: int, **kwargs) -> Path:
    """A periodic-checkpoint-like file at ``out``: a model with a training state."""
    categories = json.loads(run["ann"].read_text())["categories"]
    model = build_detector("mobilenet_v2_fpn", len(categories), "none", min_size, 96, **kwargs)
    spec = DetectorSpec(
        "mobilenet_v2_fpn", categories, min_size, 96, kind=kind,
        extra={"backbone_weights": "none"},
    )  # fmt: skip
    return save_detector(out, model, spec, {"iteration": 1, "optimizer": {}})


def test_resume_refuses_a_different_teacher_model(tiny_run, tmp_path):
    out = resumable(tiny_run, tmp_path / "teacher.pt", "teacher", 64)
    model = {"arch": "resnet18_fpn", "min_size": 64, "max_size": 96}
    cfg = load_config(None, {"model": model, "teacher": {"iters": 2, "workers": 0}})
    with pytest.raises(DplError) as info:
        train_teacher(tiny_run["ann"], tiny_run["images"], out, cfg, "cpu", resume=True)
    assert str(info.value) == (
        f"{out}: cannot resume a different model: model.arch 'resnet18_fpn' (checkpoint: "
        "'mobilenet_v2_fpn') (drop --resume to start again, or write to another --out)"
    )
    model = {"arch": "mobilenet_v2_fpn", "min_size": 80, "backbone_weights": "imagenet"}
    cfg = load_config(cfg, {"model": model})  # a config is read-only: build another
    with pytest.raises(DplError, match="model.min_size 80 .checkpoint: 64.; model.backbone_w"):
        train_teacher(tiny_run["ann"], tiny_run["images"], out, cfg, "cpu", resume=True)


def test_resume_refuses_a_student_of_another_teacher_model(tiny_run, tmp_path):
    labels = tmp_path / "labels.parquet"
    result = polish(
        tiny_run, labels, "--initial-threshold", "0", "--max-dets", "2", "--workers", "0"
    )
    assert result.exit_code == 0, result.output
    out = resumable(tiny_run, tmp_path / "student.pt", "student", 80)  # the teacher: 64 px
    teacher = tiny_run["root"] / "teacher.pt"
    # the untrained teacher's boxes keep no classification label: allowed, to reach resume
    cfg = load_config(None, {"student": {"iters": 2, "workers": 0, "allow_empty": True}})
    with pytest.raises(DplError) as info:
        train_student(
            tiny_run["ann"], tiny_run["images"], labels, out, cfg, teacher, device="cpu",
            resume=True,
        )  # fmt: skip
    assert str(info.value).startswith(
        f"{out}: cannot resume a different model: --init {teacher}: min_size 64 (checkpoint: 80)"
    )
    # the same model is accepted (here the test checks only the comparison)
    kwargs = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 20}  # the teacher's
    same = read_checkpoint(resumable(tiny_run, tmp_path / "same.pt", "student", 64, **kwargs))
    check_same_model(same, requested_student_model(teacher, cfg), tmp_path / "same.pt")


def crafted(path: Path, **spec_changes) -> Path:
    spec = {"arch": "mobilenet_v2_fpn", "categories": [{"id": 1, "name": "a"}]}
    spec |= {"min_size": 64, "max_size": 96, "kind": "teacher", "extra": {}, **spec_changes}
    payload = {"spec": spec, "build": {}, "state_dict": {}, "train_state": None}
    return write_payload(path, FORMAT, FORMAT_VERSION, payload)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"arch": "vgg16"}, "unknown architecture 'vgg16'"),
        ({"arch": None}, "unknown architecture None"),
        ({"categories": 5}, "categories must be a non-empty list, got int"),
        ({"categories": "abc"}, "categories must be a non-empty list, got str"),
        ({"categories": [{"id": "1"}]}, "is not a mapping with an integer id"),
        ({"categories": [{"id": 1}, {"id": 1}]}, "categories repeat an id"),
        ({"min_size": "480"}, "min_size must be a positive integer, got '480'"),
        ({"max_size": 0}, "max_size must be a positive integer, got 0"),
        ({"kind": "oracle"}, "kind must be one of teacher, student"),
        ({"extra": []}, "extra must be a mapping"),
    ],
)
def test_crafted_checkpoint_spec_is_a_one_line_error(tmp_path, changes, problem):
    path = crafted(tmp_path / "bad.pt", **changes)
    with pytest.raises(DplError) as info:
        load_detector(path)
    text = str(info.value)
    assert text.startswith(f"{path}: invalid detector checkpoint: ") and problem in text
    assert "\n" not in text


def test_crafted_checkpoint_through_the_cli(tiny_run, tmp_path):
    nospec = write_payload(tmp_path / "nospec.pt", FORMAT, FORMAT_VERSION, {"build": {}})
    with pytest.raises(DplError, match="nospec.pt: invalid detector checkpoint: no model spec"):
        load_detector(nospec)
    model = crafted(tmp_path / "crafted.pt", min_size="480")
    out = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "evaluate", "--model", str(model),
         "--ann", str(tiny_run["ann"]), "--images", str(tiny_run["images"])],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: {model}: invalid detector checkpoint: min_size must be a positive integer, "
        "got '480'"
    )


def test_yaml_mistakes_are_named(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("teacher:\n  iters: 5\n  iters: 6\n")
    with pytest.raises(
        DplError, match=r"dup.yaml: not valid YAML \(duplicate key 'iters' at line 3"
    ):
        load_config(dup)
    # a section with every key commented out is empty, not an error
    empty = tmp_path / "empty.yaml"
    empty.write_text("teacher:\n  iters: 7\nstudent:\n  # iters: 9\n")
    assert load_config(empty)["teacher"]["iters"] == 7
    # a key of another section says where it belongs
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("polisher:\n  train_crop: 320\n")
    with pytest.raises(DplError, match=r"elsewhere.yaml: unknown key polisher.train_crop \(a "
                       r"setting of the teacher and student sections\)"):  # fmt: skip
        load_config(elsewhere)
