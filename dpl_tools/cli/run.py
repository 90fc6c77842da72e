"""Run the whole pipeline from one config file.

Stages: split, train-teacher, synth-noise, train-polisher, polish,
train-student and the evaluations (pseudo-label quality; COCO AP on
data.test_ann when given). A stage is skipped when its output exists and
was made from the same command and inputs. The config is YAML with a
data section, an optional run section and any preset sections:

  data: {ann: train.json, images: images/, percent: 10, fold: 1,
         test_ann: test.json, test_images: images/}
  run: {preset: cpu_mobilenet, run_dir: dpl-run}
  teacher: {iters: 800}

Paths are relative to the config file. The resolved settings (preset <
config) go to <run-dir>/config.yaml and are passed to every stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import Device, Jobs, within
from dpl_tools.data.pseudo_labels import pseudo_label_sources
from dpl_tools.pipeline import round_dir
from dpl_tools.settings import AT_LEAST_1


def command(
    config: Annotated[Path, typer.Argument(help="Run config (YAML): a data section + presets.")],
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir", help="Run directory (default: the config's run_dir, else dpl-run)."
        ),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds",
            help="Self-training rounds (>= 1): each student teaches the next.",
            callback=within(AT_LEAST_1),
        ),
    ] = 1,
    force: Annotated[bool, typer.Option("--force", help="Rerun every stage.")] = False,
    device: Device = "auto",
    jobs: Jobs = 1,
) -> None:
    console = Console()
    result = api.run(config, run_dir, rounds=rounds, device=device, force=force, jobs=jobs,
                     console=console)  # fmt: skip
    ran, stages, run_dir = result.ran, result.stages, result.run_dir
    console.print(
        f"[bold green]done[/]: {len(ran)} stage(s) ran, {len(stages) - len(ran)} up to date"
    )
    for k in range(1, rounds + 1):
        labels = round_dir(run_dir, k) / "labels.parquet"
        if labels.exists():
            s = pseudo_label_sources(labels)
            kept = s["pseudo_kept_fraction"]
            console.print(
                f"round {k} pseudo labels: {'n/a' if kept is None else f'{kept:.1%}'} of the "
                f"teacher's boxes kept for classification (keep rule: {s['keep_rule_source']}); "
                f"regression: {s['reg_steps_source']}",
                highlight=False,
            )
