"""Command-line flags generated from the defaults table (``dpl_tools.defaults.SETTINGS``).

A setting is declared once, in the table: its name, type, range or choices, default and
help. ``with_setting_flags`` adds one flag per listed setting to a typer command: named
``--key-with-dashes`` (or as given), typed and checked by the table's rule when the command
line is parsed, with help made from the table's text. The command receives the given values
as ``flags`` (``{section: {key: value or None}}``), the overrides ``load_config`` and the
Python API take.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import typer

from dpl_tools.cli.options import check_with
from dpl_tools.defaults import SETTINGS

Flags = dict[str, dict[str, Any]]


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def flag_help(section: str, key: str) -> str:
    """A setting's flag help: the table's text, its valid values, default and config key."""
    rule = SETTINGS[section][key]
    text = rule.help[:1].upper() + rule.help[1:]
    valid = f"one of {', '.join(rule.choices)}" if rule.choices else str(rule.range or "")
    parts = [p for p in (valid, f"default {_shown(rule.default)}") if p]
    return f"{text} ({'; '.join(parts)}; config {section}.{key})."


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def setting_parameter(section: str, key: str, flag: str | None = None) -> inspect.Parameter:
    """The typer parameter of one setting's flag (keyword-only, default None: not given)."""
    rule = SETTINGS[section][key]
    if rule.type is bool:
        name = flag or flag_name(key)
        option = typer.Option(f"{name}/--no-{name[2:]}", help=flag_help(section, key))
        annotation: Any = Annotated[bool | None, option]
    elif rule.type in (int, float, str):
        option = typer.Option(
            flag or flag_name(key), help=flag_help(section, key), callback=check_with(rule)
        )
        annotation = Annotated[rule.type | None, option]  # type: ignore[operator]
    else:
        raise TypeError(f"{section}.{key}: no flag for a {rule.type.__name__} setting")
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=annotation)  # fmt: skip


def with_setting_flags(
    settings: Mapping[str, Sequence[str]], names: Mapping[str, str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command taking ``flags``: add a flag for each ``settings[section]`` key
    (``names`` renames a key's flag, e.g. ``{"detections_per_img": "--max-dets"}``)."""
    names = dict(names or {})

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        added = [
            setting_parameter(section, key, names.get(key))
            for section, keys in settings.items()
            for key in keys
        ]
        taken = {p.name for p in own}
        clash = [p.name for p in added if p.name in taken]
        if clash:
            raise TypeError(f"{command.__name__}: flags {clash} are declared twice")

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            flags: Flags = {
                section: {key: kwargs.pop(key) for key in keys}
                for section, keys in settings.items()
            }
            return command(**kwargs, flags=flags)

        params = [*own, *added]
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=sorted(params, key=lambda p: p.kind)
        )
        run.__annotations__ = {}
        return run

    return decorate
