"""Single-file detector checkpoints: weights + everything needed to rebuild the model.

A checkpoint is a ``torch.save``'d dict (loadable with ``weights_only=True``) holding the
format tag, dpl version, the ``DetectorSpec`` (architecture, class list, input size), the
builder options, the state dict and, while training, the optimizer/iteration state.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN

from dpl_tools import __version__
from dpl_tools.config import Section
from dpl_tools.defaults import ARCHS, DETECTOR_KWARGS
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path
from dpl_tools.settings import SettingError, check_mapping

FORMAT = "dpl-detector"
FORMAT_VERSION = 1


@dataclass
class DetectorSpec:
    """What a detector is: architecture, classes (COCO category dicts, label k = entry k-1),
    test input size, and its role (``teacher`` / ``student``)."""

    arch: str
    categories: list[dict]
    min_size: int
    max_size: int
    kind: str = "teacher"
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def label_to_cat(self) -> dict[int, int]:
        """Contiguous detector label (1..C) -> COCO category id."""
        return {i + 1: c["id"] for i, c in enumerate(self.categories)}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(model, "module", model)


def save_detector(
    path: str | Path,
    model: nn.Module,
    spec: DetectorSpec,
    train_state: dict | None = None,
) -> Path:
    """Write weights + spec (+ training state) to ``path`` atomically; returns the path."""
    model = unwrap(model)
    payload = {
        "spec": asdict(spec),
        "build": dict(getattr(model, "dpl_build", {})),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train_state": train_state,
    }
    return write_payload(path, FORMAT, FORMAT_VERSION, payload)


def write_payload(path: str | Path, fmt: str, version: int, payload: dict[str, Any]) -> Path:
    """Save a dpl checkpoint dict (format tag, version, dpl version + ``payload``) atomically."""
    full = {"format": fmt, "format_version": version, "dpl_version": __version__,
            **_plain_values(payload)}  # fmt: skip
    try:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(full, tmp)
    except OSError as e:
        reason = e.strerror or str(e).strip() or type(e).__name__
        raise DplError(f"{path}: cannot write the checkpoint ({reason})") from None
    except RuntimeError as e:
        # torch's zip writer reports a short write (a full disk, a file-size limit) as
        # "unexpected pos N vs M" or "file write failed", naming no file
        text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if not any(k in str(e) for k in ("unexpected pos", "write failed", "StreamWriter")):
            raise
        raise DplError(
            f"{path}: cannot write the checkpoint ({text.strip()}): is the disk full, or a "
            "file-size limit (ulimit -f) reached?"
        ) from None
    return Path(path)


def _plain_values(value: Any) -> Any:
    """``value`` with every config ``Section`` inside as plain dicts: a checkpoint holds only
    what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain_values(v) for v in value)
    return value


