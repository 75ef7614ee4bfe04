"""Command lines: absl flags, ml_collections config files, and one way to fail.

Config-driven entry points (train, probe, fine-tune) take big_vision's and nanodo's form:

    --config=configs/file.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

parsed by `ml_collections.config_flags` (types checked against the config, the config locked).
igpt adds what those libraries lack: a missing config file, an error in `get_config(ARG)` or an
unknown key (with the closest valid one) is one line, not a traceback.

Every entry point runs through `run(main)`, which gives one exit-code policy:
    0   done
    1   failed: an explained error (bad data, a mismatched checkpoint, a NaN), one line
    2   bad command line: an unknown or mistyped flag or config key, one line
    75  preempted: a checkpoint was saved; run the same command again to resume (EX_TEMPFAIL)
Errors that are not explained (bugs) keep their traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from igpt.runtime import use_compilation_cache

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75

FLAGS = flags.FLAGS

# Failures with an explanation in their message; anything else is a bug and keeps its traceback.
EXPLAINED = (ValueError, OSError, RuntimeError, FloatingPointError, KeyError)


class UsageError(ValueError):
    """A command line that cannot be used (exit status 2)."""

    exit_code = EXIT_USAGE


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(ARG)` of a config file given as "path/to/file.py[:ARG]"."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise UsageError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"igpt_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"config file {path!r} has no get_config(arg) function")
    try:
        return module.get_config(arg or None)
    except ValueError as e:
        raise UsageError(f"{spec}: {e}") from None


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raise a UsageError naming the closest valid key if the dotted `key` is not a setting."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:depth]) or "config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {'.'.join([*parts[:depth], close[0]])!r}?" if close else ""
            raise UsageError(
                f"--config.{key}: {where} has no key {part!r}{hint} (valid: {sorted(keys)})"
            )
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise UsageError(f"--config.{key} is a group of settings; set one of {sorted(node)}")


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_args(argv: Sequence[str]) -> None:
    """Load the config file and check every `--config.KEY` before absl parses them."""
    spec = _flag_value(argv, "config")
    if spec is None:
        raise UsageError("--config=FILE.py[:ARG] is required")
    config = load_config(spec)
    for arg in argv[1:]:
        if arg.startswith("--config."):
            check_key(config, arg[len("--config.") :].split("=", 1)[0])


def define_config_flags() -> None:
    """`--config` (a config file) and `--workdir`, for config-driven entry points."""
    config_flags.DEFINE_config_file("config", None, "config file[:ARG]", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory of the run", required=True)


def fail(prog: str, error: BaseException | str, code: int = EXIT_FAILED):
    """Print an error as one line and exit with `code`."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main: Callable[[], object], argv: Sequence[str] | None = None) -> None:
    """Parse the flags defined so far, call `main()` and exit by the policy above."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).stem
    try:
        if "config" in FLAGS:
            _check_config_args(argv)
        extra = FLAGS(argv)[1:]
        if extra:
            raise UsageError(f"unexpected arguments {extra}; flags are written --name=value")
    except (flags.Error, UsageError) as e:
        fail(prog, e, EXIT_USAGE)
    logging.set_verbosity(logging.ERROR)  # orbax and grain log routine events as warnings
    use_compilation_cache()
    try:
        main()
    except EXPLAINED as e:
        fail(prog, e, getattr(type(e), "exit_code", EXIT_FAILED))
    except Exception as e:
        code = getattr(type(e), "exit_code", None)
        if code is None:
            raise
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        sys.exit(code)
    sys.exit(0)
