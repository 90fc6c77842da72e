"""The settings a trained polisher is applied with, resolved once for ``dpl polish`` and
for online training: the config's ``polish`` section, the keep rule's thresholds (explicit,
fitted into the polisher by train-polisher, or the paper's) and the regression steps (0
when train-polisher's check found polishing the boxes worse)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.engine.keep_thresholds import KeepThresholds, resolve_keep_thresholds
from dpl_tools.engine.polish import PolishSettings
from dpl_tools.engine.regression_check import resolve_reg_steps


@dataclass
class AppliedPolisher:
    """How a polisher is applied: the polish settings with the keep thresholds and the
    regression steps filled in, and where each came from."""

    settings: PolishSettings
    keep: KeepThresholds
    reg_steps_source: str

    def announce(self, console: Console) -> None:
        """Say which keep rule and regression pseudo labels are used (fallbacks loudly)."""
        if self.keep.note:
            console.print(f"note: {self.keep.note}", highlight=False)
        console.print(self.keep.describe(), highlight=False)
        if self.keep.source.startswith("fallback"):
            console.print(f"[bold red]keep rule: {self.keep.source}[/]", highlight=False)
        if self.settings.reg_steps == 0:
            console.print(
                f"[bold red]regression pseudo labels: the teacher's boxes[/] "
                f"({self.reg_steps_source})",
                highlight=False,
            )


def applied_polisher(
    section: dict[str, Any], refiner: Any, polisher_path: str | Path
) -> AppliedPolisher:
    """The ``polish`` config ``section`` applied to the loaded polisher ``refiner``."""
    keep = resolve_keep_thresholds(
        section["keep_rule"], refiner.fitted_thresholds, section["cls_prob"],
        section["teacher_score"], str(polisher_path),
    )  # fmt: skip
    steps, steps_source = resolve_reg_steps(section["reg_steps"], refiner.regression_check)
    settings = replace(
        PolishSettings.from_section(section), cls_prob=keep.cls_prob,
        teacher_score=keep.teacher_score, reg_steps=steps,
    )  # fmt: skip
    return AppliedPolisher(settings, keep, steps_source)
