"""Typed configuration: YAML presets (``tiny``, ``paper``) with command-line overrides.

A preset is a YAML file with one section per stage. ``load_section(preset, "prepare")`` returns
the section as a dict; each stage turns it into its own dataclass with :func:`build`, which rejects
unknown keys so that a typo in a config file is an error rather than a silent default.
"""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserInputError

PRESETS = ("tiny", "paper")
T = TypeVar("T")


def preset_path(preset: str) -> Path:
    """Path of a named preset shipped with the package, or of a user YAML file."""
    if preset in PRESETS:
        return Path(str(resources.files("diffusiondci") / "configs" / f"{preset}.yaml"))
    path = Path(preset)
    if not path.is_file():
        raise UserInputError(f"unknown preset; use one of {', '.join(PRESETS)} or a YAML file", preset)
    return path


def load_preset(preset: str) -> dict[str, Any]:
    path = preset_path(preset)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"invalid YAML{where}: {what}", path) from None
    if not isinstance(data, dict):
        raise UserInputError("a preset must be a mapping of stage sections", path)
    return data


def load_section(preset: str, section: str) -> dict[str, Any]:
    data = load_preset(preset)
    if section not in data:
        raise UserInputError(f"preset has no '{section}' section", preset_path(preset))
    return dict(data[section])


def build(cls: type[T], values: dict[str, Any], **overrides: Any) -> T:
    """Instantiate dataclass ``cls`` from ``values``; ``overrides`` that are not None win."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        close = {k: difflib.get_close_matches(k, sorted(names), 1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
        raise UserInputError(f"unknown {cls.__name__} keys {unknown}{f' ({hint})' if hint else ''}; "
                             f"valid keys: {sorted(names)}")
    merged = dict(values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**merged)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
