"""Configuration: built-in defaults < YAML preset (dpl_tools/configs) < command-line flags.

A config is a nested dict with one section per stage (model / teacher / polisher /
polish / student); every key and its default is in one table, ``dpl_tools.defaults``.
A preset is a name in ``dpl_tools/configs/`` (e.g. ``cpu_mobilenet``) or a path to a YAML
file. Every layer is checked against the table: an unknown section or key (with a
did-you-mean), a wrong type or an out-of-range value is a one-line DplError naming the file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpl_tools.defaults import DEFAULTS, RUN_SETTINGS, SETTINGS
from dpl_tools.errors import DplError
from dpl_tools.settings import SettingError, check_mapping, unknown
from dpl_tools.textfiles import read_yaml_file

# Presets ship inside the package (dpl_tools/configs/), so a wheel install has them too.
PRESET_DIRS = (Path(__file__).parent / "configs",)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``override`` merged in (nested dicts merge, rest replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name (``cpu_mobilenet``) or an explicit path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise DplError(f"{path}: config file not found")
        return path
    for folder in PRESET_DIRS:
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise DplError(
        f"unknown config preset {str(name_or_path)!r} (presets: {', '.join(list_presets())})"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping of sections, or a one-line DplError."""
    raw = read_yaml_file(path) or {}  # one-line DplError: unreadable, not UTF-8, alias bomb
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise DplError(f"{path}: a config must map section names (model, teacher, ...) to mappings")
    return raw


def check_config(
    raw: dict[str, Any], source: str | Path, run_config: bool = False
) -> dict[str, dict[str, Any]]:
    """``raw``'s sections checked against the defaults table, values in their canonical
    types; an unknown section or key, a wrong type or range is a one-line DplError that
    names ``source`` (the file) and the key. ``run_config``: ``data`` and ``run`` sections
    (``dpl run``'s) are allowed too."""
    tables = {**SETTINGS, **(RUN_SETTINGS if run_config else {})}
    out = {}
    for section, values in raw.items():
        if section not in tables:
            if section in RUN_SETTINGS:
                raise DplError(
                    f"{source}: section {section!r} belongs in a `dpl run` config; a stage's "
                    f"--config takes only {', '.join(SETTINGS)}"
                )
            raise DplError(f"{source}: {unknown('section ', section, tables)}")
        if not isinstance(values, dict):
            raise DplError(f"{source}: section {section} must be a mapping of settings")
        try:
            out[section] = check_mapping(values, tables[section], f"{section}.")
        except SettingError as e:
            raise DplError(f"{source}: {e}") from None
    return out


def read_config(path: str | Path, run_config: bool = False) -> dict[str, dict[str, Any]]:
    """A YAML config file, checked against the defaults table (``check_config``)."""
    path = Path(path)
    return check_config(read_yaml(path), path, run_config)


def load_config(
    preset: str | Path | Mapping[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    sets: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every section: the defaults table, then the preset (name, YAML path, or a dict of
    sections as from the Python API), then
    ``overrides`` whose None values (flags not given on the command line) are ignored, then
    ``sets`` (``--set section.key=value``, where null is a value). Each layer is checked
    against the table (a one-line DplError naming the file, or ``--set``)."""
    config = copy.deepcopy(DEFAULTS)
    if isinstance(preset, Mapping):
        config = merge(config, check_config(dict(preset), "config"))
    elif preset:
        config = merge(config, read_config(preset_path(preset)))
    given = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in (overrides or {}).items()
    }
    config = merge(config, check_config(given, "command line"))
    return resolve_derived(merge(config, check_config(sets or {}, "--set")))


def resolve_derived(config: dict[str, Any]) -> dict[str, Any]:
    """Settings whose null means "as another setting": ``student.iters`` null is the
    teacher's iterations (a student trained as long as its teacher)."""
    if config.get("student", {}).get("iters") is None and "teacher" in config:
        config["student"]["iters"] = config["teacher"]["iters"]
    return config
