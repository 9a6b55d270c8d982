"""The ``pale`` command. Each sub-command lives in a module of :mod:`pale.commands` that defines
``register(subparsers)``; this file only collects them.

Command modules import torch and timm only inside the functions that run a command, so ``pale --help``
and argument errors answer at once. Errors of bad input (:class:`pale.errors.UserError`) print as one
line and exit with status 1; ``PALE_DEBUG=1`` shows their traceback. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import List, Optional

from . import __version__, commands
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pale", description="Pale Transformer: models, training and tools.")
    parser.add_argument("--version", action="version", version=f"pale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``pale predict --json | head``): stop without a message.
    stdout is pointed at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))  # for one-line errors
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except UserError as err:
        if os.environ.get("PALE_DEBUG"):
            raise
        print(f"pale {name}: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:  # Ctrl-C (pale train saves first and exits 130 itself; a second Ctrl-C ends here)
        if os.environ.get("PALE_DEBUG"):
            raise
        print(f"\npale {name}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
