"""``pale info MODEL``: parameters and multiply-adds per stage and in total."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from ..complexity import ModelCost, measure_cost


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_cost(name: str, cost: ModelCost, settings: Dict[str, Any]) -> str:
    h, w = cost.img_size
    lines = [f"{name}  input 3x{h}x{w}  " + "  ".join(f"{k}={v}" for k, v in settings.items()),
             f"{'part':<12}{'params':>12}{'MACs':>12}"]
    for part, params in cost.params_by_part.items():
        lines.append(f"{part:<12}{_human(params):>12}{_human(cost.macs_by_part.get(part, 0)):>12}")
    lines.append(f"{'total':<12}{_human(cost.params):>12}{_human(cost.macs):>12}")
    return "\n".join(lines)


def model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Model overrides given on the command line."""
    kwargs: Dict[str, Any] = {}
    for key in ("attn_mode", "pos_embed", "pale_size"):
        value = getattr(args, key, None)
        if value is not None:
            kwargs[key] = value
    return kwargs


def run(args: argparse.Namespace) -> int:
    import timm

    import pale  # noqa: F401  (registers the models)

    kwargs = model_kwargs(args)
    img_size = tuple(args.img_size) if args.img_size else (224, 224)
    model = timm.create_model(args.model, **kwargs)
    cost = measure_cost(model, img_size)
    if args.json:
        print(json.dumps(dict(model=args.model, settings=kwargs, img_size=list(img_size), params=cost.params,
                              macs=cost.macs, params_by_part=cost.params_by_part,
                              macs_by_part=cost.macs_by_part), indent=2))
    else:
        print(format_cost(args.model, cost, kwargs))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="parameters and multiply-adds of a model, per stage and in total")
    p.add_argument("model", help="a timm model name, e.g. pale_tiny")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default 224 224)")
    p.add_argument("--attn-mode", help="attention mode (parallel, sequential, vanilla, axial, cross_shaped)")
    p.add_argument("--pos-embed", help="position encoding (cpe, ape, none)")
    p.add_argument("--pale-size", type=int, help="pale size for every stage")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
