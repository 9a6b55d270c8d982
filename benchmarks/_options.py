"""Options the benchmark scripts share: the Pale model and its peer, the batch, the input side, the rounds."""
from __future__ import annotations

import argparse


def add_model_pair_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--baseline``, ``--batch-size``, ``--img-size``, ``--rounds``, ``--mode``."""
    parser.add_argument("--model", default="pale_tiny")
    parser.add_argument("--baseline", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
