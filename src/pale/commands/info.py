"""``pale info MODEL``: parameters and multiply-adds per part and in total, measured and analytic;
``pale info --compare-paper``: one table of the paper's Tables 1-4 and 7-9 next to our analytic and
measured values (:mod:`pale.conformance`).

What is counted is chosen by ``--kind`` from :func:`model_kinds` (name -> :class:`ModelKind`). To add
a full model (a segmenter, a detector), add one entry: how to build it from a backbone name and
constructor overrides, its default input size, and, if it takes something other than one
``(1, 3, H, W)`` tensor, how to make its input.
"""
from __future__ import annotations

import argparse
import json
import functools
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from ._options import positive_int

if TYPE_CHECKING:
    import torch.nn as nn

    from ..complexity import AnalyticCost, ModelCost

Pair = Tuple[int, int]
#: ``--kind`` choices, known without importing torch (:func:`model_kinds` builds them on use)
KIND_HELP = {"classifier": "the ImageNet classifier (backbone + head)",
             "upernet": "UperNet + Pale (ADE20K's 150 classes), as the paper counts it",
             "maskrcnn": "Mask R-CNN + Pale (COCO's 80 classes), as the paper counts it"}
#: ``--table`` choices (pale.conformance.TABLES, known without importing torch; a test checks they agree)
PAPER_TABLE_NAMES = ("1", "2", "3", "4", "7", "8", "9")


@dataclass(frozen=True)
class ModelKind:
    """How ``pale info`` builds and counts one kind of model."""

    build: Callable[[str, Dict[str, Any], Optional[str]], nn.Module]   # (backbone name, overrides, device) -> model
    default_img_size: Pair
    help: str
    # (backbone name, overrides, img_size) -> analytic cost; None if the kind has no analytic model.
    analytic: Optional[Callable[[str, Dict[str, Any], Pair], AnalyticCost]] = None
    # (img_size, device) -> model input; None for one (1, 3, H, W) zero tensor.
    make_input: Optional[Callable[[Pair, Any], Any]] = None
    # (backbone name, params, macs) -> a line comparing with the paper's numbers, or None.
    paper_note: Optional[Callable[[str, int, int], Optional[str]]] = None


def _build_classifier(name: str, overrides: Dict[str, Any], device: Optional[str] = None) -> nn.Module:
    import timm

    import pale  # noqa: F401  (registers the models)

    return timm.create_model(name, device=device, **overrides)


def _classifier_analytic(name: str, overrides: Dict[str, Any], img_size: Pair) -> AnalyticCost:
    from ..complexity import PaleConfig, analytic_cost

    return analytic_cost(PaleConfig.from_model_name(name, **overrides), img_size)


@functools.lru_cache(maxsize=None)
def model_kinds() -> Dict[str, ModelKind]:
    """What ``--kind`` counts: the classifier, and UperNet and Mask R-CNN from :mod:`pale.dense.cost`."""
    from ..dense.cost import dense_model_kinds, paper_note

    kinds = {"classifier": ModelKind(_build_classifier, (224, 224), KIND_HELP["classifier"],
                                     analytic=_classifier_analytic)}
    for name, kind in dense_model_kinds(ModelKind).items():
        kinds[name] = replace(kind, paper_note=functools.partial(paper_note, name))
    return kinds


def _human(n: Optional[float], digits: int = 2) -> str:
    if n is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"


