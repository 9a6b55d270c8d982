"""``pale visualize receptive-field | attention``: pictures of what PS-attention looks at."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._options import add_checkpoint, add_device, add_weights, nonnegative_int, positive_int


#: Largest map side of ``visualize receptive-field`` (a diagram of single tokens; Pale-T's largest map,
#: stage 1 at 224x224, is 56x56); 128x128 takes ~25 s and 2 GB, the float64 gradient of every mode.
MAX_RF_SIDE = 128
#: Largest side of its picture, in pixels.
MAX_RF_PIXELS = 16384


def run_receptive_field(args: argparse.Namespace) -> int:
    from .. import ATTN_MODES, create_attention
    from ..checkpoint import create_model_from_file, describe_weights
    from ..device import resolve_device
    from ..files import atomic_save_image
    from ..images import load_image
    from ..errors import InputError, settings_error
    from ..visualize import RFLayout, receptive_field, render_receptive_fields

    h, w = args.size
    if max(h, w) > MAX_RF_SIDE:
        raise InputError(f"--size {h} {w}: at most {MAX_RF_SIDE} tokens per side (Pale-T's largest map is 56x56)")
    token = tuple(args.token) if args.token else (h // 2, w // 2)
    modes = args.mode or list(ATTN_MODES)
    pixels = RFLayout(len(modes), h, w, args.cell).size
    if max(pixels) > MAX_RF_PIXELS:
        fits = next(c for c in range(args.cell, 0, -1) if max(RFLayout(len(modes), h, w, c).size) <= MAX_RF_PIXELS)
        raise InputError(f"--cell {args.cell} makes a {pixels[1]}x{pixels[0]} px picture (at most {MAX_RF_PIXELS} "
                         f"per side); use --cell {fits} or less, fewer --mode, or a smaller --size")

    fields = {}
    for mode in modes:
        with settings_error(f"--dim {args.dim} --heads {args.heads} ({mode})"):
            layer = create_attention(args.dim, args.heads, pale_size=args.pale_size, mode=mode,
                                     direction=args.direction if mode == "sequential" else None,
                                     stripe_width=args.stripe_width)
        label = f"{mode} ({args.direction})" if mode == "sequential" else mode
        fields[label] = receptive_field(layer, (h, w), token)
    picture = render_receptive_fields(fields, token, cell=args.cell)
    out = Path(args.output)
    atomic_save_image(picture, out)
    print(f"wrote {out} ({picture.shape[1]}x{picture.shape[0]} px): token {token} on a {h}x{w} map, "
          f"pale size {args.pale_size}, stripe width {args.stripe_width}, modes {', '.join(fields)}")
    for label, branches in fields.items():
        counts = ", ".join(f"{name} {int(m.sum())}" for name, m in branches.items())
        union = int(sum(m.astype(int) for m in branches.values()).astype(bool).sum())
        print(f"  {label:<22} tokens reached: {union:>4}  ({counts})")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..checkpoint import create_model_from_file, describe_weights
    from ..device import resolve_device
    from ..files import atomic_save_image
    from ..images import load_image
    from ..errors import InputError
    from ..predict import resolve_preprocessing
    from ..visualize import render_attention_overlay, stage_attention

    img = load_image(args.image)  # checked before the model is built
    device = resolve_device(args.device)
    model, info = create_model_from_file(args.checkpoint, weights=args.weights)
    print(describe_weights(info), file=sys.stderr)
    cfg = resolve_preprocessing(info, model)
    if cfg["input_size"][0] == 1:
        img = img.convert("L")
    iw, ih = img.size
    ty, tx = args.token
    if not (0 <= ty < ih and 0 <= tx < iw):
        raise InputError(f"--token {ty} {tx} is outside the {ih}x{iw} image {args.image}")
    # The whole image, shorter side resized to the model's input size (no crop), normalised.
    short = args.short_side or min(cfg["input_size"][1:])
    scale = short / min(ih, iw)
    rh, rw = max(round(ih * scale), 3), max(round(iw * scale), 3)
    from PIL import Image
    resized = img.resize((rw, rh), Image.BICUBIC)
    arr = np.asarray(resized, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    x = (torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(cfg["mean"]).view(-1, 1, 1)) \
        / torch.tensor(cfg["std"]).view(-1, 1, 1)
    maps = stage_attention(model.to(device), x[None].to(device), (ty * rh / ih, tx * rw / iw), block=args.block)
    out = Path(args.output)
    size = render_attention_overlay(np.asarray(img), maps, (ty, tx), out,
                                    title=f"{Path(args.image).name}: attention of pixel ({ty}, {tx}), head average")
    print(f"wrote {out} ({size[1]}x{size[0]} px); model input {rh}x{rw}")
    for m in maps:
        print(f"  stage {m.stage + 1} block {m.block + 1}: grid {m.weights.shape[0]}x{m.weights.shape[1]}, "
              f"token {m.grid_token}, attends to {int((m.weights > 0).sum())} tokens, max weight {m.weights.max():.3f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("visualize", help="pictures of PS-attention: receptive fields, attention maps")
    sub = p.add_subparsers(dest="action", metavar="WHAT", required=True)

    rf = sub.add_parser("receptive-field", help="tokens one attention layer reaches from a reference token, per mode")
    rf.add_argument("--mode", action="append", choices=["parallel", "sequential", "vanilla", "axial", "cross_shaped"],
                    help="mode to draw (repeatable; default all five side by side)")
    rf.add_argument("--size", type=positive_int, nargs=2, default=(12, 12), metavar=("H", "W"), help="map size (default 12 12)")
    rf.add_argument("--token", type=nonnegative_int, nargs=2, metavar=("Y", "X"), help="reference token (default the centre)")
    rf.add_argument("--pale-size", type=positive_int, default=3, help="pale size for parallel/sequential/vanilla (default 3)")
    rf.add_argument("--stripe-width", type=positive_int, default=3, help="stripe width for cross_shaped (default 3)")
    rf.add_argument("--direction", choices=["row", "column"], default="row", help="direction for sequential")
    rf.add_argument("--dim", type=positive_int, default=8, help="channels of the layer (default 8)")
    rf.add_argument("--heads", type=positive_int, default=2, help="heads of the layer (default 2)")
    rf.add_argument("--cell", type=positive_int, default=16, help="pixels per token (default 16)")
    rf.add_argument("--output", "-o", default="receptive_field.png")
    rf.set_defaults(func=run_receptive_field)

    at = sub.add_parser("attention", help="attention weights of one token in every stage, over the image")
    at.add_argument("image", help="an image file")
    add_checkpoint(at, "a .pth checkpoint or .safetensors export")
    add_weights(at)
    add_device(at)
    at.add_argument("--token", type=nonnegative_int, nargs=2, required=True, metavar=("Y", "X"), help="pixel of the image")
    at.add_argument("--block", type=int, default=-1, help="block of each stage (Python index, default -1 = last)")
    at.add_argument("--short-side", type=positive_int, help="model input's shorter side (default the checkpoint's input size)")
    at.add_argument("--output", "-o", default="attention.png")
    at.set_defaults(func=run_attention)
