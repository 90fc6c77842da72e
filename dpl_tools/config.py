"""Configuration: built-in defaults < YAML preset (dpl_tools/configs) < command-line flags.

A config is a nested dict with one section per stage (model / teacher / polisher /
polish / student); every key and its default is in one table, ``dpl_tools.defaults``.
A preset is a name in ``dpl_tools/configs/`` (e.g. ``cpu_mobilenet``) or a path to a YAML
file. Every layer is checked against the table: an unknown section or key (with a
did-you-mean), a wrong type or an out-of-range value is a one-line DplError naming the file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dpl_tools.defaults import DEFAULTS, RUN_SETTINGS, SETTINGS
from dpl_tools.errors import DplError
from dpl_tools.settings import SettingError, check_mapping, unknown
from dpl_tools.textfiles import read_yaml_file

# Presets ship inside the package (dpl_tools/configs/), so a wheel install has them too.
PRESET_DIRS = (Path(__file__).parent / "configs",)


class Section(Mapping[str, Any]):
    """One checked config section, read-only: a setting by attribute (``cfg.student.iters``)
    or by key (``cfg["student"]["iters"]``). Values are in their canonical types (a float
    setting holds a float); nested mappings (``model.detector_kwargs``) are Sections too
    and lists are tuples, so nothing inside can change after the checks."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        frozen = {k: _frozen(f"{name}.{k}", v) for k, v in values.items()}
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", frozen)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config {self._name} has no setting {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"config {self._name} is read-only (build another with load_config)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self.to_dict()!r})"

    def __deepcopy__(self, memo: dict) -> Section:
        return self  # read-only: a copy is the same object

    def __reduce__(self) -> tuple:
        return (type(self), (self._name, self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (JSON, YAML, checkpoints)."""
        return {k: _thawed(v) for k, v in self._values.items()}


class Config(Section):
    """Every section of a loaded config (``load_config``): ``cfg.student`` is a Section."""

    def __init__(self, sections: Mapping[str, Mapping[str, Any]]) -> None:
        object.__setattr__(self, "_name", "config")
        object.__setattr__(self, "_values", {k: Section(k, v) for k, v in sections.items()})

    def __reduce__(self) -> tuple:
        return (type(self), (self.to_dict(),))


def _frozen(name: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return Section(name, value)
    if isinstance(value, list | tuple):
        return tuple(_frozen(name, v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config or section as plain dicts (a plain dict is returned as a deep copy)."""
    return config.to_dict() if isinstance(config, Section) else copy.deepcopy(dict(config))


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
    if not isinstance(raw, dict):
        raise DplError(f"{path}: a config must map section names (model, teacher, ...) to mappings")
    # a section left with every key commented out is empty, not an error
    raw = {section: {} if values is None else values for section, values in raw.items()}
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise DplError(f"{path}: section {section} must be a mapping of settings")
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
        for key in values:
            homes = [name for name, table in tables.items() if key in table]
            if key not in tables[section] and homes:
                raise DplError(
                    f"{source}: unknown key {section}.{key} (a setting of the "
                    f"{' and '.join(homes)} section{'s' if len(homes) > 1 else ''})"
                )
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
) -> Config:
    """Every section, as a read-only ``Config``: the defaults table, then the preset (name,
    YAML path, or a dict of sections as from the Python API), then ``overrides`` whose None
    values (flags not given on the command line) are ignored, then ``sets`` (``--set
    section.key=value``, where null is a value). Each layer is checked against the table
    (a one-line DplError naming the file, or ``--set``)."""
    config = copy.deepcopy(DEFAULTS)
    if isinstance(preset, Mapping):
        config = merge(config, check_config(plain(preset), "config"))
    elif preset:
        config = merge(config, read_config(preset_path(preset)))
    given = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in (overrides or {}).items()
    }
    config = merge(config, check_config(given, "command line"))
    config = resolve_derived(merge(config, check_config(sets or {}, "--set")))
    check_together(config)
    return Config(config)


def check_together(config: Mapping[str, Any]) -> None:
    """Refuse settings that are valid alone but not together (a one-line DplError), so a
    `dpl run` fails before its first stage rather than hours later at the student's."""
    student = config.get("student", {})
    if student.get("negatives") == "soft" and student.get("train_crop"):
        raise DplError(
            f"student.negatives soft cannot train on crops (student.train_crop "
            f"{student['train_crop']}): the teacher scores the background on whole images; "
            "use negatives ignore or hard, or train_crop null"
        )


def resolve_derived(config: dict[str, Any]) -> dict[str, Any]:
    """Settings whose null means "as another setting": ``student.iters`` null is the
    teacher's iterations (a student trained as long as its teacher)."""
    if config.get("student", {}).get("iters") is None and "teacher" in config:
        config["student"]["iters"] = config["teacher"]["iters"]
    return config
