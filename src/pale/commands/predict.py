"""``pale predict IMAGE_OR_FOLDER... --checkpoint FILE``: top-k classes and probabilities."""
from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from ..predict import find_images, format_table, load_classifier, predict

    paths = find_images(args.inputs)
    classifier = load_classifier(args.checkpoint, device=args.device, strict=not args.non_strict)
    result = predict(classifier, paths, topk=args.topk, batch_size=args.batch_size,
                     progress=not args.no_progress, skip_bad=args.skip_bad)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images with a checkpoint: top-k names and probabilities")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (searched recursively)")
    p.add_argument("--checkpoint", "-c", required=True, help="a .pth checkpoint or .safetensors export with class names")
    p.add_argument("--topk", "-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", "-b", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--non-strict", action="store_true",
                   help="load the weights that fit and report the rest, instead of refusing a mismatched checkpoint")
    p.set_defaults(func=run)
