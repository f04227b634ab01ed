"""The shared part of the ``diffusiondci`` command line: the Typer app and its root callback (the
version, one-line warnings), the preset rule and the option helpers every command uses (preset
values in ``--help``, flag checks whose errors name the flag, comma-separated lists, progress bars).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from .. import __version__
from ..config import PRESETS, build, load_section
from ..errors import UserInputError

app = typer.Typer(
    help="DiffusionDCI: diffusion-based generation and segmentation of Dynamic Cell Imaging slides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: the one rule for the preset of every command that takes one: ``paper``, unless the environment
#: variable DIFFUSIONDCI_PRESET names another (``--preset`` always wins)
DEFAULT_PRESET = "paper"
PRESET_ENV = "DIFFUSIONDCI_PRESET"
PresetOpt = Annotated[str, typer.Option(
    "--preset", envvar=PRESET_ENV, show_default=f"{DEFAULT_PRESET}, or ${PRESET_ENV} when set",
    help="Config preset: tiny | paper | path to a YAML file. Options marked 'from preset' take its values.",
)]


@functools.cache
def _preset_value(preset: str, section: str, key: str) -> object:
    try:
        return load_section(preset, section).get(key)
    except UserInputError:
        return None


def _show(value: object, none: str) -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v, none) for v in value)
    return str(value)


def _from_preset(section: str, *keys: str, none: str = "auto") -> str:
    """Help text of the default of an option that overrides preset keys, e.g. ``from preset: tiny
    150, paper 20000`` (the values of several keys are joined by '/')."""
    parts = []
    for name in PRESETS:
        values = [_preset_value(name, section, k) for k in keys]
        parts.append(f"{name} {'/'.join(_show(v, none) for v in values)}")
    return "from preset: " + "; ".join(parts)


def _at_least(flag: str, value: float | None, minimum: float) -> None:
    """A flag's value below ``minimum`` is an error that names the flag (not the preset key)."""
    if value is not None and not value >= minimum:
        raise UserInputError(f"{flag} must be at least {minimum}, got {value}")


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserInputError(f"{flag} must be greater than 0, got {value}")


def _build(cls: type, values: dict, section: str, flags: dict[str, str] | None = None, **overrides: object):
    """:func:`build` whose errors name the flag a value came from (``--lr``), not the preset key
    (``dsdm.lr``); ``flags`` maps keys to flags where the flag is not ``--<key with dashes>``."""
    try:
        return build(cls, values, **overrides)
    except UserInputError as exc:
        message = str(exc)
        for key, value in overrides.items():
            if value is not None:
                flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
                message = re.sub(rf"\b{re.escape(section)}\.{re.escape(key)}\b", flag, message)
        if message == str(exc):
            raise
        raise UserInputError(message) from None


def _outputs(run: Path, names: tuple[str, ...]) -> str:
    """The ones of ``names`` that exist in ``run`` (what a finished command reports)."""
    return ", ".join(n for n in names if (run / n).exists())


#: plain on/off switches (--resume, --help) take no value: typer 0.29 would show "<bool>" after them
_FLAG_TYPE = typer.core.TyperOption.display_type_rich


def _flag_type(self: typer.core.TyperOption, ctx: object) -> str | None:
    return None if getattr(self, "is_flag", False) and not getattr(self, "count", False) else _FLAG_TYPE(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _progress_factory(label: str, total: int):
    bar = tqdm(total=total or None, desc=label, unit="roi", leave=False, disable=None)

    def update(done: int, total_now: int) -> None:
        if bar.total != total_now:
            bar.total = total_now
        bar.n = done
        bar.refresh()
        if done >= total_now:
            bar.close()

    return update


@contextlib.contextmanager
def _one_line_warnings():
    """While a command runs, every Python warning is one line ``warning: <message>`` on stderr, each
    message once: no source line, no file:line prefix, no repeats (e.g. from several processes or
    code paths)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            typer.echo(f"warning: {text}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffusiondci {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Run `diffusiondci COMMAND --help` for the options of each step."""
    ctx.with_resource(_one_line_warnings())


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserInputError(f"expected comma-separated integers, got {text!r}") from None
