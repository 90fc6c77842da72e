"""The dpl entry point: every stage is registered with readable help."""

from __future__ import annotations

import subprocess
import sys

from dpl_tools.cli.cli import app, command_help

STAGES = (
    "convert", "split", "train-teacher", "synth-noise", "train-polisher", "polish", "export",
    "train-student", "evaluate", "run", "demo", "report", "show", "audit",
)  # fmt: skip


def test_every_stage_is_a_command_with_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
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


def test_help_is_whole_on_an_80_column_terminal() -> None:
    """Every option of every command is listed with its full name and nothing of its help
    is cut off (rich's option table cut long words with an ellipsis at 80 columns)."""
    import typer.main
    from typer.testing import CliRunner

    group = typer.main.get_command(app)
    runner = CliRunner()
    for name in STAGES:
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, result.output
        text = result.output
        assert "…" not in text, name
        assert max(len(line) for line in text.splitlines()) <= 80, name
        for param in group.commands[name].params:
            if param.param_type_name == "option":
                for opt in (*param.opts, *param.secondary_opts):
                    assert opt in text, f"{name}: {opt} missing from --help"


def test_help_and_usage_errors_load_no_torch() -> None:
    """``dpl --help``, every command's ``--help`` and a mistyped flag answer without
    importing torch (seconds of start-up): the commands load it only when a stage runs."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from dpl_tools.cli.cli import app\n"
        "runner = CliRunner()\n"
        f"for argv in [['--help'], *[[s, '--help'] for s in {list(STAGES)!r}],\n"
        "             ['train-student', '--no-such-flag']]:\n"
        "    result = runner.invoke(app, argv)\n"
        "    assert result.exit_code == (2 if '--no-such-flag' in argv else 0), argv\n"
        "heavy = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"
