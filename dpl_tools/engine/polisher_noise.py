"""The polishers' noise file (``noise.parquet``) from a noise model: what ``dpl synth-noise``
and ``dpl train-polisher --noise-model`` run.

* ``gaussian``: the paper's noise around the labeled GT boxes.
* ``empirical``: Gaussian replaced by the teacher's own errors, fitted by running it on
  ``heldout_ann`` (labeled images it did not train on; never a test split) or, without it,
  on its own training images (which understates its errors).
* ``crossfit``: cross-fitting (``dpl_tools.engine.crossfit``) gives out-of-fold detections
  of every labeled image; the synthetic pairs use the empirical noise fitted on them, and
  the real pairs (detections matched to the GT, with ``source`` "real") are added to every
  round. The noise metadata records the folds and the pair counts.
* a labeler's detections (``LabelerDetections``, ``--detections``): any detector's boxes on
  the labeled images, matched to their ground truth, take the fold teachers' place (written
  to ``labeler_detections.parquet`` beside the noise file, in the crossfit schema): real
  pairs, the empirical noise of the synthetic pairs, and later the keep-threshold fit all
  come from that labeler's own mistakes. Whatever the noise model, these detections are
  the real-error source. If the labeler trained on these images its errors here are
  optimistic; out-of-fold predictions (each image predicted by a model that did not train
  on it) are honest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from dpl_tools.data.coco import CocoData, load_coco
from dpl_tools.data.crossfit_detections import (
    detections_by_image,
    labeler_path,
    labeler_table,
    write_crossfit,
)
from dpl_tools.data.detections import load_detections
from dpl_tools.data.noise_models import GaussianNoise, NoiseModel
from dpl_tools.data.polisher_pairs import (
    GroundTruth,
    NoiseSummary,
    PairSettings,
    RealPairRules,
    noise_metadata,
    real_pairs,
    synthesize_pairs,
    write_noise_parquet,
)
from dpl_tools.defaults import NOISE_MODELS
from dpl_tools.engine.crossfit import (
    CrossfitResult,
    empirical_from_crossfit,
    fit_empirical_noise,
    run_crossfit,
)
from dpl_tools.errors import DplError
from dpl_tools.progress import Progress


@dataclass
class LabelerDetections:
    """Another labeler's detections of the labeled images (``--detections``), with its class
    names file and category map as ``dpl polish --detections`` takes them."""

    path: Path
    classes: Path | None = None
    category_map: Path | None = None


@dataclass
class NoiseFile:
    """A written noise file: its noise model, summary, ground truth and (crossfit) folds."""

    path: Path
    model: NoiseModel
    summary: NoiseSummary
    gt: GroundTruth
    crossfit: CrossfitResult | None = None
    labeler: dict[str, Any] | None = None  # what was read from --detections
    rounds: int = 1  # independent noise draws
    source: str = "gaussian"  # the real-error source: the noise model, or detections


def _progress(console: Console, name: str) -> Progress:
    return Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)  # fmt: skip


def make_noise_file(
    config: dict[str, Any],
    ann_path: str | Path,
    out_path: str | Path,
    seed: int = 0,
    teacher_path: str | Path | None = None,
    images: str | Path | None = None,
    heldout_ann: str | Path | None = None,
    device: str = "auto",
    workers: int = 2,
    console: Console | None = None,
    allow_outside_root: bool = False,
    labeler: LabelerDetections | None = None,
) -> NoiseFile:
    """Write ``out_path`` with the ``polisher`` section's noise model (``config`` has every
    section); ``teacher_path`` and ``images`` are needed by ``empirical`` and ``crossfit``.
    With ``labeler`` its detections are the real-error source instead (module docstring)."""
    console = console or Console()
    cfg = config["polisher"]
    name = cfg["noise_model"]
    if name not in NOISE_MODELS:
        raise DplError(f"--noise-model {name!r}: choose from {', '.join(NOISE_MODELS)}")
    settings = PairSettings.from_section(cfg)
    settings.groups("cls")  # validates copies vs scales
    rounds = cfg["rounds"]
    coco = load_coco(ann_path)
    for line in coco.report.lines():
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    gt = GroundTruth.from_coco(coco)
    if len(gt.boxes) == 0:
        raise DplError(f"{ann_path}: no boxes to synthesize pairs from")
    if labeler is not None and heldout_ann is not None:
        raise DplError("--heldout-ann is for --noise-model empirical; --detections needs none")
    if labeler is None and name != "gaussian" and (images is None or teacher_path is None):
        raise DplError(f"--noise-model {name} needs --teacher and --images (the labeled images)")

    model: NoiseModel = GaussianNoise()
    crossfit = None
    real_source: Path | None = None  # detections in the crossfit schema: the real errors
    described: dict[str, Any] = {}
    if labeler is not None:
        real_source, described = _labeler_file(labeler, coco, Path(out_path), console)
    elif name == "empirical":
        model = _fit_on_heldout(cfg, coco, ann_path, teacher_path, images, heldout_ann, device,
                                workers, console, allow_outside_root)  # fmt: skip
    elif name == "crossfit":
        if heldout_ann is not None:
            raise DplError("--heldout-ann is for --noise-model empirical; crossfit needs none")
        labeled = load_coco(ann_path, images, allow_outside_root=allow_outside_root)
        crossfit = run_crossfit(teacher_path, ann_path, labeled, images, out_path, config, seed,
                                device, workers, console, allow_outside_root)  # fmt: skip
        real_source, described = crossfit.path, _described(crossfit)
    if real_source is not None:
        fitted = empirical_from_crossfit(real_source, gt, cfg)
        if fitted is None:
            console.print(f"[yellow]warning:[/] {described['model']}: no detection matched a "
                          "GT box; the synthetic pairs use the Gaussian noise")  # fmt: skip
        else:
            model = fitted
    if model.name == "empirical":
        _print_fit(model, console)

    meta = noise_metadata(coco, model, settings, rounds, seed)
    tables = synthesize_pairs(gt, model, settings, rounds, seed)
    if real_source is not None:
        rules = RealPairRules(
            cfg["empirical_min_match_iou"], config["polish"]["initial_thresh"],
            cfg["empirical_cls_min_score"], settings.fg_iou,
        )  # fmt: skip
        real = _real_pairs(gt, real_source, rules, rounds)
        meta["noise"] = {**described, "real_rules": asdict(rules),
                         "real_pairs": {k: _count(real[0], k) for k in ("reg", "cls")},
                         "synthetic": meta["noise"]}  # fmt: skip
        tables = _chain(tables, real)
    total = rounds * len(gt.boxes) * settings.rows_per_box()
    with _progress(console, "synth-noise") as progress:
        task = progress.add_task("pairs", total=total)
        summary = write_noise_parquet(
            out_path, tables, meta, on_chunk=lambda t: progress.advance(task, t.num_rows)
        )
    labeler_read = described.get("labeler")
    source = "detections" if labeler_read else name
    return NoiseFile(Path(out_path), model, summary, gt, crossfit, labeler_read, rounds, source)


def _described(crossfit: CrossfitResult) -> dict[str, Any]:
    """What the noise file's metadata says of the cross-fitting that made its real errors."""
    return {
        "model": "crossfit",
        "folds": len(crossfit.folds),
        "fold_iterations": crossfit.fold_iters,
        "teacher_iterations": crossfit.teacher_iters,
        "crossfit_file": str(crossfit.path),
    }