def format_cost(name: str, cost: ModelCost, settings: Dict[str, Any],
                analytic: Optional[AnalyticCost] = None) -> str:
    """Per-part table: parameters, measured multiply-adds, and analytic ones when available."""
    h, w = cost.img_size
    header = f"{'part':<12}{'params':>12}{'MACs':>12}"
    if analytic is not None:
        header += f"{'analytic':>12}"
    lines = [f"{name}  input 3x{h}x{w}  " + "  ".join(f"{k}={v}" for k, v in settings.items()), header]
    analytic_parts = analytic.macs_by_part if analytic is not None else {}
    for part, params in cost.params_by_part.items():
        line = f"{part:<12}{_human(params):>12}{_human(cost.macs_by_part.get(part, 0)):>12}"
        if analytic is not None:
            line += f"{_human(analytic_parts.get(part, 0)):>12}"
        lines.append(line)
    total = f"{'total':<12}{_human(cost.params):>12}{_human(cost.macs):>12}"
    if analytic is not None:
        total += f"{_human(analytic.macs):>12}"
    lines.append(total)
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
    from ..complexity import measure_cost
    from ..errors import InputError, settings_error

    if args.compare_paper:
        from ..conformance import conformance_rows, format_conformance

        if args.model is not None:
            raise InputError(f"--compare-paper covers Pale-T/S/B and the paper's dense models itself; "
                             f"give no MODEL (got {args.model!r})")
        rows = conformance_rows(args.table or PAPER_TABLE_NAMES, measure=not args.no_measure)
        if args.json:
            print(json.dumps([dict(asdict(r), ratio=r.ratio, agrees=r.agrees) for r in rows], indent=2))
        else:
            print(format_conformance(rows))
        return 0
    if args.model is None:
        raise InputError("pale info needs a MODEL (e.g. pale_tiny), or --compare-paper")
    if not args.model.startswith("pale_"):
        raise InputError(f"pale info counts Pale models (pale_tiny, pale_small, pale_base), not {args.model!r}")
    kind = model_kinds()[args.kind]
    kwargs = model_kwargs(args)
    img_size = tuple(args.img_size) if args.img_size else kind.default_img_size
    with settings_error(f"{args.model} with {kwargs or 'its defaults'}"):
        analytic = kind.analytic(args.model, kwargs, img_size) if kind.analytic else None
        model = kind.build(args.model, kwargs, "meta" if args.meta else None)
    try:
        cost = measure_cost(model, img_size, make_input=kind.make_input)
    except NotImplementedError as err:  # before RuntimeError, its base class
        if not args.meta:
            raise
        # e.g. Mask R-CNN's RoI selection (torch.nonzero): its output shape depends on values
        raise InputError(f"--meta cannot count the {args.kind}: it runs an operator whose output shape depends on "
                         f"values, which the meta device does not have ({str(err).split('.')[0]}); "
                         f"run without --meta") from None
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "can't allocate memory" not in str(err) \
                and "out of memory" not in str(err).lower():  # the CPU and CUDA allocators' words
            raise
        raise InputError(f"counting {args.model} at {img_size[0]}x{img_size[1]} runs a forward pass that needs more "
                         f"memory than this machine has ({str(err).splitlines()[0][:120]}); add --meta to count "
                         f"from shapes alone") from None
    if args.json:
        out = dict(model=args.model, kind=args.kind, settings=kwargs, img_size=list(img_size),
                   params=cost.params, macs=cost.macs, params_by_part=cost.params_by_part,
                   macs_by_part=cost.macs_by_part)
        if analytic is not None:
            out.update(analytic_params=analytic.params, analytic_macs=analytic.macs,
                       analytic_macs_by_part=analytic.macs_by_part, paper_formula_macs=analytic.paper_macs)
        print(json.dumps(out, indent=2))
    else:
        print(format_cost(args.model, cost, kwargs, analytic))
        # The paper's full-model numbers are for the kind's default size only.
        at_paper_size = img_size == kind.default_img_size and not kwargs
        if kind.paper_note and at_paper_size and (note := kind.paper_note(args.model, cost.params, cost.macs)):
            print(note)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    description = ("Parameters and multiply-adds per part and in total: measured by counting a forward pass, and "
                   "from the analytic model of pale.complexity. --compare-paper prints the paper's Tables 1-4 and "
                   "7-9 next to both, with a reason for every value more than 2% off.")
    p = subparsers.add_parser("info", description=description, help="parameters and multiply-adds of a model "
                              "(measured and analytic), or the paper's tables")
    p.add_argument("model", nargs="?", help="a timm model name, e.g. pale_tiny")
    p.add_argument("--kind", default="classifier", choices=sorted(KIND_HELP),
                   help="which model around the backbone to count: " + "; ".join(
                       f"{name}: {text}" for name, text in sorted(KIND_HELP.items())))
    p.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"), help="input size (default: the kind's)")
    p.add_argument("--attn-mode", help="attention mode (one of pale.ATTN_MODES, e.g. parallel, vanilla)")
    p.add_argument("--pos-embed", help="position encoding (cpe, ape, none)")
    p.add_argument("--pale-size", type=positive_int, help="pale size for every stage")
    p.add_argument("--compare-paper", action="store_true",
                   help="one table, paper / analytic / measured: Table 1 (Pale-T/S/B), params and FLOPs of "
                        "Pale-T/S/B (Table 2), UperNet and Mask R-CNN (Tables 3, 4), and Tables 7-9 in all "
                        "three columns (ImageNet 224, ADE20K 512x2048, COCO 1280x800); models are counted on "
                        "the meta device")
    p.add_argument("--table", action="append", choices=PAPER_TABLE_NAMES,
                   help="with --compare-paper: only this table of the paper (repeatable)")
    p.add_argument("--no-measure", action="store_true",
                   help="with --compare-paper: analytic values only (the dense decoders are still measured once)")
    p.add_argument("--meta", action="store_true",
                   help="run the model on the meta device: the same counts from shapes alone, no memory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
