"""Several stages at once: the scheduler's order, overlap and failure handling."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dpl_tools.errors import DplError
from dpl_tools.pipeline import Stage, run_stages
from dpl_tools.stage_jobs import PROGRESS_LINE, run_concurrently, threads_per_stage


def _stages(root: Path) -> list[Stage]:
    """a -> (b, c) -> d, and e alone: b, c and e can run beside each other."""

    def stage(name: str, *inputs: str) -> Stage:
        return Stage(name, "noop", {}, root / f"{name}.txt", [root / f"{i}.txt" for i in inputs])

    return [stage("a"), stage("b", "a"), stage("c", "a"), stage("d", "b", "c"), stage("e")]


def _recording_invoke(events: list, delay: float = 0.05):
    lock = threading.Lock()

    def invoke(stage: Stage, resume: bool) -> None:
        with lock:
            events.append(("start", stage.name))
        time.sleep(delay)
        stage.output.write_text(stage.name)
        with lock:
            events.append(("end", stage.name))

    return invoke


def _running_at_most(events: list) -> int:
    running, most = 0, 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def test_a_stage_starts_after_the_stages_writing_its_inputs(tmp_path) -> None:
    events: list = []
    ran = run_stages(_stages(tmp_path), tmp_path, _recording_invoke(events), jobs=2)
    assert ran == ["a", "b", "c", "d", "e"]
    order = [(k, n) for k, n in events]
    for stage, needs in {"b": "a", "c": "a", "d": "b"}.items():
        assert order.index(("end", needs)) < order.index(("start", stage)), (stage, needs)
    assert order.index(("end", "c")) < order.index(("start", "d"))
    assert _running_at_most(events) <= 2  # never more than jobs at once


def test_one_job_runs_in_list_order_and_current_stages_are_skipped(tmp_path) -> None:
    events: list = []
    stages = _stages(tmp_path)
    assert run_stages(stages, tmp_path, _recording_invoke(events, 0)) == ["a", "b", "c", "d", "e"]
    assert [n for k, n in events if k == "start"] == ["a", "b", "c", "d", "e"]
    assert _running_at_most(events) == 1
    # everything current: nothing runs, with one job or several
    assert run_stages(stages, tmp_path, _recording_invoke([]), jobs=3) == []


def test_a_failed_stage_stops_new_starts_and_its_error_is_raised(tmp_path) -> None:
    events: list = []
    record = _recording_invoke(events)

    def invoke(stage: Stage, resume: bool) -> None:
        if stage.name == "b":
            raise DplError("b broke")
        record(stage, resume)

    with pytest.raises(DplError, match="b broke"):
        run_stages(_stages(tmp_path), tmp_path, invoke, jobs=2)
    started = {n for k, n in events if k == "start"}
    assert "d" not in started  # needs b
    assert {n for k, n in events if k == "end"} == started  # the running ones finished
    assert not (tmp_path / ".stages" / "b.json").exists()  # no stamp for the failed stage


def test_stages_that_cannot_start_are_named() -> None:
    root = Path("/nonexistent")
    loop = [Stage("x", "noop", {}, root / "x", [root / "y"]),
            Stage("y", "noop", {}, root / "y", [root / "x"])]  # fmt: skip
    with pytest.raises(DplError, match="x, y"):
        run_concurrently(loop, lambda stage: True, 2)


def test_threads_are_shared_out_and_progress_lines_are_recognised() -> None:
    student = Stage("train-student", "train_student", {}, Path("s.pt"))
    polisher = Stage("train-polisher", "train_polisher", {}, Path("p.pt"))
    assert threads_per_stage(student, 2, 2) == 1 and threads_per_stage(student, 2, 16) == 8
    assert threads_per_stage(student, 4, 2) == 1  # at least one
    assert threads_per_stage(polisher, 2, 16) == 16  # the pseudo labels' chain: all of them
    assert PROGRESS_LINE.match(
        "train-student 17/300 (6%)  loss 1.387  lr 4.00e-03  elapsed 0:00:10"
    )
    assert not PROGRESS_LINE.match("│ iterations │ 300 (300 in this run) │")


def test_a_stage_process_that_fails_names_its_error_and_its_log(tmp_path) -> None:
    """A stage run as its printed command: its one-line error and the log it wrote."""
    from rich.console import Console

    from dpl_tools.stage_jobs import stage_process

    missing = tmp_path / "missing.json"
    stage = Stage("split", "split", {"ann": missing, "out_dir": tmp_path / "split"},
                  tmp_path / "split" / "labeled.json", [missing])  # fmt: skip
    console = Console(record=True, width=200)
    reason = r"stage split failed: /\S*missing\.json: file not found \(its output"  # one error:
    with pytest.raises(DplError, match=reason) as err:
        run_stages([stage], tmp_path, stage_process(console, tmp_path, 2, 1), jobs=2)
    log = tmp_path / "logs" / "split.log"
    assert str(log) in str(err.value)
    assert "missing.json" in log.read_text()
    assert "split (failed)" in console.export_text()


def test_a_stage_that_makes_pseudo_labels_runs_alone(tmp_path) -> None:
    """The teacher / polisher chain runs with nothing beside it (it takes every thread:
    beside another stage it would oversubscribe the cores); the others pair up."""
    events: list = []
    record, pair = _recording_invoke(events), threading.Barrier(2, timeout=30)

    def invoke(stage: Stage, resume: bool) -> None:
        if stage.name in ("b", "c"):
            pair.wait()  # returns only once both run: they overlap (else BrokenBarrierError)
        record(stage, resume)

    stages = [Stage("a", "noop", {}, tmp_path / "a.txt"),
              Stage("teacher", "train_teacher", {}, tmp_path / "t.txt"),
              Stage("b", "noop", {}, tmp_path / "b.txt"),
              Stage("c", "noop", {}, tmp_path / "c.txt")]  # fmt: skip
    assert run_stages(stages, tmp_path, invoke, jobs=2) == ["a", "teacher", "b", "c"]
    during = events[events.index(("start", "teacher")) : events.index(("end", "teacher")) + 1]
    assert during == [("start", "teacher"), ("end", "teacher")]
    assert events.index(("end", "a")) < events.index(("start", "teacher"))  # waited for a
    assert events.index(("end", "teacher")) < events.index(("start", "b"))  # b waited (list order)