def read_payload(path: str | Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """Load a dpl checkpoint dict of format ``fmt``, or a one-line DplError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DplError(f"{path}: {what} checkpoint not found")
    try:
        with warnings.catch_warnings():
            # a pickle that is not a torch checkpoint: torch warns before refusing it
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DplError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise DplError(f"{path}: not a dpl {what} checkpoint")
    if payload.get("format_version", 0) > version:
        raise DplError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this dpl "
            f"({__version__}) reads"
        )
    return payload


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict of a dpl detector file, or a one-line DplError (also for
    a spec or builder options outside the config's ranges: ``check_build``)."""
    payload = read_payload(path, FORMAT, FORMAT_VERSION, "detector")
    check_build(payload, path)
    return payload


def check_build(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse (one-line DplError naming ``path``) a checkpoint whose model spec is invalid
    or whose builder options are not what ``model.detector_kwargs`` allows (unknown keys,
    types, the ranges of ``defaults.DETECTOR_KWARGS``): a crafted or damaged file would
    otherwise fail deep inside the model ("selected index k out of range")."""
    if "spec" in payload:
        spec_from_dict(payload["spec"], path)
    build = payload.get("build", {})
    if not isinstance(build, dict):
        raise DplError(f"{path}: invalid detector checkpoint: build options are not a mapping")
    try:
        check_mapping(build, DETECTOR_KWARGS, "build.")
    except SettingError as e:
        raise DplError(f"{path}: invalid detector checkpoint: {e}") from None


KINDS = ("teacher", "student")


def _spec_problem(raw: Any) -> str | None:
    """What is wrong with a saved spec dict (None: it is a valid DetectorSpec)."""
    if not isinstance(raw, dict):
        return f"the model spec is {type(raw).__name__}, not a mapping"
    missing = [k for k in ("arch", "categories", "min_size", "max_size") if k not in raw]
    if missing:
        return f"the model spec lacks {', '.join(missing)}"
    if not isinstance(raw["arch"], str) or raw["arch"] not in ARCHS:
        return f"unknown architecture {raw['arch']!r} (known: {', '.join(ARCHS)})"
    cats = raw["categories"]
    if not isinstance(cats, list) or not cats:
        return f"categories must be a non-empty list, got {type(cats).__name__}"
    for c in cats:
        if not isinstance(c, dict) or type(c.get("id")) is not int:
            return f"category {c!r} is not a mapping with an integer id"
    if len({c["id"] for c in cats}) != len(cats):
        return "categories repeat an id"
    for key in ("min_size", "max_size"):
        if type(raw[key]) is not int or raw[key] < 1:
            return f"{key} must be a positive integer, got {raw[key]!r}"
    if raw.get("kind", "teacher") not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {raw.get('kind')!r}"
    if not isinstance(raw.get("extra", {}), dict):
        return "extra must be a mapping"
    return None


def spec_from_dict(raw: dict[str, Any], path: str | Path | None = None) -> DetectorSpec:
    """A DetectorSpec from its saved dict (unknown keys are ignored); an invalid spec (a
    crafted or damaged file) is a one-line DplError naming ``path``."""
    problem = _spec_problem(raw)
    if problem is not None:
        raise DplError(f"{path or 'checkpoint'}: invalid detector checkpoint: {problem}")
    names = {f.name for f in fields(DetectorSpec)}
    return DetectorSpec(**{k: v for k, v in raw.items() if k in names})


# build options that default from the backbone weights (compared through those weights)
DERIVED_BUILD = ("frozen_bn", "frozen_stem")


def saved_model(payload: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What a checkpoint's detector is: arch, input sizes, backbone weights (None when not
    recorded) and the extra FasterRCNN arguments it was built with."""
    spec = spec_from_dict(payload.get("spec"), path)
    build = {k: v for k, v in dict(payload.get("build") or {}).items() if k not in DERIVED_BUILD}
    return {
        "arch": spec.arch,
        "min_size": spec.min_size,
        "max_size": spec.max_size,
        "backbone_weights": spec.extra.get("backbone_weights"),
        "detector_kwargs": build,
    }


def requested_model(model_section: dict[str, Any]) -> dict[str, Any]:
    """The detector a config's ``model`` section asks for, in ``saved_model``'s form."""
    kwargs = dict(model_section["detector_kwargs"])
    return {
        "arch": model_section["arch"],
        "min_size": int(model_section["min_size"]),
        "max_size": int(model_section["max_size"]),
        "backbone_weights": str(model_section["backbone_weights"]),
        "detector_kwargs": {k: v for k, v in kwargs.items() if k not in DERIVED_BUILD},
    }


def check_same_model(
    payload: dict[str, Any], wanted: dict[str, Any], path: str | Path, source: str = "model."
) -> None:
    """Refuse to resume ``path`` when ``wanted`` (``requested_model`` / ``saved_model``
    form; None values are not compared) differs from the checkpoint's detector, naming
    each difference (``--resume`` keeps the saved model, so a changed --arch would be
    silently ignored)."""
    saved = saved_model(payload, path)
    diffs = [
        f"{source}{key} {wanted[key]!r} (checkpoint: {saved[key]!r})"
        for key in saved
        if wanted.get(key) is not None and saved[key] is not None and wanted[key] != saved[key]
    ]
    if diffs:
        raise DplError(
            f"{path}: cannot resume a different model: {'; '.join(diffs)} "
            "(drop --resume to start again, or write to another --out)"
        )


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[FasterRCNN, DetectorSpec]:
    """Rebuild the detector saved at ``path`` (eval mode, on ``device``) and its spec."""
    model, spec = detector_from_checkpoint(read_checkpoint(path), path)
    return model.to(device).eval(), spec


def fresh_detector(
    model_section: dict[str, Any],
    categories: list[dict],
    kind: str,
    train_scales: list[float] | None = None,
    **extra: Any,
) -> tuple[FasterRCNN, DetectorSpec]:
    """A new detector of the config's ``model`` section for ``categories``, with its
    backbone weights (imagenet, none or a path), and its spec (``kind``: teacher or
    student; ``extra`` goes into the spec). ``train_scales``: multi-scale training factors
    of ``min_size``."""
    from dpl_tools.models.detector import build_detector, multiscale_sizes

    spec = DetectorSpec(
        arch=model_section["arch"],
        categories=categories,
        min_size=int(model_section["min_size"]),
        max_size=int(model_section["max_size"]),
        kind=kind,
        extra={"backbone_weights": str(model_section["backbone_weights"]), **extra},
    )
    model = build_detector(
        spec.arch,
        spec.num_classes,
        str(model_section["backbone_weights"]),
        multiscale_sizes(spec.min_size, train_scales),
        spec.max_size,
        **dict(model_section["detector_kwargs"]),
    )
    return model, spec


def detector_from_checkpoint(
    payload: dict[str, Any],
    path: str | Path,
    train_scales: list[float] | None = None,
    frozen_stem: bool | None = None,
) -> tuple[FasterRCNN, DetectorSpec]:
    """Rebuild the detector of a checkpoint dict (from ``read_checkpoint``) and its spec.

    ``train_scales``: multi-scale training factors of the test size (to continue training
    it); without them the model has its test input size only. The backbone layers frozen
    in training stay frozen (so a resumed run has the same trainable parameters), unless
    ``frozen_stem`` says otherwise.
    """
    from dpl_tools.models.detector import build_detector, multiscale_sizes

    if "spec" not in payload or not isinstance(payload.get("build", {}), dict):
        raise DplError(f"{path}: invalid detector checkpoint: no model spec or build options")
    check_build(payload, path)
    spec = spec_from_dict(payload["spec"], path)
    build = dict(payload["build"])
    if frozen_stem is not None:
        build["frozen_stem"] = frozen_stem
    elif "frozen_stem" not in build:  # not recorded before 2026-12-07: frozen when pretrained
        build["frozen_stem"] = str(spec.extra.get("backbone_weights", "none")) != "none"
    try:
        model = build_detector(
            spec.arch,
            spec.num_classes,
            "none",
            multiscale_sizes(spec.min_size, train_scales),
            spec.max_size,
            **build,
        )
        model.load_state_dict(payload["state_dict"])
    except DplError as e:
        raise DplError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DplError(f"{path}: corrupt detector checkpoint ({first})") from None
    return model, spec
