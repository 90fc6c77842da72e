"""dpl's Python API: one function per stage, equal to its command.

Each function takes paths, a config (a preset name, a YAML path, a dict of sections, or
None for the defaults) and keyword overrides, and returns a small result object with the
paths it wrote and its figures. The ``dpl`` commands parse their flags, call these
functions and print the results, so a stage behaves the same from a notebook::

    from dpl_tools import api

    teacher = api.train_teacher("split/labeled.json", "images", "runs/teacher.pt",
                                config="cpu_mobilenet", iters=300, model={"min_size": 320})
    print(api.evaluate("runs/teacher.pt", "test.json", "test_images").metrics["AP"])

A keyword override is a key of the stage's own config section (``iters=300`` is
``teacher.iters`` for ``train_teacher``) or a whole section as a dict
(``model={"min_size": 320}``); a typo is a one-line DplError with a did-you-mean, and
values obey the same ranges as a config file or ``--set``.

Stages: ``convert``, ``split``, ``export``, ``report`` (``api.data``); ``train_teacher``,
``train_student``, ``evaluate`` (``api.detectors``); ``synth_noise``, ``train_polisher``
(``api.polisher``); ``polish``, ``export_labels``, ``evaluate_pseudo`` (``api.pseudo_labels``);
``run`` (``api.pipeline``).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Each name is imported from its submodule on first use (PEP 562), so that importing the
# API, and the ``dpl`` commands that call it, loads torch only when a stage runs:
# ``dpl --help`` and a bad flag answer at once.
_SUBMODULE = {
    "ConfigLike": "config",
    "stage_config": "config",
    "LabelAudit": "data",
    "ReviewFile": "data",
    "SplitFiles": "data",
    "audit": "data",
    "convert": "data",
    "export": "data",
    "export_review": "data",
    "online_report": "data",
    "report": "data",
    "split": "data",
    "Evaluation": "detectors",
    "TrainedDetector": "detectors",
    "evaluate": "detectors",
    "student_init": "detectors",
    "train_student": "detectors",
    "train_student_online": "detectors",
    "train_teacher": "detectors",
    "PipelineRun": "pipeline",
    "run": "pipeline",
    "Polished": "pseudo_labels",
    "PseudoQuality": "pseudo_labels",
    "evaluate_pseudo": "pseudo_labels",
    "export_labels": "pseudo_labels",
    "polish": "pseudo_labels",
    "TrainedPolisher": "polisher",
    "synth_noise": "polisher",
    "train_polisher": "polisher",
}

if TYPE_CHECKING:  # the names as a type checker sees them
    from dpl_tools.api.config import ConfigLike, stage_config
    from dpl_tools.api.data import (
        LabelAudit,
        ReviewFile,
        SplitFiles,
        audit,
        convert,
        export,
        export_review,
        online_report,
        report,
        split,
    )
    from dpl_tools.api.detectors import (
        Evaluation,
        TrainedDetector,
        evaluate,
        student_init,
        train_student,
        train_student_online,
        train_teacher,
    )
    from dpl_tools.api.pipeline import PipelineRun, run
    from dpl_tools.api.polisher import TrainedPolisher, synth_noise, train_polisher
    from dpl_tools.api.pseudo_labels import (
        Polished,
        PseudoQuality,
        evaluate_pseudo,
        export_labels,
        polish,
    )

__all__ = [
    "ConfigLike",
    "LabelAudit",
    "audit",
    "ReviewFile",
    "SplitFiles",
    "convert",
    "export",
    "export_review",
    "online_report",
    "report",
    "run",
    "split",
    "Evaluation",
    "TrainedDetector",
    "PipelineRun",
    "Polished",
    "PseudoQuality",
    "TrainedPolisher",
    "evaluate",
    "evaluate_pseudo",
    "export_labels",
    "polish",
    "stage_config",
    "synth_noise",
    "train_polisher",
    "student_init",
    "train_student",
    "train_student_online",
    "train_teacher",
]


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule the first time it is used."""
    module = _SUBMODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"dpl_tools.api.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
