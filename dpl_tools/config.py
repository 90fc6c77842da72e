"""Configuration: built-in defaults < YAML preset (dpl_tools/configs) < command-line flags.

A config is a nested dict with one section per stage (model / teacher / polisher /
polish / student). Stages add their defaults with ``register_defaults``; a preset is a
name in ``dpl_tools/configs/`` (e.g. ``cpu_mobilenet``) or a path to a YAML file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from dpl_tools.errors import DplError

# Presets ship inside the package (dpl_tools/configs/), so a wheel install has them too.
PRESET_DIRS = (Path(__file__).parent / "configs",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "arch": "mobilenet_v2_fpn",
        "backbone_weights": "none",
        "min_size": 480,  # test-time shorter side
        "max_size": 800,
        # extra torchvision FasterRCNN arguments (e.g. rpn_post_nms_top_n_train)
        "detector_kwargs": {},
    },
    "teacher": {
        "iters": 400,
        "batch_size": 2,  # per process (per GPU under torchrun)
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "warmup_iters": 100,
        "warmup_factor": 0.001,
        "lr_steps": [0.667, 0.889],  # fractions of iters where lr is multiplied by gamma
        "gamma": 0.1,
        "clip_grad_norm": 10.0,
        "multiscale": [0.8, 0.9, 1.0, 1.1, 1.2],  # training shorter sides, x model.min_size
        "hflip": True,
        "workers": 2,
        "checkpoint_every": 100,
    },
}


def register_defaults(section: str, values: dict[str, Any]) -> None:
    """Add a stage's default settings (keys already present are kept)."""
    DEFAULTS.setdefault(section, {})
    for key, value in values.items():
        DEFAULTS[section].setdefault(key, value)


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
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DplError(f"{path}: cannot read YAML ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise DplError(f"{path}: a config must map section names (model, teacher, ...) to mappings")
    return raw


def load_config(
    preset: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Defaults, then the preset (name or YAML path), then ``overrides`` whose None values
    (flags not given on the command line) are ignored."""
    config = copy.deepcopy(DEFAULTS)
    if preset:
        config = merge(config, read_yaml(preset_path(preset)))
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        config = merge(config, {section: given})
    return config
