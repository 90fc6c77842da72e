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
(``api.polisher``); ``polish``, ``export_labels``, ``evaluate_pseudo`` (``api.polish``);
``run`` (``api.pipeline``).
"""

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
from dpl_tools.api.polish import Polished, PseudoQuality, evaluate_pseudo, export_labels, polish
from dpl_tools.api.polisher import TrainedPolisher, synth_noise, train_polisher

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
