"""Command-line front end shared by the entry points: `--config FILE key.sub=value ... [--print-config]`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

from config import ConfigError, ExpectedError, load_config, to_yaml

DEFAULT_CONFIG = "cluster_configs/local_cpu.yaml"


def at_least(low: float, kind: Callable = int) -> Callable[[str], float]:
    """An argparse type: a `kind` number >= `low`. Out of range is refused with the value named, never
    replaced by a default."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


DEBUG_ENV = "IDENTITY_GRPO_DEBUG"  # =1: expected errors propagate with their traceback instead of one line


def report_expected(command: str, message: str) -> int:
    """Call inside `except`: an entry point's answer to an expected error (config, path, data, checkpoint) is one
    line `<command>: <message>` on stderr and status 2; with IDENTITY_GRPO_DEBUG=1 the error propagates instead,
    traceback and all. Real bugs are never caught, so they always show theirs."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise  # the exception the caller is handling, with its traceback
    print(f"{command}: {message}", file=sys.stderr)
    return 2


def exit_expected(command: str, message: str) -> NoReturn:
    """`report_expected`, then exit with its status."""
    raise SystemExit(report_expected(command, message))


def expected_message(err: BaseException) -> str:
    """The error's own message; for one raised inside a Ray actor (Ray's RayTaskError, an instance of its cause's
    class too), the cause's message without the remote traceback."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, BaseException) else err)


@contextlib.contextmanager
def expected_errors(command: str, *also: type) -> Iterator[None]:
    """The entry points' one boundary for expected errors: an ExpectedError (config, paths, data, checkpoints: every
    room's own class derives from it), a NotADirectoryError (an output path under an existing file; its message
    names the path), or one of `also`, raised in the block is answered by `report_expected`."""
    try:
        yield
    except (ExpectedError, NotADirectoryError, *also) as err:
        exit_expected(command, expected_message(err))


def build_parser(description: str, default_config: str = DEFAULT_CONFIG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="OmegaConf YAML (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.steps=3")
    return parser


def parse_config(description: str, argv: Optional[Sequence[str]] = None,
                 parser: Optional[argparse.ArgumentParser] = None, loader: Callable = load_config,
                 command: str = "train"):
    """Parse argv into (config, args). A bad key or value exits with status 2 and one line
    `<command>: config error: ...` naming it."""
    parser = parser or build_parser(description)
    args = parser.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    try:
        cfg = loader(args.config, args.overrides)
    except ConfigError as err:
        exit_expected(command, f"config error: {err}")
    except NotImplementedError as err:  # a valid setting this version does not implement (README, "Not built yet")
        exit_expected(command, f"not implemented: {err}")
    if args.print_config:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg, args


# ----------------------------------------------------------------------------- checks before any work starts


def require_writable(key: str, path: str) -> None:
    """ConfigError naming `key` unless `path`, or the nearest of its parents that exists, is writable."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"'{key}' {path}: {existing} is not a writable directory")
