"""Several pipeline stages at a time (``dpl run --jobs N``, ``dpl demo --jobs N``).

A stage starts once the stages that write its inputs are done, earlier-listed stages
first, at most ``jobs`` at once. Each runs as its printed ``dpl`` command in a subprocess.
The stages that make the pseudo labels (``RUN_ALONE``) run alone, on all of this
process's threads (the cores, or OMP_NUM_THREADS); the students and evaluations, which
come in groups, run beside each other on ``threads // jobs`` each: a small detector scales
poorly over threads (the demo's 2-image step is only 1.2x faster on 2 threads than on 1),
so two of them on one core each do more work per second than one on both. A stage's
thread count does not depend on timing, so a seed gives the same result run after run;
another thread count changes the last bits of float sums, so ``--jobs`` is part of the
recipe. A stage's output goes to ``<run-dir>/logs/<stage>.log``; its progress lines are
shown as they come, prefixed with the stage's name, the rest when it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from dpl_tools.errors import DplError

if TYPE_CHECKING:
    from dpl_tools.pipeline import Stage

# What dpl_tools.progress writes off a terminal: "<task> <done>[/<total>] ... elapsed H:MM:SS"
PROGRESS_LINE = re.compile(r"^\S.* elapsed \d+:\d\d:\d\d$")


# The stages that make the pseudo labels run alone, on every thread: every later stage
# waits for them, and the polisher's dense heads use the threads (1.7x faster on 2 than on
# 1). Beside another stage they would oversubscribe the cores, which costs far more than
# it gains (a fold teacher on 2 threads beside a 1-thread student on 2 cores: 3x slower).
# Students and evaluations come in groups and share the threads.
RUN_ALONE = ("split", "train_teacher", "synth_noise", "train_polisher", "polish")


def threads_per_stage(stage: Stage, jobs: int, threads: int | None = None) -> int:
    """Torch threads of ``stage`` when ``jobs`` stages share ``threads`` (default: this
    process's, i.e. OMP_NUM_THREADS or the cores): all of them for a stage that runs alone,
    else a share."""
    import torch

    threads = threads or torch.get_num_threads()
    return threads if stage.function in RUN_ALONE else max(1, threads // max(1, jobs))


def run_concurrently(
    stages: Sequence[Stage], run_one: Callable[[Stage], bool], jobs: int
) -> list[str]:
    """Call ``run_one(stage)`` in worker threads, at most ``jobs`` at a time, each stage
    once the stages writing its inputs are done, earlier-listed first; a ``RUN_ALONE``
    stage runs with nothing beside it. Returns the names of the stages that ran
    (``run_one`` true), in list order. A failed stage stops new starts; the running ones
    finish, then its error is raised."""
    producer = {stage.output: stage.name for stage in stages}
    pending, running, done, ran = list(stages), {}, set(), set()
    error: BaseException | None = None

    def ready(stage: Stage) -> bool:
        return all(producer[p] in done for p in stage.inputs if p in producer)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        while running or (pending and error is None):
            for stage in [s for s in pending if ready(s)] if error is None else []:
                alone = stage.function in RUN_ALONE
                if len(running) >= jobs or (running and alone) or _alone(running.values()):
                    break  # an alone stage that waits also holds back those listed after it
                pending.remove(stage)
                running[pool.submit(run_one, stage)] = stage
            if not running:
                names = ", ".join(s.name for s in pending)
                raise DplError(f"stages whose inputs no stage writes in time: {names}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                error = error or future.exception()
                done.add(stage.name)
                if future.exception() is None and future.result():
                    ran.add(stage.name)
    if error is not None:
        raise error
    return [s.name for s in stages if s.name in ran]


def _alone(stages: Iterable[Stage]) -> bool:
    return any(stage.function in RUN_ALONE for stage in stages)


def stage_process(
    console: Console, run_dir: Path, jobs: int, threads: int | None = None
) -> Callable[[Stage, bool], None]:
    """Run a stage as its printed ``dpl`` command in a subprocess with its torch threads
    (``threads_per_stage``); its output is logged to ``<run-dir>/logs/<stage>.log`` and
    shown (progress lines as they come, the rest as one block when it ends)."""
    lock = threading.Lock()  # one stage's block of lines at a time

    def invoke(stage: Stage, resume: bool) -> None:
        threads_here = threads_per_stage(stage, jobs, threads)
        argv = [sys.executable, "-m", "dpl_tools.cli", *stage.command_line(resume)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_here)}
        env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
        log = Path(run_dir) / "logs" / f"{stage.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        block: list[str] = []
        with open(log, "a" if resume else "w") as out:  # as it comes (tail -f); kept on resume
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env, bufsize=1)  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                line = line.rstrip("\n")
                if not PROGRESS_LINE.match(line):
                    block.append(line)
                    continue
                with lock:  # not inside another stage's block
                    shown = f"[dim]{stage.name}:[/] {escape(line)}"
                    console.print(shown, highlight=False, soft_wrap=True)
            code = proc.wait()
        with lock:
            console.print(f"[bold]{stage.name}[/] ({'done' if code == 0 else 'failed'}):")
            for line in block:
                console.print(escape(line), highlight=False, soft_wrap=True)
        if code != 0:
            last = next((x for x in reversed(block) if x.strip()), f"exit status {code}")
            reason = last.strip().removeprefix("error: ")  # the child's own "error: " line
            raise DplError(f"stage {stage.name} failed: {reason} (its output: {log})")

    return invoke
