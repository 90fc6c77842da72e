"""The dpl entry point: every stage is registered with readable help."""

from __future__ import annotations

import subprocess
import sys

from commands.cli import app, command_help

STAGES = (
    "convert", "split", "train-teacher", "synth-noise", "train-polisher", "polish", "export",
    "train-student", "evaluate", "run", "demo", "report", "show",
)  # fmt: skip


def test_every_stage_is_a_command_with_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "commands", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout
    names = {c.name for c in app.registered_commands}
    assert names == set(STAGES)
    for c in app.registered_commands:
        assert c.help and "not implemented" not in c.help


def test_help_reflows_prose_and_keeps_indented_blocks() -> None:
    doc = "Title line.\n\nFirst line of prose\ncontinues here.\n\n  data: {a: 1}\n  run: {}\n"
    assert command_help(doc) == (
        "Title line.\n\nFirst line of prose continues here.\n\n  data: {a: 1}\n  run: {}"
    )
