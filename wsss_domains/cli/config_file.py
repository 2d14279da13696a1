"""``--config FILE.yaml``: a whole command's options in one file, and the effective options saved.

A config file is a YAML mapping from a subcommand's long option names (``budget-minutes`` or
``budget_minutes``) to values. It is turned into command-line tokens placed before the ones typed,
so argparse checks types, choices and required options exactly as on the command line, and an option
typed after the command wins over the file's (repeatable options, ``--domain-option`` and
``--method-option``, collect both). ``KEY=VALUE`` options also take a mapping::

    domain: histo
    data: ../shared/data/WSSS4LUAD
    train-split: validation
    budget-minutes: 15
    domain-option: {stain: macenko}

Every command that writes a folder saves the options it ran with as ``config.yaml`` there, in the
same form, so ``--config OUT/config.yaml`` runs it again.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsss_domains.errors import UserError

CONFIG_OPTION = "--config"
SAVED_NAME = "config.yaml"
_NOT_OPTIONS = {"func", "command", "config", "help"}


class ConfigError(UserError):
    """A config file that cannot be read or names an option the command lacks."""


def split_config_argument(argv: list[str]) -> tuple[list[str], Path | None]:
    """``argv`` without ``--config PATH`` (or ``--config=PATH``), and that path."""
    rest: list[str] = []
    path: Path | None = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest += argv[i:]
            break
        if token == CONFIG_OPTION:
            if i + 1 >= len(argv):
                raise ConfigError(f"{CONFIG_OPTION} needs a file: {CONFIG_OPTION} run.yaml")
            path, i = Path(argv[i + 1]), i + 2
            continue
        if token.startswith(CONFIG_OPTION + "="):
            path, i = Path(token.split("=", 1)[1]), i + 1
            continue
        rest.append(token)
        i += 1
    return rest, path


def read_config(path: Path) -> dict[str, Any]:
    """The mapping a config file holds (an empty file is an empty mapping)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of option: value, got {type(data).__name__}")
    return data


def _optionals(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's long options by name without dashes (``budget-minutes``)."""
    found = {}
    for action in parser._actions:  # argparse offers no public listing of a parser's actions
        for option in action.option_strings:
            if option.startswith("--"):
                found[option[2:]] = action
    return found


def _scalar(value: Any, key: str, path: Path) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{path}: '{key}' takes one value, got {value!r}")
    return str(value)


def config_tokens(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """Command-line tokens equivalent to the config file, for the subcommand ``parser``."""
    options = _optionals(parser)
    tokens: list[str] = []
    for raw_key, value in read_config(path).items():
        key = str(raw_key).replace("_", "-")
        action = options.get(key)
        if action is None or key in _NOT_OPTIONS:
            known = sorted(k for k in options if k not in _NOT_OPTIONS)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{path}: '{raw_key}' is not an option of this command{hint} (options: {', '.join(known)})"
            )
        flag = f"--{key}"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: '{raw_key}' is a switch: true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                tokens.append(flag)
            continue
        if value is None:
            continue
        if isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            if isinstance(value, Mapping):
                items = [f"{k}={v}" for k, v in value.items()]
            for item in items:
                tokens += [flag, _scalar(item, key, path)]
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = value if isinstance(value, list) else [value]
            tokens += [flag, *(_scalar(v, key, path) for v in items)]
        else:
            tokens += [flag, _scalar(value, key, path)]
    return tokens


def effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The options a command ran with, keyed as a config file keys them (defaults included)."""
    out: dict[str, Any] = {}
    for key, action in _optionals(parser).items():
        if key in _NOT_OPTIONS or action.dest in _NOT_OPTIONS or not hasattr(args, action.dest):
            continue
        if any(k != key and a is action and len(k) > len(key) for k, a in _optionals(parser).items()):
            continue  # an action with several long names is saved under its longest
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreFalseAction):
            value = not value if isinstance(value, bool) else value
        if value is None or (isinstance(value, list) and not value):
            continue
        out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace, folder: Path) -> Path:
    """``folder/config.yaml`` with the options the command ran with."""
    import yaml

    from wsss_domains.data.io import atomic_write

    path = Path(folder) / SAVED_NAME
    text = yaml.safe_dump(effective_config(parser, args), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
