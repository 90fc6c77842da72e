"""The defaults table: every setting of every config section, each written once.

As detectron2's ``config/defaults.py``: one table, one section per stage (``model``,
``teacher``, ``polisher`` (pair synthesis and polisher training), ``polish``, ``student``),
plus the ``data`` / ``run`` sections that only ``dpl run`` configs have. Each entry is a
``Setting``: its default value and what a valid value is (type, range, choices). The
settings dataclasses (``TrainConfig``, ``PairSettings``, ``PolishSettings``) take their
defaults from here, ``dpl_tools.config`` checks YAML files against it, and the CLI flags
of the same settings use the same ranges (``dpl_tools.cli.options``). Importing this module
imports nothing heavy (no torch), so ``load_config()`` is cheap.
"""

from __future__ import annotations

from typing import Any

from dpl_tools.settings import (
    AT_LEAST_1,
    NON_NEGATIVE,
    PERCENT,
    POSITIVE,
    UNIT,
    Range,
    Setting,
)

# Detector architectures (``dpl_tools.models.detector`` builds them).
ARCHS = ("r50_fpn", "mobilenet_v2_fpn", "resnet18_fpn")
NOISE_MODELS = ("gaussian", "empirical", "crossfit")
PSEUDO_VIEWS = ("polished", "raw", "reg-only", "cls-only")
STUDENT_NEGATIVES = ("hard", "ignore", "soft")
STUDENT_INITS = ("teacher", "imagenet")
KEEP_RULES = ("fitted", "paper")  # fitted by train-polisher, or the paper's 0.9 / 0.9


def _optimizer(warmup_iters: int) -> dict[str, Setting]:
    """The SGD schedule settings shared by the teacher, polisher and student sections."""
    return {
        "lr": Setting(0.01, "base SGD learning rate", POSITIVE),
        "momentum": Setting(0.9, "SGD momentum", Range(0, 1, high_open=True)),
        "weight_decay": Setting(0.0001, "SGD weight decay", NON_NEGATIVE),
        "warmup_iters": Setting(warmup_iters, "linear warm-up iterations", NON_NEGATIVE),
        "warmup_factor": Setting(0.001, "lr factor at iteration 0 of the warm-up", UNIT),
        "lr_steps": Setting(
            [0.667, 0.889],
            "fractions of iters where lr is multiplied by gamma",
            UNIT,
            item=float,
        ),  # fmt: skip
        "gamma": Setting(0.1, "lr factor at each step", POSITIVE),
        "clip_grad_norm": Setting(
            10.0, "gradient norm clip (0 or null: off)", NON_NEGATIVE, nullable=True
        ),
    }


AUGMENTS = ("weak", "strong")
ERASE_FILLS = ("noise", "grey")
COLOUR_OPS = (
    "photometric",
    "randaugment",
)  # the strong colour op lists (data/augment.py)  # what a Cutout patch shows (data/augment.py)


