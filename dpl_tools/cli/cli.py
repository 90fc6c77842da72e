"""Entry point of the ``dpl`` command: registers one sub-command per stage."""

from __future__ import annotations

import os
import re
import sys

import typer
from rich.console import Console
from rich.markup import escape

from dpl_tools.errors import DplError

app = typer.Typer(
    name="dpl",
    help="Pseudo-label polishing for semi-supervised object detection "
    "('Mind the Gap', AAAI 2023): offline stages, and the paper's online training "
    "(train-student --online).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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


def _show_version(value: bool) -> None:
    if value:
        from dpl_tools import __version__

        typer.echo(f"dpl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True,
        help="Print dpl's version and exit.",
    ),
) -> None:  # fmt: skip
    """Pseudo-label polishing for semi-supervised object detection ('Mind the Gap', AAAI
    2023): offline stages, and the paper's online training (train-student --online)."""


def _register() -> None:
    from dpl_tools.cli import (
        audit,
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
        ("audit", audit),
    ]:
        app.command(name, help=command_help(module.__doc__))(module.command)


_register()


# Exit statuses: 2 for a user error (bad input, as click's usage errors), 3 for a defect.
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3

# locals that name the file an OSError without a file name was about (innermost frame first)
_PATH_LOCALS = ("tmp", "tmp_path", "dest", "path", "file", "out", "f")


def _output_of(path: str) -> str:
    """The output a temp file of this process stands for (``atomic_path``'s
    ``.<name>.<pid>.<random><suffix>.tmp`` beside it), else ``path`` itself."""
    head, name = os.path.split(path)
    match = re.fullmatch(r"\.(.+)\.(\d+)\.[^./]+\.tmp", name)
    if match and match[2] == str(os.getpid()):
        return os.path.join(head, match[1])
    return path


def _path_of(e: OSError) -> str | None:
    """The path an OSError is about: its file name(s), else a file-like local of the frames
    it went through (a write to an open file names no file)."""
    if e.filename is not None:
        name = _output_of(os.fsdecode(e.filename))
        return f"{name} -> {os.fsdecode(e.filename2)}" if e.filename2 is not None else name
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for key in _PATH_LOCALS:
            value = frame.f_locals.get(key)
            if isinstance(value, str | os.PathLike) and os.fspath(value):
                return _output_of(os.fsdecode(os.fspath(value)))
            name = getattr(value, "name", None)  # an open file object
            if isinstance(name, str) and not isinstance(value, type):
                return _output_of(name)
    return None


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the path and the OS's reason."""
    text = str(e).strip()
    reason = e.strerror or (text.splitlines()[0] if text else type(e).__name__)
    named = e.filename is not None and not os.path.isdir(e.filename)
    if isinstance(e, FileExistsError | NotADirectoryError) and named:
        reason += " (a file is where a folder is needed)"
    path = _path_of(e)
    return f"{path}: {reason}" if path else f"{reason} (while reading or writing a file)"


def main() -> None:
    """Run the CLI; user errors become one ``error:`` line on stderr and exit status 2.

    An unexpected exception is a defect of dpl, not of the input: it is reported in one
    line too (the traceback with ``DPL_TRACEBACK=1``) and exits with status 3.
    """
    err = Console(stderr=True)
    try:
        app()
    except DplError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)
    except OSError as e:
        # the user's environment (permissions, a full disk, a file-size limit, a file where
        # a folder should be), not a defect: one line naming the path and the OS's reason
        if os.environ.get("DPL_TRACEBACK"):
            raise
        err.print(
            f"[bold red]error:[/] {escape(os_error_line(e))}", highlight=False, soft_wrap=True
        )
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:
        if os.environ.get("DPL_TRACEBACK"):
            raise
        err.print(
            f"[bold red]error:[/] internal error: {type(e).__name__}: {escape(str(e))} "
            "(a defect of dpl: rerun with DPL_TRACEBACK=1 and report the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
