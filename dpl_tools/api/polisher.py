"""The polishers from Python: synthesize their training pairs (``dpl synth-noise``) and
train them (``dpl train-polisher``), making the pairs first when a noise model is given."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.api.config import ConfigLike, stage_config
from dpl_tools.data.crossfit_detections import (
    crossfit_path,
    labeler_path,
    read_crossfit_detections,
)
from dpl_tools.engine.polisher_noise import (
    LabelerDetections,
    NoiseFile,
    make_noise_file,
    print_crossfit,
)
from dpl_tools.engine.train_polisher import PolisherResult
from dpl_tools.errors import DplError
from dpl_tools.outputs import check_distinct_outputs
from dpl_tools.runtime import cleanup_distributed


def labeler_detections(
    detections: str | Path | None,
    classes: str | Path | None = None,
    category_map: str | Path | None = None,
) -> LabelerDetections | None:
    """Another labeler's boxes of the labeled images (``--detections``), or None."""
    if detections is None:
        return None
    return LabelerDetections(
        Path(detections),
        None if classes is None else Path(classes),
        None if category_map is None else Path(category_map),
    )


def synth_noise(
    ann: str | Path,
    out: str | Path = "runs/noise.parquet",
    config: ConfigLike = None,
    *,
    images: str | Path | None = None,
    teacher: str | Path | None = None,
    heldout_ann: str | Path | None = None,
    detections: str | Path | None = None,
    detection_classes: str | Path | None = None,
    category_map: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    workers: int = 2,
    allow_outside_root: bool = False,
    console: Console | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> NoiseFile:
    """Write the polishers' training pairs (noisy / true boxes) for the labeled set ``ann``
    to ``out``; the learned noise models need ``images`` and the ``teacher`` checkpoint."""
    cfg = stage_config(config, "polisher", overrides, flags, sets)
    pcfg = cfg["polisher"]
    labeler = labeler_detections(detections, detection_classes, category_map)
    if pcfg["noise_model"] != "gaussian" and labeler is None:
        if images is None or teacher is None:
            raise DplError(
                f"--noise-model {pcfg['noise_model']} needs --images (the labeled images' "
                "folder) and the teacher"
            )
    else:
        teacher = None
    out = Path(out)
    check_distinct_outputs(
        {"--ann": ann, "--heldout-ann": heldout_ann, "--teacher": teacher,
         "--detections": detections, "--detection-classes": detection_classes,
         "--category-map": category_map},
        {"--out": out, "labeler detections": labeler_path(out) if labeler else None},
    )  # fmt: skip
    return make_noise_file(
        cfg, ann, out, seed, teacher, images, heldout_ann, device, workers,
        console or Console(), allow_outside_root, labeler,
    )  # fmt: skip


@dataclass
class TrainedPolisher:
    """A trained polisher: its checkpoint, the run's figures (validation, the fitted keep
    rule, the regression check) and the noise file it was made with, when it made one."""

    checkpoint: Path
    result: PolisherResult
    noise: NoiseFile | None
    config: dict[str, Any]
    fitted_on: str = "cross-fitted"  # the boxes the keep rule was fitted on (or "labeler's")


def train_polisher(
    teacher: str | Path,
    ann: str | Path,
    images: str | Path,
    out: str | Path = "runs/polisher.pt",
    config: ConfigLike = None,
    *,
    noise: str | Path = "runs/noise.parquet",
    make_noise: bool = True,
    crossfit: str | Path | Sequence[str | Path] | None = None,
    detections: str | Path | None = None,
    detection_classes: str | Path | None = None,
    category_map: str | Path | None = None,
    val_json: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    allow_outside_root: bool = False,
    console: Console | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> TrainedPolisher:
    """Train the regression and classification polishers on the labeled set with the
    frozen ``teacher`` (``dpl train-polisher``). ``make_noise``: write the training pairs
    to ``noise`` first (the config's noise model; ``detections``: another labeler's
    boxes), else read them from there. ``crossfit``: the cross-fitted detections (or
    candidate files, the first existing one) the keep rule is fitted on."""
    console = console or Console()
    cfg = stage_config(config, "polisher", overrides, flags, sets)
    noise = Path(noise)
    labeler = labeler_detections(detections, detection_classes, category_map)
    if make_noise and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise DplError(
            "--noise-model / --detections under torchrun: make the noise file first "
            "(dpl synth-noise)"
        )
    labeler_file = labeler_path(noise) if labeler is not None else None
    if crossfit is None:  # the thresholds are fitted on the labeler's own boxes, if any
        candidates = [labeler_file] if labeler_file else [crossfit_path(noise)]
    elif isinstance(crossfit, str | Path):
        candidates = [Path(crossfit)]
    else:
        candidates = [Path(c) for c in crossfit]
    given_crossfit = crossfit if isinstance(crossfit, str | Path) else None
    if given_crossfit is not None:  # a bad file fails now, not after training
        if not Path(given_crossfit).is_file():
            raise DplError(f"{given_crossfit}: cross-fitted detections (--crossfit) not found")
        read_crossfit_detections(given_crossfit)
    check_distinct_outputs(
        {"--teacher": teacher, "--ann": ann, "--images": images, "--crossfit": given_crossfit,
         "--detections": detections, "--detection-classes": detection_classes,
         "--category-map": category_map, **({} if make_noise else {"--noise": noise})},
        {"--out": out, "--val-json": val_json,
         **({"--noise": noise, "labeler detections": labeler_file} if make_noise else {})},
    )  # fmt: skip
    made = None
    if make_noise:
        made = make_noise_file(
            cfg, ann, noise, seed, teacher, images, None, device,
            int(cfg["polisher"]["workers"]), console, allow_outside_root, labeler,
        )  # fmt: skip
        if made.crossfit is not None:
            print_crossfit(made.crossfit, console)
    from dpl_tools.engine.train_polisher import train_polisher as train

    try:
        _, result = train(
            teacher, noise, ann, images, out, cfg, device, seed, val_json, console,
            resume=resume, allow_outside_root=allow_outside_root, crossfit=candidates,
        )  # fmt: skip
    finally:
        cleanup_distributed()
    boxes = "labeler's" if labeler is not None else "cross-fitted"
    return TrainedPolisher(Path(out), result, made, cfg, boxes)