def _augment(augment: str) -> dict[str, Setting]:
    """The training augmentation (``dpl_tools.data.augment``): ``weak`` is the flip and
    multi-scale resize; ``strong`` adds a colour op, an affine and Cutout (the aug_* keys)."""
    return {
        "augment": Setting(
            augment,
            "training augmentation: weak (flip + multi-scale) or strong (also a colour op, "
            "scale jitter + shift, Cutout; see dpl show --augment)",
            choices=AUGMENTS,
        ),
        "aug_colour_prob": Setting(1.0, "strong: chance of one colour op", UNIT),
        "aug_colour_ops": Setting(
            "photometric",
            "strong: the colour ops drawn from: photometric (brightness, contrast, saturation, "
            "hue) or randaugment (also sharpness, autocontrast, equalize, posterize, "
            "solarize, greyscale)",
            choices=COLOUR_OPS,
        ),
        "aug_geometric_prob": Setting(1.0, "strong: chance of the affine", UNIT),
        "aug_scale": Setting(
            [0.6, 1.4],
            "strong: affine scale jitter [low, high]",
            POSITIVE,
            item=float,
            pair=True,
        ),
        "aug_translate": Setting(
            0.1, "strong: affine shift, fraction of the image side", Range(0, 1, high_open=True)
        ),
        "aug_erase_patches": Setting(
            [1, 5],
            "strong: Cutout patches per image [low, high]",
            NON_NEGATIVE,
            item=int,
            pair=True,
        ),
        "aug_erase_size": Setting(
            [0.05, 0.2],
            "strong: Cutout patch side [low, high], fraction of the image side",
            UNIT,
            item=float,
            pair=True,
        ),  # fmt: skip
        "aug_erase_fill": Setting(
            "noise",
            "strong: what a Cutout patch shows: noise (random pixels, like no object) or grey",
            choices=ERASE_FILLS,
        ),
        "aug_erase_drop": Setting(
            0.7, "strong: boxes erased at least this much leave the loss", UNIT
        ),
        "aug_min_visible": Setting(
            0.3,
            "boxes the strong affine or train_crop leaves less of than this leave the loss",
            UNIT,
        ),
    }


def _detector_training(warmup_iters: int, augment: str = "weak") -> dict[str, Setting]:
    """Settings of a detector's training run (the ``teacher`` and ``student`` sections)."""
    return {
        "iters": Setting(400, "training iterations (total)", AT_LEAST_1),
        "batch_size": Setting(2, "images per iteration per process (per GPU)", AT_LEAST_1),
        **_optimizer(warmup_iters),
        "multiscale": Setting(
            [0.8, 0.9, 1.0, 1.1, 1.2],
            "training shorter sides, x model.min_size",
            POSITIVE,
            nullable=True,
            item=float,
        ),  # fmt: skip
        "hflip": Setting(True, "random horizontal flips"),
        "train_crop": Setting(
            None,
            "train on a random train_crop x train_crop px window of each resized image "
            "(null: whole images): steps cost what a small image costs while objects keep "
            "their test size (large images, small objects); inference sees whole images",
            Range(32, None),
            nullable=True,
            kind=int,
        ),
        **_augment(augment),
        "workers": Setting(2, "DataLoader worker processes", NON_NEGATIVE),
        "checkpoint_every": Setting(
            100, "checkpoint every N iterations (0: at the end)", NON_NEGATIVE
        ),
        "find_unused_parameters": Setting(False, "DDP find_unused_parameters"),
    }


# torchvision FasterRCNN arguments a config may set (``model.detector_kwargs``).
DETECTOR_KWARGS: dict[str, Setting] = {
    **{
        key: Setting(None, range=AT_LEAST_1, nullable=True, kind=int)
        for key in (
            "rpn_pre_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "box_detections_per_img",
            "box_batch_size_per_image",
            "size_divisible",
        )  # fmt: skip
    },
    **{
        key: Setting(None, range=UNIT, nullable=True, kind=float)
        for key in (
            "rpn_nms_thresh",
            "rpn_fg_iou_thresh",
            "rpn_bg_iou_thresh",
            "rpn_positive_fraction",
            "rpn_score_thresh",
            "box_score_thresh",
            "box_nms_thresh",
            "box_fg_iou_thresh",
            "box_bg_iou_thresh",
            "box_positive_fraction",
        )  # fmt: skip
    },
    "image_mean": Setting(None, nullable=True, kind=list, item=float),
    "image_std": Setting(None, range=POSITIVE, nullable=True, kind=list, item=float),
    "bbox_reg_weights": Setting(None, range=POSITIVE, nullable=True, kind=list, item=float),
    "frozen_bn": Setting(
        None, "frozen BatchNorm (default: when pretrained)", nullable=True, kind=bool
    ),
    "frozen_stem": Setting(
        None,
        "freeze the backbone's first layers, as torchvision does (default: when pretrained)",
        nullable=True,
        kind=bool,
    ),
}

