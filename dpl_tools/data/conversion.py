"""A conversion's result (``Conversion``) and the files it skipped (``Skips``), shared by
the converters of each input format (``dpl_tools.data.convert``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpl_tools.data.coco import (
    CocoData,
)
from dpl_tools.data.images import (
    display_path,
)
from dpl_tools.errors import DplError


@dataclass
class Conversion:
    """A converted, validated set and the folder its ``file_name``s are relative to."""

    coco: CocoData
    images_dir: Path | None
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, problem)
    input_boxes: int = 0  # boxes in the input files read, before validation


class Skips:
    """Collects files skipped as unusable, or re-raises at the first with ``strict``."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.files: list[tuple[str, str]] = []

    def add(self, path: Path | str, problem: str) -> None:
        if self.strict:
            raise DplError(f"{display_path(path)}: {problem} (--strict)")
        self.files.append((display_path(path), problem))

    def error(self, path: Path, e: DplError) -> None:
        """Record a DplError about ``path`` (its message minus the leading path)."""
        message = str(e)
        for prefix in (f"{path}:", f"{display_path(path)}:"):
            message = message.removeprefix(prefix)
        if self.strict:
            raise e
        self.files.append((display_path(path), message.strip()))
