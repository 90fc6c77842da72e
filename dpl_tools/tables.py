"""The tables of dpl's console output (rich): a cell too long for its column wraps, and a
word longer than the column (a path) folds onto the next line instead of being cut with an
ellipsis, so an 80-column terminal still shows every output path whole."""

from __future__ import annotations

from typing import Any

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
