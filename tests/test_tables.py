"""Console tables never cut a path: on an 80-column terminal it folds onto the next line."""

from __future__ import annotations

import re

from rich.console import Console

from dpl_tools.tables import ReportTable


def _cells(text: str) -> str:
    """The table's text with borders, padding and line breaks removed."""
    return re.sub(r"[\s│┃┌┐└┘├┤┬┴┼─━┏┓┗┛┡┩╇╈┳┻╋]", "", text)


def test_long_paths_fold_instead_of_being_cut():
    path = "/very/long/run/directory/" + "x" * 90 + "/teacher.pt"
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    table = ReportTable(show_header=False)  # columns made by add_row fold too
    table.add_row("initialised from", path)
    named = ReportTable()
    named.add_column("problem")
    named.add_column("file")
    named.add_row("unreadable", path)
    console.print(table)
    console.print(named)
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert _cells(text).count(path) == 2
