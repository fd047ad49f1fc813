"""A daemon's TOML config file: every `serve` flag as a key, the command line overriding it.

Keys are the flags' own names without the dashes in front (`data-dir`, `grpc-agents`,
`conda-channel`), so what `--help` shows is what the file says; a repeatable flag takes
a list of strings, a flag without a value (`--json`) true or false. A flag given on the
command line wins over the file, a repeatable one replacing the file's whole list.

    studio-controller serve --config /etc/studios/controller.toml --http 0.0.0.0:8080

The file is read strictly: an unknown key, a value of the wrong type or one the flag
refuses (a choice it does not offer, a HOST:PORT that is none) stops the daemon with one
line naming the key and the file (ConfigFileError). `--config` and `--help` are not keys.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "USAGE_EXIT",
    "ConfigFileError",
    "apply_config_file",
    "config_help",
    "config_source",
    "make_optional",
    "read_serve_config",
    "subcommand_argv",
    "subparser",
    "usage_error",
]

# The exit status of `serve` given a wrong setting (argparse's own for a bad flag): systemd
# units keep restarting on other failures, and a setting does not fix itself.
USAGE_EXIT = 2


class ConfigFileError(ValueError):
    """What is wrong with the config file, naming the key (when one is) and the file."""


def config_source(explicit: Path | None, default: Path) -> Path | None:
    """The file to read: `--config`, else `default` when it exists, else none."""
    if explicit is not None:
        return explicit
    return default if default.is_file() else None


def make_optional(parser: argparse.ArgumentParser) -> None:
    """Make the parser's required options optional: the file may give them instead
    (`apply_config_file` checks them, given their flags)."""
    for action in parser._actions:
        if action.required and action.option_strings:
            action.required = False
            action.help = f"{action.help + '; ' if action.help else ''}required (or in the file)"


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand `name`'s parser (argparse has no public way to reach it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def subcommand_argv(argv: Sequence[str], name: str) -> list[str]:
    """The arguments after the subcommand (the top-level parsers take no options)."""
    items = list(argv)
    return items[items.index(name) + 1 :] if name in items else []


def _keyed_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options a file may set, by key (the long flag without its dashes)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest == "config":
            continue
        for flag in action.option_strings:
            if flag.startswith("--"):
                out[flag[2:]] = action
    return out


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests set on the command line (argparse keeps no record of that: parse again
    with every default suppressed, so only what was given lands in the namespace)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


def _string_value(action: argparse.Action, value: str) -> Any:
    converter = action.type
    try:
        converted = converter(value) if callable(converter) else value
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ValueError(str(exc) or f"invalid value {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ValueError(f"{value!r} is not one of {choices}")
    return converted


def _value(action: argparse.Action, value: Any) -> Any:
    """The file's value as the flag would have made it; ValueError saying what is wrong."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {type(value).__name__} {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return [_string_value(action, v) for v in value]
    if action.type is int or action.type is float:
        # TOML's own numbers (an int where a float is wanted is fine; a bool is no number).
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
        if action.type is int:
            if not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}")
            return value
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    return _string_value(action, value)


def apply_config_file(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: Sequence[str],
    path: Path | None,
    required: Sequence[str] = (),
) -> None:
    """Set in `args` what the file at `path` gives and the command line (`argv`, the
    subcommand's own arguments) does not; then check the options that are required
    (`required`, their flags). ConfigFileError naming the key and the file."""
    if path is not None:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigFileError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
        actions = _keyed_actions(parser)
        given = _given(parser, argv)
        for key, value in data.items():
            action = actions.get(key)
            if action is None:
                hint = f" (keys are the flags without '--', e.g. {key.replace('_', '-')!r})"
                raise ConfigFileError(f"{path}: unknown key {key!r}{hint if '_' in key else ''}")
            try:
                converted = _value(action, value)
            except ValueError as exc:
                raise ConfigFileError(f"{path}: {key}: {exc}") from None
            if action.dest not in given:
                setattr(args, action.dest, converted)
    by_key = _keyed_actions(parser)
    missing = [flag for flag in required if getattr(args, by_key[flag[2:]].dest, None) is None]
    if missing:
        flags = ", ".join(missing)
        where = f"on the command line or in {path}" if path else "(or in a --config file)"
        raise ConfigFileError(f"{flags}: required {where}")


def config_help(default: Path) -> str:
    return (
        f"a TOML file of serve's settings, keys named as the flags without '--' "
        f"(default: {default} when it exists); flags on the command line override it"
    )


def usage_error(prog: str, problem: object) -> int:
    """Say what is wrong on one line of stderr (`prog: problem`, no traceback); USAGE_EXIT."""
    print(f"{prog}: {problem}", file=sys.stderr)
    return USAGE_EXIT


def read_serve_config(
    prog: str,
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: Sequence[str],
    *,
    explicit: Path | None,
    default: Path,
    required: Sequence[str] = (),
) -> int | None:
    """`serve`'s settings from its config file (`explicit`, its --config, else `default`
    when it exists) into `args`, the command line (`argv`, the whole of it) overriding
    them. None when they are fine; else the exit status, the problem said (usage_error)."""
    try:
        apply_config_file(
            subparser(parser, "serve"),
            args,
            subcommand_argv(argv, "serve"),
            config_source(explicit, default),
            required=required,
        )
    except ConfigFileError as exc:
        return usage_error(prog, exc)
    return None