def _real_pairs(gt: GroundTruth, source: Path, rules: RealPairRules, rounds: int) -> list[pa.Table]:
    """The real (detection, truth) pairs of every round from the detections in ``source``."""
    dets = list(detections_by_image(source))
    return [real_pairs(gt, dets, rules, r) for r in range(rounds)]


def _labeler_file(
    labeler: LabelerDetections, coco: CocoData, out_path: Path, console: Console
) -> tuple[Path, dict[str, Any]]:
    """Read the labeler's detections of ``coco``'s images and write them beside the noise
    file in the crossfit schema; ``(that file, the noise description)``."""
    given = load_detections(
        labeler.path, coco.images, coco.categories, labeler.classes, labeler.category_map,
        images_option="--ann",
    )  # fmt: skip
    covered = sum(1 for r in coco.images if r["file_name"] in given.by_file)
    if covered == 0:
        raise DplError(
            f"{labeler.path}: no detection on any of the {len(coco.images)} labeled images "
            "(--detections must hold the labeler's boxes on the labeled images, e.g. its "
            "out-of-fold predictions)"
        )
    if covered < len(coco.images):
        console.print(
            f"[yellow]note:[/] {labeler.path}: no detection on {len(coco.images) - covered} of "
            f"{len(coco.images)} labeled images (their objects count as missed)",
            highlight=False,
        )
    path = labeler_path(out_path)
    table = labeler_table(given, coco.images)
    seen = {"images": covered, "detections": given.count, "dropped_classes": given.dropped_classes}
    write_crossfit(path, table, {"source": given.source, **seen})
    console.print(
        f"--detections: {given.count} boxes on {covered} of {len(coco.images)} labeled images "
        f"-> {path} (the real pairs and the empirical noise)",
        highlight=False,
    )
    labeler_meta = {**given.source, **seen}
    return path, {"model": "detections", "labeler": labeler_meta, "detections_file": str(path)}


