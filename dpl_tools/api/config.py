"""The config of one stage called from Python: a preset, a file or a dict, then keyword
overrides checked like a config file (same ranges, a did-you-mean for a typo)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpl_tools.config import load_config
from dpl_tools.defaults import SETTINGS
from dpl_tools.errors import DplError
from dpl_tools.settings import unknown

ConfigLike = str | Path | Mapping[str, Any] | None


def stage_config(
    config: ConfigLike,
    section: str,
    overrides: Mapping[str, Any] | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checked config of a stage whose own section is ``section``: defaults < ``config``
    < ``flags`` (None values: not given) < ``overrides`` (keyword overrides: keys of
    ``section`` or whole sections as dicts) < ``sets`` (``--set``)."""
    keywords: dict[str, dict[str, Any]] = {}
    for key, value in (overrides or {}).items():
        if key in SETTINGS[section]:
            keywords.setdefault(section, {})[key] = value
        elif key in SETTINGS and isinstance(value, Mapping):
            keywords.setdefault(key, {}).update(value)
        else:
            known = [*SETTINGS[section], *SETTINGS]
            raise DplError(f"{unknown(f'setting {section}.', key, known)}")
    layered = dict(sets or {})
    for name, values in keywords.items():
        layered[name] = {**values, **dict(layered.get(name, {}))}
    return load_config(config, {k: dict(v) for k, v in (flags or {}).items()}, layered)
