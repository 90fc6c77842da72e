"""The whole pipeline as a list of stages, each skipped when its output is current.

A stage is a ``dpl`` sub-command line plus the files it reads and the file it writes.
After a stage runs, a stamp (``<run-dir>/.stages/<name>.json``) records its command line
and the content hashes of its inputs; a later run skips the stage when its output exists
and the stamp still matches, and reruns it (and so every stage after it whose inputs
change) otherwise. Stages run in-process through the same typer app as the CLI, so a
pipeline run behaves exactly like typing the commands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dpl_tools.io import sha256_file, write_json


@dataclass
class Stage:
    """One pipeline step: ``dpl <argv...>`` reading ``inputs`` and writing ``output``."""

    name: str
    argv: list[str]
    output: Path
    inputs: list[Path] = field(default_factory=list)

    def fingerprint(self) -> dict:
        """What the output depends on: the command line and the inputs' contents."""
        return {
            "argv": [str(a) for a in self.argv],
            "inputs": {str(p): sha256_file(p) if p.is_file() else None for p in self.inputs},
        }


def stamp_path(run_dir: Path, stage: Stage) -> Path:
    return run_dir / ".stages" / f"{stage.name}.json"


def is_current(run_dir: Path, stage: Stage) -> bool:
    """True when the stage's output exists and was made from the same command and inputs."""
    stamp = stamp_path(run_dir, stage)
    if not stage.output.exists() or not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()) == stage.fingerprint()
    except (OSError, json.JSONDecodeError):
        return False


def run_stages(
    stages: Sequence[Stage],
    run_dir: Path,
    invoke: Callable[[list[str]], None],
    on_event: Callable[[str, Stage], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Run each stage whose output is not current; returns the names of those that ran."""
    ran = []
    for stage in stages:
        if not force and is_current(run_dir, stage):
            if on_event:
                on_event("skip", stage)
            continue
        if on_event:
            on_event("start", stage)
        invoke([str(a) for a in stage.argv])
        write_json(stamp_path(run_dir, stage), stage.fingerprint())
        ran.append(stage.name)
    return ran