SETTINGS: dict[str, dict[str, Setting]] = {
    "model": {
        "arch": Setting("mobilenet_v2_fpn", "detector architecture", choices=ARCHS),
        "backbone_weights": Setting("none", "imagenet, none, or a checkpoint path"),
        "min_size": Setting(480, "test-time shorter image side (px)", AT_LEAST_1),
        "max_size": Setting(800, "longest side cap (px)", AT_LEAST_1),
        "detector_kwargs": Setting(
            {}, "extra torchvision FasterRCNN arguments", keys=DETECTOR_KWARGS
        ),
    },
    "teacher": _detector_training(warmup_iters=100),
    "polisher": {
        # pair synthesis (dpl synth-noise)
        "rounds": Setting(4, "independent noise draws, one per training round", AT_LEAST_1),
        "reg_copies": Setting(150, "regression copies per GT box", NON_NEGATIVE),
        "reg_scale": Setting(0.2, "regression noise scale s", NON_NEGATIVE),
        "cls_copies": Setting([50, 50], "classification copies per group", NON_NEGATIVE, item=int),
        "cls_scales": Setting([0.06, 0.2], "classification noise scale per group", NON_NEGATIVE),
        "fg_iou": Setting(0.7, "IoU with the best GT for a foreground label", UNIT),
        "noise_model": Setting(
            "gaussian",
            "box noise the polishers learn from: gaussian (the paper's), empirical (teacher "
            "errors on held-out labeled images) or crossfit (K fold teachers' out-of-fold errors "
            "on the labeled images, no test split needed); train-polisher: make the noise file "
            "first",
            choices=NOISE_MODELS,
        ),
        "empirical_min_match_iou": Setting(0.5, "IoU matching a detection to its GT", UNIT),
        "empirical_reg_min_score": Setting(0.5, "min score of regression errors", UNIT),
        "empirical_cls_min_score": Setting(0.05, "min score of classification errors", UNIT),
        "empirical_inflate": Setting(1.0, "scale factor on the fitted errors", NON_NEGATIVE),
        "crossfit_folds": Setting(3, "crossfit: folds of the labeled images", Range(2)),
        "crossfit_iters_fraction": Setting(
            None,
            "crossfit: fold teacher iters / teacher iters (null: (K-1)/K, the teacher's "
            "iterations per labeled image)",
            Range(0, 1, low_open=True),
            nullable=True,
            kind=float,
        ),
        "real_fraction": Setting(0.5, "share of real (crossfit) pairs among the pairs", UNIT),
        # training (dpl train-polisher)
        "iters": Setting(400, "training steps", AT_LEAST_1),
        "batch_size": Setting(2, "images per step per process", AT_LEAST_1),
        **_optimizer(warmup_iters=50),
        "workers": Setting(2, "DataLoader worker processes", NON_NEGATIVE),
        "checkpoint_every": Setting(
            100, "checkpoint every N steps for --resume (0: none)", NON_NEGATIVE
        ),
        "reg_per_image": Setting(256, "regression pairs per image per step", AT_LEAST_1),
        "cls_per_image": Setting(
            512, "classification samples (pairs + RPN proposals) per image per step", AT_LEAST_1
        ),
        "max_proposals": Setting(1000, "teacher RPN proposals added per image", NON_NEGATIVE),
        "ema_momentum": Setting(
            0.99, "EMA momentum of the saved copy", Range(0, 1, high_open=True)
        ),
        "val_fraction": Setting(0.1, "labeled images held out for validation (0: off)", UNIT),
        "fit_keep_rule": Setting(
            True,
            "fit dpl polish's keep thresholds on the cross-fitted detections (crossfit.parquet)",
        ),
        "keep_fit_min_matches": Setting(
            30,
            "fewest out-of-fold boxes matching a true box to fit the keep rule on; with fewer "
            "(or a best F1 of 0) keep_fallback is used instead, said in one line",
            NON_NEGATIVE,
        ),
        "keep_fallback": Setting(
            "keep_all",
            "keep rule when the fit has too little to go on: keep_all (every teacher box at "
            "the initial threshold, the teacher's label) or paper (0.9 / 0.9)",
            choices=("keep_all", "paper"),
        ),
        "reg_check_min_pairs": Setting(
            10, "fewest real held-out pairs to check the regression polisher on", NON_NEGATIVE
        ),
        "precision_target": Setting(
            None,
            "fit the keep thresholds for the best recall at this precision of the "
            "classification pseudo labels (null: the best F1)",
            UNIT,
            nullable=True,
            kind=float,
        ),
    },
    "polish": {
        "score_thresh": Setting(0.001, "teacher test-time score threshold", UNIT),
        "nms_thresh": Setting(0.5, "teacher test-time NMS IoU threshold", UNIT),
        "detections_per_img": Setting(100, "teacher detections kept per image", AT_LEAST_1),
        "initial_thresh": Setting(0.5, "teacher score from which a box is polished", UNIT),
        "keep_rule": Setting(
            "fitted",
            "keep thresholds: fitted (by train-polisher on cross-fitted detections; the "
            "paper's when the polisher holds none) or paper (0.9 / 0.9)",
            choices=KEEP_RULES,
        ),
        "cls_prob": Setting(
            None,
            "classification polisher probability that keeps / relabels a box; overrides the "
            "polisher's fitted value (null: keep_rule's)",
            UNIT,
            nullable=True,
            kind=float,
        ),
        "teacher_score": Setting(
            None,
            "teacher score above which a box is kept as it is; overrides the polisher's fitted "
            "value (null: keep_rule's)",
            UNIT,
            nullable=True,
            kind=float,
        ),
        "reg_steps": Setting(
            None,
            "regression polisher passes per box (cascade; 0: the teacher's boxes; null: 1, "
            "or 0 when train-polisher's check on real held-out pairs found polishing worse)",
            Range(0, 10),
            nullable=True,
            kind=int,
        ),
        "tta": Setting(
            False,
            "teacher test-time augmentation: flip + tta_scales passes fused by weighted box "
            "fusion; the fused boxes are the teacher boxes",
        ),
        "tta_scales": Setting([0.8, 1.2], "extra TTA test scales, x model.min_size", POSITIVE),
        "tta_fusion_iou": Setting(0.55, "IoU above which TTA boxes fuse (WBF)", UNIT),
        "batch_size": Setting(
            None,
            "images per batch (null: 16 on GPU, 2 on CPU)",
            AT_LEAST_1,
            nullable=True,
            kind=int,
        ),
        "workers": Setting(2, "DataLoader worker processes decoding images", NON_NEGATIVE),
    },
    "student": {
        # weak until the strong recipe is fixed: on the demo bench (2026-12-06) a labeled-only
        # student from ImageNet with strong augmentation collapsed (benchmarks/RESULTS.md)
        **_detector_training(warmup_iters=100, augment="weak"),
        "iters": Setting(
            None,
            "training iterations (total; null: the teacher section's, a schedule as long as "
            "the teacher's)",
            AT_LEAST_1,
            nullable=True,
            kind=int,
        ),
        "init": Setting(
            "teacher",
            "student's initial weights: teacher (checkpoint) or imagenet (fresh, STAC)",
            choices=STUDENT_INITS,
        ),
        "pseudo_augment": Setting(
            None,
            "augmentation of the pseudo-labeled images only (null: as augment)",
            choices=AUGMENTS,
            nullable=True,
            kind=str,
        ),
        "mixup": Setting(
            0.0, "chance that a pseudo-labeled image is mixed up with another one (MixPL)", UNIT
        ),
        "mosaic": Setting(
            0.0,
            "chance that a pseudo-labeled image is a 2 x 2 mosaic with three others (MixPL); "
            "the detector resizes the mosaic as one image, so its objects train at half "
            "size (mind small objects)",
            UNIT,
        ),
        "unlabeled_ratio": Setting(1.0, "pseudo-labeled images per labeled image", NON_NEGATIVE),
        "unlabeled_weight": Setting(
            1.0,
            "weight w of the pseudo-labeled images' loss: L_labeled + w * L_unlabeled",
            NON_NEGATIVE,
        ),
        "pseudo_view": Setting(
            "polished",
            "the pseudo labels learned from: polished; raw (teacher boxes and labels); reg-only "
            "(classification from the teacher boxes, regression from the polished ones); "
            "cls-only (classification pseudo labels, regression from the teacher boxes)",
            choices=PSEUDO_VIEWS,
        ),
        "negatives": Setting(
            "ignore",
            "background of the unlabeled images: hard (every proposal matching no "
            "classification pseudo label), ignore (teacher boxes not kept for classification "
            "are ignore regions), soft (background weighted by the teacher's background "
            "probability; needs the teacher)",
            choices=STUDENT_NEGATIVES,
        ),
        "disentangle": Setting(
            True,
            "disentangled supervision (the paper: RPN and RoI classification from the "
            "classification pseudo labels, box regression from the polished boxes); off: "
            "polished boxes and labels for every loss",
        ),
        "online": Setting(
            False,
            "online polishing (the paper's training): the EMA teacher and the polishers "
            "label the unlabeled images inside the loop; starts from the teacher",
        ),
        "ema_momentum": Setting(
            0.999, "online: momentum of the EMA teacher", Range(0, 1, high_open=True)
        ),
        "online_polisher": Setting(
            False,
            "online: the polishers keep training on each batch's labeled images with the EMA "
            "teacher's features (the paper's joint form; Gaussian pairs drawn around the truth, "
            "an EMA copy labels; saved as <out stem>.polisher.pt); one more teacher pass per "
            "step, so off by default",
        ),
        "online_polisher_lr": Setting(
            0.001, "online_polisher: the polishers' SGD learning rate (constant)", POSITIVE
        ),
        "online_log_every": Setting(
            50, "online: iterations between two pseudo-label log lines", AT_LEAST_1
        ),
        "online_eval_images": Setting(
            100,
            "online, with --unlabeled-gt: unlabeled images (a fixed seeded sample) that the "
            "EMA teacher and the polishers label and that are scored before training and at "
            "every log line, so the log shows whether the pseudo labels improve; 0: off",
            NON_NEGATIVE,
        ),
        "online_eval_recall": Setting(
            None,
            "online: the recall at which the evaluation slice's precision is compared "
            "(default: the kept pseudo labels' recall before training, or the teacher "
            "boxes' where none is kept)",
            UNIT,
            nullable=True,
            kind=float,
        ),
        "allow_empty": Setting(
            False,
            "train even when the pseudo labels hold no usable box (warns loudly); off: that "
            "is an error",
        ),
    },
}

# Sections only ``dpl run`` configs have (paths relative to the config file).
RUN_SETTINGS: dict[str, dict[str, Setting]] = {
    "data": {
        "ann": Setting(None, "labeled COCO JSON to split (required)", kind=str),
        "images": Setting(None, "its images folder (required)", kind=str),
        "percent": Setting(10.0, "percent of images kept labeled", PERCENT),
        "fold": Setting(1, "fold of the split", NON_NEGATIVE),
        "seed": Setting(0, "seed of the split and of every stage", NON_NEGATIVE),
        "test_ann": Setting(
            None, "test COCO JSON (AP of teacher and students)", nullable=True, kind=str
        ),
        "test_images": Setting(
            None, "its images folder (default: data.images)", nullable=True, kind=str
        ),
    },
    "run": {
        "preset": Setting(None, "preset under the file's own sections", nullable=True, kind=str),
        "run_dir": Setting("dpl-run", "run directory"),
    },
}

DEFAULTS: dict[str, dict[str, Any]] = {
    section: {key: s.default for key, s in table.items()} for section, table in SETTINGS.items()
}


def section_defaults(section: str) -> dict[str, Any]:
    """A fresh copy of one section's default values."""
    import copy

    return copy.deepcopy(DEFAULTS[section])
