"""The report's plots as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from dpl_tools.evaluation.pseudo_quality import VIEW_TITLES  # noqa: E402
from dpl_tools.report.summary import box_shift_iou, has_teacher_box  # noqa: E402

MAX_SCATTER_POINTS = 20000
FIGSIZE = (5.0, 3.4)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histogram(values: np.ndarray, path: Path, title: str, xlabel: str) -> None:
    """A 0..1 histogram of ``values`` (NaNs dropped) written to ``path``."""
    values = values[~np.isnan(values)]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.hist(values, bins=40, range=(0.0, 1.0), color="#3478b5")
    ax.set(title=f"{title} ({len(values)} boxes)", xlabel=xlabel, ylabel="boxes", xlim=(0, 1))
    _save(fig, path)


def iou_before_after(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    """Scatter of each box's IoU to truth before (teacher) and after (polished) polishing."""
    # the page's "improved" figure: boxes whose teacher box has IoU >= 0.5 with its truth
    good = before >= 0.5
    better = float(np.mean(after[good] > before[good])) if good.any() else 0.0
    rng = np.random.default_rng(0)
    if len(before) > MAX_SCATTER_POINTS:
        keep = rng.choice(len(before), MAX_SCATTER_POINTS, replace=False)
        before, after = before[keep], after[keep]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(before, after, s=6, alpha=0.4, color="#3478b5", linewidths=0)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(
        title=f"IoU to truth ({better:.1%} of IoU >= .5 improved)",
        xlabel="teacher box",
        ylabel="polished box",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    _save(fig, path)


def pr_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Precision/recall curves (IoU 0.5, class-aware) of the three pseudo-label views."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, curve in curves.items():
        if curve["recall"]:
            ax.plot(curve["recall"], curve["precision"], label=VIEW_TITLES[name])
    ax.set(title="precision / recall at IoU 0.5", xlabel="recall", ylabel="precision")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def line_plot(
    lines: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str, ylabel: str
) -> None:
    """One line per legend entry of (x, y) points, e.g. a training log over iterations."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for legend, points in lines.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=legend)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


SWEEP_TITLES = {"cls_prob": "polisher probability threshold (cls_prob)",
                "teacher_score": "teacher score threshold (teacher_score)"}  # fmt: skip


def keep_rule_curves(sweep: dict[str, Any], path: Path) -> None:
    """Precision, recall and F1 of the classification pseudo labels against each keep
    threshold (the other at the operating point), the operating point marked."""
    point = sweep["operating_point"]
    values = [v for n in ("cls_prob", "teacher_score") for m in ("precision", "recall", "f1")
              for v in sweep[n][m]]  # fmt: skip
    low = max(0.0, np.floor((min(values, default=0.0) - 0.05) * 10) / 10)  # zoom to the curves
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    for ax, name in zip(axes, ("cls_prob", "teacher_score"), strict=True):
        curve = sweep[name]
        for metric, colour in (("precision", "#3478b5"), ("recall", "#d9822b"), ("f1", "#2a9d4b")):
            ax.plot(curve["threshold"], curve[metric], label=metric, color=colour)
        ax.axvline(point[name], color="grey", ls="--", lw=1)
        ax.plot([point[name]] * 3, [point["precision"], point["recall"], point["f1"]], "ko", ms=4)
        ax.set(xlabel=SWEEP_TITLES[name], xlim=(0, 1), ylim=(low, 1.02))
        ax.set_title(f"operating point {name} {point[name]:g}", fontsize=9)
    axes[0].set_ylabel("classification pseudo labels")
    axes[0].legend(fontsize=8, loc="lower left")
    _save(fig, path)


def make_plots(
    table: pa.Table,
    out_dir: Path,
    quality: dict[str, Any] | None,
    sweep: dict[str, Any] | None = None,
) -> list[tuple]:
    """Write the report's PNGs into ``out_dir``; returns (title, file name) pairs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = table.filter(has_teacher_box(table))
    plots = []

    def column(name: str) -> np.ndarray:
        return boxes[name].to_numpy(zero_copy_only=False).astype(np.float64)

    histogram(column("teacher_score"), out_dir / "teacher_score.png", "Teacher score", "score")
    plots.append(("Teacher score", "teacher_score.png"))
    histogram(
        column("polisher_prob"),
        out_dir / "polisher_prob.png",
        "Polisher probability",
        "best foreground probability",
    )
    plots.append(("Polisher probability", "polisher_prob.png"))
    histogram(
        box_shift_iou(boxes),
        out_dir / "box_shift.png",
        "Box shift",
        "IoU between teacher and polished box",
    )
    plots.append(("Box shift", "box_shift.png"))
    if quality is not None:
        before = np.asarray(quality["iou_to_truth"]["before"], dtype=np.float64)
        after = np.asarray(quality["iou_to_truth"]["after"], dtype=np.float64)
        iou_before_after(before, after, out_dir / "iou_to_truth.png")
        plots.append(("IoU to truth, before vs after", "iou_to_truth.png"))
        pr_curves(quality["pr_curves"], out_dir / "pr_curves.png")
        plots.append(("Precision / recall", "pr_curves.png"))
    if sweep is not None:
        keep_rule_curves(sweep, out_dir / "keep_rule.png")
        plots.append(("Keep rule: precision, recall and F1 by threshold", "keep_rule.png"))
    return plots
