"""``pale eval -c CHECKPOINT --data FOLDER``: top-1, top-5 and loss of a saved classifier on an image folder."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._options import add_amp, add_checkpoint, add_device, add_json_output, add_weights, nonnegative_int, positive_int


def checkpoint_argument(args: argparse.Namespace) -> str:
    """``-c FILE``, or the older positional spelling ``pale eval FILE`` (one of them, not two different ones)."""
    from ..errors import InputError

    given = {c for c in (args.checkpoint, args.checkpoint_positional) if c}
    if not given:
        raise InputError("no checkpoint given: pass -c/--checkpoint FILE")
    if len(given) > 1:
        raise InputError(f"two checkpoints given ({', '.join(sorted(given))}); pass one with -c")
    return given.pop()


def run(args: argparse.Namespace) -> int:
    from ..files import atomic_write_json
    from ..train.evaluate import evaluate_checkpoint

    checkpoint = checkpoint_argument(args)
    result = evaluate_checkpoint(checkpoint, args.data, args.batch_size, args.workers, args.amp, args.device,
                                 args.skip_bad_images, strict=not args.non_strict, weights=args.weights)
    print(f"weights: {result['weights']} ({result['weights_reason']}); precision: {result['amp']}", file=sys.stderr)
    out = Path(args.output) if args.output else Path(checkpoint).with_name(
        f"eval-{Path(args.data).resolve().name}.json")
    atomic_write_json(out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"top1 {result['top1']:.3f}  top5 {result['top5']:.3f}  loss {result['loss']:.4f}  "
          f"({result['n']} images{', %d skipped' % result['skipped_images'] if result['skipped_images'] else ''})")
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="top-1 / top-5 / loss of a checkpoint on an image folder")
    add_checkpoint(p, "a .pth checkpoint of pale train or a .safetensors export", required=False)
    p.add_argument("checkpoint_positional", nargs="?", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("--data", required=True, help="folder of <class>/<image> (class names as in the checkpoint)")
    add_weights(p)
    p.add_argument("--batch-size", "-b", type=positive_int, default=64)
    p.add_argument("--workers", type=nonnegative_int, default=0, help="data loader processes (default 0)")
    add_amp(p)
    add_device(p)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--non-strict", action="store_true",
                   help="load the weights that fit and report the rest, instead of refusing a mismatched checkpoint")
    add_json_output(p, "JSON result (default: eval-<folder>.json next to the checkpoint)")
    p.set_defaults(func=run)
