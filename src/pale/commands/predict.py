"""``pale predict IMAGE_OR_FOLDER... -c CHECKPOINT``: top-k classes and probabilities."""
from __future__ import annotations

import argparse
import json
import sys

from ._options import add_checkpoint, add_device, add_weights, positive_int


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import describe_weights
    from ..files import atomic_write_json
    from ..images import find_images
    from ..predict import format_table, load_classifier, predict

    paths = find_images(args.inputs)
    classifier = load_classifier(args.checkpoint, device=args.device, strict=not args.non_strict,
                                 weights=args.weights)
    print(describe_weights(classifier.info), file=sys.stderr)
    result = predict(classifier, paths, topk=args.topk, batch_size=args.batch_size,
                     show_progress=not args.no_progress, skip_bad=args.skip_bad)
    if args.output:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images with a checkpoint: top-k names and probabilities")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (searched recursively)")
    add_checkpoint(p, "a .pth checkpoint or .safetensors export with class names")
    add_weights(p)
    p.add_argument("--topk", "-k", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=16)
    add_device(p)
    p.add_argument("--output", "-o", metavar="FILE", help="also write the predictions as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress report")
    p.add_argument("--non-strict", action="store_true",
                   help="load the weights that fit and report the rest, instead of refusing a mismatched checkpoint")
    p.set_defaults(func=run)