def _count(table: pa.Table, kind: str) -> int:
    """Rows of ``kind`` in a pair table."""
    return int(pc.sum(pc.equal(table["kind"], kind)).as_py() or 0)


def _chain(*parts: Iterable[pa.Table]) -> Iterator[pa.Table]:
    for part in parts:
        yield from part


def _fit_on_heldout(
    cfg: dict[str, Any],
    coco: CocoData,
    ann_path: str | Path,
    teacher_path: str | Path,
    images: str | Path,
    heldout_ann: str | Path | None,
    device: str,
    workers: int,
    console: Console,
    allow_outside_root: bool,
) -> NoiseModel:
    """The empirical noise fitted by running the teacher on ``heldout_ann`` (or ``coco``)."""
    from dpl_tools.models.checkpoint import load_detector
    from dpl_tools.runtime import resolve_device

    if heldout_ann is None:
        console.print(
            "[yellow]warning:[/] no --heldout-ann: fitting the noise on the teacher's own "
            "training images, whose errors understate its real errors (--noise-model crossfit "
            "fits on out-of-fold detections instead)"
        )
        fit_coco = coco
    else:
        fit_coco = load_coco(heldout_ann, images, allow_outside_root=allow_outside_root)
    dev = resolve_device(device)
    detector, _ = load_detector(teacher_path, dev)
    with _progress(console, "fit noise") as progress:
        task = progress.add_task("fit", total=len(fit_coco.images))
        return fit_empirical_noise(
            detector, fit_coco, images, dev, workers=workers,
            min_match_iou=cfg["empirical_min_match_iou"],
            reg_min_score=cfg["empirical_reg_min_score"],
            cls_min_score=cfg["empirical_cls_min_score"],
            inflate=cfg["empirical_inflate"],
            progress=lambda: progress.advance(task),
        )  # fmt: skip


def _print_fit(model: NoiseModel, console: Console) -> None:
    fitted = model.describe()
    std = ", ".join(f"{v:.3f}" for v in fitted["relative_std_confident"])
    console.print(
        f"empirical noise: {fitted['matched_detections']} matched detections "
        f"({fitted['confident_detections']} with score >= {model.reg_min_score}); "
        f"relative std (x1, y1, x2, y2) = {std}",
        highlight=False,
    )


def print_crossfit(crossfit: CrossfitResult, console: Console) -> None:
    """One line on what cross-fitting did and cost."""
    trained = len(crossfit.folds) - len(crossfit.reused)
    console.print(
        f"crossfit: {len(crossfit.folds)} fold teachers x {crossfit.fold_iters} iterations "
        f"= {crossfit.cost:.2f}x the teacher's {crossfit.teacher_iters} ({trained} trained in "
        f"{sum(crossfit.fold_seconds):.1f} s, {len(crossfit.reused)} reused); detections "
        f"-> {crossfit.path}",
        highlight=False,
    )
