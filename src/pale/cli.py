"""The ``pale`` command. Each sub-command lives in a module of :mod:`pale.commands` that defines
``register(subparsers)``; this file only collects them."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pale", description="Pale Transformer: models, training and tools.")
    parser.add_argument("--version", action="version", version=f"pale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        # Expected user errors: one clear line, no stack trace. PALE_DEBUG=1 shows the trace.
        import os
        if os.environ.get("PALE_DEBUG"):
            raise
        print(f"pale {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
