"""Entry point of the ``dpl`` command: registers one sub-command per stage."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from dpl_tools.errors import DplError

app = typer.Typer(
    name="dpl",
    help="Pseudo-label polishing for semi-supervised object detection "
    "(offline form of 'Mind the Gap', AAAI 2023).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help: it wraps every option's help at the terminal width, where rich's
    # option table cuts long words with an ellipsis on an 80-column terminal
    rich_markup_mode=None,
)


def command_help(doc: str | None) -> str:
    """A command module's docstring as help: prose paragraphs reflowed into one line each
    (the terminal wraps them), indented blocks such as config examples kept as written."""
    paragraphs = [p for p in (doc or "").strip().split("\n\n") if p.strip()]
    out = []
    for para in paragraphs:
        lines = para.splitlines()
        if any(line.startswith((" ", "\t")) for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _register() -> None:
    from commands import (
        convert,
        demo,
        evaluate,
        export,
        polish,
        report,
        run,
        show,
        split,
        synth_noise,
        train_polisher,
        train_student,
        train_teacher,
    )

    for name, module in [
        ("convert", convert),
        ("split", split),
        ("train-teacher", train_teacher),
        ("synth-noise", synth_noise),
        ("train-polisher", train_polisher),
        ("polish", polish),
        ("export", export),
        ("train-student", train_student),
        ("evaluate", evaluate),
        ("run", run),
        ("demo", demo),
        ("report", report),
        ("show", show),
    ]:
        app.command(name, help=command_help(module.__doc__))(module.command)


_register()


# Exit statuses: 2 for a user error (bad input, as click's usage errors), 3 for a defect.
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


def main() -> None:
    """Run the CLI; user errors become one ``error:`` line on stderr and exit status 2.

    An unexpected exception is a defect of dpl, not of the input: it is reported in one
    line too (the traceback with ``DPL_TRACEBACK=1``) and exits with status 3.
    """
    err = Console(stderr=True)
    try:
        app()
    except DplError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as e:
        if os.environ.get("DPL_TRACEBACK"):
            raise
        err.print(
            f"[bold red]error:[/] internal error: {type(e).__name__}: {e} "
            "(a defect of dpl: rerun with DPL_TRACEBACK=1 and report the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
