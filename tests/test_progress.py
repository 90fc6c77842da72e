"""Progress reaches a log: off a terminal, plain progress lines are written as work goes on
(a long job under nohup or `> log` used to write nothing until it ended)."""

from __future__ import annotations

import io

from rich.console import Console

from dpl_tools.progress import Progress, track


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100), out


def test_off_a_terminal_progress_is_logged_line_by_line(monkeypatch) -> None:
    monkeypatch.setenv("DPL_LOG_EVERY", "0")
    console, out = _console(terminal=False)
    with Progress(console=console) as bar:
        task = bar.add_task("train-teacher", total=4, status="loss 1.000")
        bar.update(task, completed=1, status="loss 0.900")
        assert out.getvalue().splitlines()[-1].startswith("train-teacher 1/4 (25%)  loss 0.900")
        bar.update(task, completed=4, status="loss 0.500")
    lines = out.getvalue().splitlines()
    assert any(line.startswith("train-teacher 4/4 (100%)  loss 0.500") for line in lines)
    assert sum("4/4" in line for line in lines) == 1  # the final line once


def test_lines_are_spaced_by_the_interval(monkeypatch) -> None:
    monkeypatch.setenv("DPL_LOG_EVERY", "3600")
    console, out = _console(terminal=False)
    with Progress(console=console) as bar:
        task = bar.add_task("polish", total=10, rate=1.5, boxes=3)
        for i in range(1, 10):
            bar.update(task, completed=i)
        assert "polish" not in out.getvalue()  # within the interval: nothing yet
        bar.update(task, completed=10)
    assert "polish 10/10 (100%)  rate 1.5  boxes 3" in out.getvalue()


def test_on_a_terminal_no_plain_lines_and_track_logs(monkeypatch) -> None:
    monkeypatch.setenv("DPL_LOG_EVERY", "0")
    console, out = _console(terminal=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluate", total=2)
        bar.update(task, completed=2)
    assert "evaluate 2/2 (100%)" not in out.getvalue()
    console, out = _console(terminal=False)
    assert list(track(range(3), "evaluate", console=console)) == [0, 1, 2]
    assert "evaluate 3/3 (100%)" in out.getvalue()
