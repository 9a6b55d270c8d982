"""``pale export -c CHECKPOINT -o FILE [--format onnx|safetensors|timm]``: files for deployment; ``timm``
writes the model folder that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ._options import add_checkpoint, add_weights, positive_float, positive_int


FORMATS = {".onnx": "onnx", ".safetensors": "safetensors"}
#: Why ``--exporter legacy`` is kept (the dynamo exporter writes opset 18 or later only).
LEGACY_REASON = "the TorchScript trace (deprecated in PyTorch), for runtimes that need an ONNX opset below 18"


def output_format(output: Optional[str], fmt: Optional[str]) -> str:
    """The export format: ``--format``, or the one ``-o`` names (``.onnx``, ``.safetensors``, a folder:
    ending in ``/`` or existing, for ``timm``; ONNX without ``-o``). A name that contradicts ``--format``,
    or an unknown one without it, is refused."""
    folder = output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())
    named = "timm" if folder else FORMATS.get(Path(output).suffix.lower()) if output else None
    if fmt is None:
        if output is None:
            return "onnx"
        if named is None:
            raise InputError(f"cannot tell the format from -o {output}: name it .onnx or .safetensors, or a "
                             f"folder ending in / for a timm model folder, or pass --format onnx|safetensors|timm")
        return named
    if named is not None and named != fmt:
        what = "a folder" if folder else f"{'an' if named == 'onnx' else 'a'} {named} file"
        raise InputError(f"-o {output} names {what} but --format is {fmt}")
    return fmt


def run(args: argparse.Namespace) -> int:
    from .. import export as ex
    from ..checkpoint import describe_weights

    fmt = output_format(args.output, args.format)
    if fmt == "timm" and args.output:  # a bad target is refused before the model loads
        ex.timm_folder_target(args.output)
    model, info = ex.load_model_for_export(args.model, args.checkpoint, args.weights)
    name = info["model_name"]
    print(describe_weights(info), file=sys.stderr)
    if fmt == "timm":
        out = Path(args.output or name)
        cfg = ex.export_timm_folder(model, info, out)
        print(f"wrote {out}/ ({info['weights']} weights of {name}; config.json with {model.num_classes} classes, "
              f"crop_pct {cfg['crop_pct']:g} {cfg['crop_mode']}; model.safetensors): "
              f"timm.create_model(\"local-dir:{out}\", pretrained=True) after import pale")
        return 0
    out = Path(args.output) if args.output else Path(f"{name}.{fmt}")
    if fmt == "safetensors":
        ex.export_safetensors(model, info, out)
        print(f"wrote {out} ({info['weights']} weights of {name}; metadata: model_name, model_kwargs, class_names, "
              f"weights{', data_config' if info.get('data_config') else ''})")
        return 0

    from ..predict import resolve_preprocessing

    data_config = resolve_preprocessing(info, model)
    default_size = tuple(data_config["input_size"][1:])
    check_sizes = [tuple(s) for s in args.check_size] if args.check_size else [default_size, (97, 131), (33, 47)]
    meta = dict(model_name=name, model_kwargs=info.get("model_kwargs") or {},
                class_names=info.get("class_names"), weights=info.get("weights"),
                data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})
    result = ex.export_onnx(model, out, exporter=args.exporter, opset=args.opset,
                            trace_size=tuple(args.trace_size) if args.trace_size else default_size,
                            dynamic=not args.static, check_sizes=check_sizes, rtol=args.rtol, metadata=meta)
    trace_size, checks, worst = result.trace_size, result.checks, result.worst
    max_abs = max(c.max_abs_err for c in checks)
    if args.json:
        print(json.dumps(dict(output=str(out), exporter=result.exporter, opset=result.opset,
                              trace_size=list(trace_size), dynamic=not args.static,
                              proven_ranges=result.ranges, export_seconds=round(result.seconds, 2), max_abs_err=max_abs,
                              max_rel_err=worst.max_rel_err, checks=[c.as_dict() for c in checks]), indent=2))
        return 0
    if args.static:
        axes = f"fixed input {'x'.join(map(str, checks[0].shape))}"
    else:
        axes = "dynamic batch, height and width"
        if result.ranges:  # what torch.export proved
            axes += " (" + ", ".join(f"{k} {lo}..{hi or ''}" for k, (lo, hi) in result.ranges.items()) + ")"
    print(f"wrote {out} ({result.exporter} exporter, opset {result.opset}, {axes}; traced at "
          f"{trace_size[0]}x{trace_size[1]} in {result.seconds:.0f} s)")
    print("onnxruntime vs PyTorch:")
    print(f"  {'input':<20}{'max abs err':>14}{'max rel err':>14}")
    for c in checks:
        print(f"  {'x'.join(map(str, c.shape)):<20}{c.max_abs_err:>14.3g}{c.max_rel_err:>14.3g}")
    print(f"max abs error {max_abs:.3g}, max rel error {worst.max_rel_err:.3g} (allowed {args.rtol:g})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX (dynamic sizes, checked), safetensors weights "
                                             "or a timm model folder")
    p.add_argument("model", nargs="?", help="model name, e.g. pale_tiny: optional with a checkpoint that records it "
                   "(then it must match); without a checkpoint, the model with fresh weights")
    add_checkpoint(p, "a .pth checkpoint or .safetensors export", required=False)
    add_weights(p)
    p.add_argument("--format", "-f", choices=["onnx", "safetensors", "timm"], default=None,
                   help="default: from the -o name (.onnx, .safetensors, a folder for timm), onnx without -o; "
                        "timm: the folder "
                        "timm's save_for_hf writes (config.json with the class names and evaluation crop, "
                        "model.safetensors), for timm.create_model('local-dir:FOLDER', pretrained=True) or the Hub")
    p.add_argument("--output", "-o", metavar="FILE", help="output file (default MODEL.FORMAT), or folder for timm "
                   "(default MODEL; replaced whole if it is a timm model folder)")
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="ONNX exporter: dynamo (default; torch.onnx.export(dynamo=True), built on torch.export) or "
                        f"legacy: {LEGACY_REASON}")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset (default 18; dynamo writes 18 or later, legacy 20 or earlier)")
    p.add_argument("--static", action="store_true", help="fixed input size instead of dynamic batch/height/width")
    p.add_argument("--trace-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="example image size for the export (default: the model's input size)")
    p.add_argument("--check-size", type=positive_int, nargs=2, action="append", metavar=("H", "W"),
                   help="check onnxruntime against PyTorch at this size (repeatable; batches of 1, 2, 3, 1, ... "
                        "images; default: the model's input size, 97x131 and 33x47; the trace size is always checked)")
    p.add_argument("--rtol", type=positive_float, default=1e-4, help="largest allowed max|onnx-torch|/max|torch| (default 1e-4)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=run)
