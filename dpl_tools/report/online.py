"""The report of an online student (``dpl report STUDENT.pt``): its in-loop pseudo-label log.

``dpl train-student --online --unlabeled-gt`` keeps a log in the checkpoint (``online_log``:
one entry per log line, see ``dpl_tools.engine.online``). The report shows it as a table and
as two plots over the iterations: the fixed evaluation slice (precision at one recall, the
teacher boxes' AP50) and the training batches' pseudo labels (precision, box IoU before and
after polishing), so a user sees whether the pseudo labels improved as the student trained.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import read_checkpoint
from dpl_tools.outputs import check_owned_folder, owned_folder
from dpl_tools.report.html import cell_text, html_page
from dpl_tools.report.plots import line_plot

# (log key, column title) of the report's table, in order
COLUMNS = (
    ("iteration", "iteration"),
    ("pseudo_boxes", "pseudo boxes"),
    ("teacher_precision", "batches: teacher P"),
    ("kept_precision", "kept P"),
    ("kept_recall", "kept R"),
    ("iou_before", "IoU before"),
    ("iou_after", "after"),
    ("slice_teacher_ap50", "slice: teacher AP50"),
    ("slice_kept_precision", "kept P"),
    ("slice_kept_recall", "kept R"),
    ("slice_teacher_precision_at_recall", "teacher P@R"),
    ("slice_kept_precision_at_recall", "kept P@R"),
    ("polisher_reg", "joint polishers: reg loss"),
    ("polisher_cls", "cls loss"),
)
# (title, file, y label, [(log key, legend)]) of the report's plots
PLOTS = (
    ("Evaluation slice", "slice.png", "precision / AP50",
     [("slice_teacher_precision_at_recall", "teacher boxes, precision at R"),
      ("slice_kept_precision_at_recall", "kept pseudo labels, precision at R"),
      ("slice_teacher_ap50", "teacher boxes, AP50")]),
    ("Training batches", "batches.png", "precision / IoU",
     [("teacher_precision", "teacher boxes, precision"),
      ("kept_precision", "kept pseudo labels, precision"),
      ("iou_before", "matched box IoU, teacher"), ("iou_after", "matched box IoU, polished")]),
)  # fmt: skip


def online_log(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The in-loop log of an online student checkpoint (a one-line DplError otherwise)."""
    extra = read_checkpoint(checkpoint)["spec"].get("extra") or {}
    if not extra.get("online"):
        raise DplError(f"{checkpoint}: not an online student (dpl report takes a pseudo-label "
                       "file or a checkpoint of dpl train-student --online)")  # fmt: skip
    return list(extra.get("online_log") or [])


def _table_html(log: list[dict[str, Any]]) -> str:
    keys = [(k, t) for k, t in COLUMNS if any(e.get(k) is not None for e in log)]
    head = "".join(f"<th>{escape(t)}</th>" for _, t in keys)
    rows = [
        "<tr>" + "".join(f"<td>{cell_text(e.get(k))}</td>" for k, _ in keys) + "</tr>" for e in log
    ]
    return f"<table><tr>{head}</tr>" + "".join(rows) + "</table>"


def build_online_report(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out/index.html`` (and its plots) for an online student; returns its path."""
    log = online_log(checkpoint)
    out = Path(out)
    check_owned_folder(out, "report", "a dpl report")
    with owned_folder(out, "report", "dpl report", "a dpl report") as tmp:
        (tmp / "plots").mkdir()
        body = [f"<h1>Online training report</h1><p>Student: <code>{escape(str(checkpoint))}"
                "</code></p>"]  # fmt: skip
        if not log:
            body.append("<p>No log line: the run was not given <code>--unlabeled-gt</code> "
                        "or stopped before its first line.</p>")  # fmt: skip
        else:
            at = next((e["slice_at_recall"] for e in log if "slice_at_recall" in e), None)
            if at is not None:
                body.append(
                    f"<p>Evaluation slice: the same {log[0]['slice_images']} unlabeled "
                    f"images at every line; precision compared at recall R = {at}.</p>"
                )
            body.append(_table_html(log))
            body.append('<h2>Plots</h2><div class="plots">')
            for title, name, ylabel, series in PLOTS:
                lines = {legend: [(e["iteration"], e[k]) for e in log if e.get(k) is not None]
                         for k, legend in series}  # fmt: skip
                if any(lines.values()):
                    line_plot(lines, tmp / "plots" / name, title, "iteration", ylabel)
                    body.append(f'<img src="plots/{name}" alt="{escape(title)}">')
            body.append("</div>")
        (tmp / "index.html").write_text(html_page("dpl online report", "\n".join(body)), "utf-8")
    return out / "index.html"
