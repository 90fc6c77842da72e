"""The pseudo-label sets of one pseudo-label table: the one table of "views".

A pseudo-label file holds, per teacher box, the teacher's box / label and the polished
box / label plus two flags (``use_cls``, ``use_reg``). A *set* is a choice of rows, of
box columns and of a label column. Export (``--coco-view``), pseudo-label quality
(``evaluate --pseudo``) and the student's supervision (``SUPERVISION`` in
``dpl_tools.models.student_criterion``: a pair of sets, classification and regression)
all name their choices from ``LABEL_SETS``:

* ``teacher``: every row with a teacher box, teacher box, teacher label (no polishing);
* ``cls``: the classification pseudo labels, rows with ``use_cls``, teacher box,
  polished label;
* ``reg``: the regression pseudo labels, rows with ``use_reg``, polished box, teacher
  label;
* ``polished``: rows with ``use_cls``, polished box, polished label (one set for both
  uses: the polishers' filter for precision and their refined boxes for localisation).

Each consumer keeps its own rule for unusable rows (missing box or label). Importing this
module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

BOX_COORDS = ("x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class LabelSet:
    """One set of pseudo labels: the rows it takes, and the box and label columns it reads."""

    rows: str | None  # boolean column selecting rows; None: every row with a teacher box
    boxes: str  # box column prefix: "teacher" or "polished"
    labels: str  # label column: "teacher_label" or "polished_label"
    title: str = ""  # what the set is, for tables and plots

    @property
    def box_columns(self) -> tuple[str, ...]:
        """The set's four box columns, xyxy."""
        return tuple(f"{self.boxes}_{c}" for c in BOX_COORDS)


LABEL_SETS: dict[str, LabelSet] = {
    "teacher": LabelSet(None, "teacher", "teacher_label", "teacher boxes"),
    "cls": LabelSet("use_cls", "teacher", "polished_label", "classification pseudo labels"),
    "reg": LabelSet("use_reg", "polished", "teacher_label", "regression pseudo labels"),
    "polished": LabelSet("use_cls", "polished", "polished_label", "polished pseudo labels"),
}
