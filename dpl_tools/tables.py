"""The tables of dpl's console output (rich): a cell too long for its column wraps, and a
word longer than the column (a path) folds onto the next line instead of being cut with an
ellipsis, so an 80-column terminal still shows every output path whole."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


class ReportTable(Table):
    """``rich.table.Table`` whose columns fold long words (``overflow="fold"``), also the
    columns that ``add_row`` creates for a table declared without any."""

    def add_column(self, header: Any = "", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(header, *args, **kwargs)

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        while len(self.columns) < len(renderables):
            self.add_column()
        super().add_row(*renderables, **kwargs)


def print_report(console: Console, report: Any) -> None:
    """A table of every validation problem of a ``ValidationReport``: count, what was
    done, first example."""
    if report.clean:
        console.print(f"[green]validation: no problems found[/] in {report.path}")
        return
    table = ReportTable(title=f"validation of {report.path}", title_justify="left")
    table.add_column("problem (action)")
    table.add_column("count", justify="right")
    table.add_column("first example", overflow="fold")
    for problem, n in sorted(report.counts.items()):
        table.add_row(problem, str(n), report.examples[problem])
    console.print(table)


def print_skipped_files(console: Console, skipped: list[tuple[str, str]]) -> None:
    """A table of the files skipped as unusable, with the problem of each."""
    if not skipped:
        return
    table = ReportTable(title=f"{len(skipped)} file(s) skipped", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    for name, problem in skipped:
        table.add_row(name, problem)
    console.print(table)
