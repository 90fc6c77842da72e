"""The whole pipeline from Python (``dpl run``): every stage of a run config, each skipped
when its output is current, run in this process through the API function its command
calls (what is printed is the stage's ``dpl`` command line, to rerun one by hand)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.pipeline import load_run_config, pipeline_stages, run_stages


@dataclass
class PipelineRun:
    """A pipeline run: its directory, the stages (names) that ran and those of the whole
    pipeline, and the figures of its evaluations (``eval/*.json``, by model name)."""

    run_dir: Path
    ran: list[str]
    stages: list[str]
    evaluations: dict[str, dict[str, Any]]


def run(
    config: str | Path,
    run_dir: str | Path | None = None,
    *,
    rounds: int = 1,
    device: str = "auto",
    force: bool = False,
    jobs: int = 1,
    console: Console | None = None,
) -> PipelineRun:
    """Run every stage of the run config ``config`` (a data section + presets) in
    ``run_dir`` (default: the config's ``run.run_dir``, else dpl-run); ``rounds``
    self-training rounds; ``force`` reruns current stages too; ``jobs`` > 1 runs that
    many stages at once, each as its ``dpl`` command in a subprocess (``stage_jobs``).
    With a ``console`` each stage prints its command line as it starts."""
    from dpl_tools.cli.options import stage_printer, stage_runner

    data, run_dir, stage_config = load_run_config(Path(config), run_dir)
    stages = pipeline_stages(data, run_dir, str(stage_config), rounds=rounds, device=device)
    if console is None and jobs <= 1:
        ran = run_stages(stages, run_dir, force=force)
    else:
        console = console or Console(quiet=True)
        invoke = stage_runner(console, run_dir, jobs)
        ran = run_stages(stages, run_dir, invoke, stage_printer(console), force, jobs)
    evaluations = {
        p.stem: json.loads(p.read_text()) for p in sorted((Path(run_dir) / "eval").glob("*.json"))
    }
    return PipelineRun(Path(run_dir), ran, [s.name for s in stages], evaluations)
