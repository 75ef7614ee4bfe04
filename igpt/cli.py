"""Command-line plumbing shared by the scripts: config files and `--config.KEY=VALUE`.

Every mistake is reported before anything runs, as one line saying what was wrong: a config
file that does not exist, an unknown key (with the closest valid one), a value of the wrong
type.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(ARG)` of a config file given as "path/to/file.py[:ARG]"."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"igpt_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg) function")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:
        raise ConfigError(f"{spec}: {e}") from None
    return config


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _coerce(key: str, old, text: str):
    value = _parse_value(text)
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
        if str(text).lower() in ("true", "false"):
            return str(text).lower() == "true"
    elif isinstance(old, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(old, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(old, str):
        return text
    elif isinstance(old, tuple | list) and isinstance(value, tuple | list | int):
        return tuple(value) if isinstance(value, tuple | list) else (value,)
    elif old is None:
        return value
    raise ConfigError(
        f"--config.{key}={text}: expected a value of type {type(old).__name__} "
        f"(the current value is {old!r})"
    )


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set the dotted `key` of `config` from its command-line text, checking key and type."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:depth]) or "config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {'.'.join([*parts[:depth], close[0]])!r}?" if close else ""
            raise ConfigError(
                f"--config.{key}: {where} has no key {part!r}{hint} (valid: {sorted(keys)})"
            )
        if depth < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a group of settings; set one of {sorted(old)}")
    with node.unlocked():
        node[parts[-1]] = _coerce(key, old, text)


def parse_run_args(description: str, argv: Sequence[str] | None = None):
    """Parse `--config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]`.

    Returns `(config, args)`; exits with a one-line message on any mistake.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="config file[:ARG]")
    parser.add_argument("--workdir", required=True, help="directory of the run")
    args, rest = parser.parse_known_args(argv)
    try:
        config = load_config(args.config)
        for item in rest:
            if not item.startswith("--config."):
                raise ConfigError(f"unexpected argument {item!r}; use --config.KEY=VALUE")
            key, has_value, text = item[len("--config.") :].partition("=")
            if not has_value:
                raise ConfigError(f"{item}: write --config.{key}=VALUE (with '=')")
            apply_override(config, key, text)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    config.lock()
    return config, args


def fail(prog: str, error: Exception) -> None:
    """Print an error as one line and exit with status 1 (for expected, explained failures)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(1)
