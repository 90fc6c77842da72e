"""The run directory: where each stage writes its artifact and finds the earlier ones.

Every command takes ``--run-dir`` (default ``./dpl-run``); explicit paths override.
"""

from __future__ import annotations

from pathlib import Path

from dpl_tools.errors import DplError

DEFAULT_RUN_DIR = Path("dpl-run")

# Artifact names inside a run directory, one per stage.
ARTIFACTS = {
    "labeled": "split/labeled.json",
    "unlabeled": "split/unlabeled.json",
    "unlabeled_gt": "split/unlabeled_gt.json",
    "teacher": "teacher.pt",
    "noise": "noise.parquet",
    "polisher": "polisher.pt",
    "labels": "labels.parquet",
    "student": "student.pt",
    "crossfit": "crossfit.parquet",
    "audit": "audit.parquet",
}


def artifact(run_dir: str | Path | None, name: str) -> Path:
    """Standard path of artifact ``name`` (a key of ARTIFACTS) in ``run_dir``."""
    return Path(run_dir or DEFAULT_RUN_DIR) / ARTIFACTS[name]


# The option that names each artifact where its name differs from the artifact's.
_OPTIONS = {"labeled": "--ann", "unlabeled": "--images", "labels": "--pseudo"}


def resolve_input(
    explicit: str | Path | None,
    run_dir: str | Path | None,
    name: str,
    option: str | None = None,
    what: str | None = None,
) -> Path:
    """The explicit path if given, else the run directory's artifact; it must exist.

    ``option`` is the command's flag for this input, named in the error when missing;
    ``what`` names an explicit path in that error (default ``name``).
    """
    path = Path(explicit) if explicit else artifact(run_dir, name)
    if not path.exists():
        flag = option or _OPTIONS.get(name, f"--{name}")
        hint = "" if explicit else f" (no {flag} given; looked in the run directory)"
        raise DplError(f"{path}: {(what or name) if explicit else name} not found{hint}")
    return path


def resolve_output(explicit: str | Path | None, run_dir: str | Path | None, name: str) -> Path:
    """The explicit output path if given, else the run directory's artifact path."""
    return Path(explicit) if explicit else artifact(run_dir, name)
