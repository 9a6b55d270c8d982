"""Options every command spells the same way, and argparse types that refuse bad numbers at once.

Conventions (docs/deploy.md, README):

* ``-c/--checkpoint FILE``: the ``.pth`` checkpoint or ``.safetensors`` export a command loads.
* ``--weights best|ema|raw``: which set of a checkpoint's weights (default ``best``, the one that
  validated better); the command says on stderr which it used.
* ``-o/--output``: what the command writes (a file or, for many files, a folder).
* ``--device auto|cpu|cuda|cuda:N`` (default ``auto``: CUDA when available).
* ``--amp none|bf16|fp16|auto`` on evaluation commands (default ``none``: float32).
* ``--json``: print the result as JSON on stdout (messages go to stderr).

Old spellings still parse but are hidden from ``--help``: ``pale eval CHECKPOINT`` (positional),
``--json-out`` (now ``-o``).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional, Tuple

AMP_CHOICES = ("none", "bf16", "fp16", "auto")


def _number(kind: Callable[[str], Any], low: Optional[float], high: Optional[float] = None,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` within ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high) or value != value:
            bounds = (f"> {low:g}" if low_open else f">= {low:g}") if high is None else \
                f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
fraction = _number(float, 0.0, 1.0)


def add_checkpoint(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    p.add_argument("--checkpoint", "-c", required=required, metavar="FILE", help=help)


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=("best", "ema", "raw"), default="best",
                   help="which weights of a checkpoint: best (default: the set that validated better; raw when "
                        "the file records no validation of both), ema, or raw")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available, else the CPU), cpu, cuda, cuda:N")


def add_amp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", choices=AMP_CHOICES, default="none",
                   help="precision of evaluation: none (default, float32), bf16, fp16 (CUDA), auto (as in training)")


def add_json_output(p: argparse.ArgumentParser, help: str) -> None:
    """``-o/--output FILE`` for a JSON result, with the old ``--json-out`` spelling hidden."""
    p.add_argument("--output", "-o", metavar="FILE", help=help)
    p.add_argument("--json-out", dest="output", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON (instead of the summary line)")


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT|auto",
                   help="continue a run exactly: from CHECKPOINT (a file or run folder; default: the newest "
                        "checkpoint in --output); auto: continue the run in --output if there is one, else "
                        "start it (for job scripts that torchrun or a scheduler start again)")


def resolve_resume(resume: Optional[str], output: Optional[str], default_output: str) -> Tuple[Optional[str], str]:
    """``(resume, output)`` for :func:`pale.train.train` from ``--resume`` and ``--output``: a bare
    ``--resume`` continues the run in the output folder, ``auto`` passes through (continue or start)."""
    from pathlib import Path

    from ..errors import MissingFileError

    out = output
    if out is None and resume in (None, "", "auto"):
        out = default_output
    if resume == "":
        resume = out
    if resume not in (None, "auto") and not Path(resume).exists():
        raise MissingFileError(f"checkpoint to resume not found: {resume}")
    return resume, out


def print_best(summary: dict) -> None:
    """The run's best validation, printed once (by rank 0 under torchrun)."""
    import os

    best = summary.get("best") or {}
    if best and int(os.environ.get("RANK", "0")) == 0:
        print(f"best {best['metric']} {best['value']:.3f} at epoch {best['epoch']}")
