"""``pale bench``: images/s, latency, training-step speed, achieved GFLOP/s and peak memory of Pale
models next to timm peers, measured round-robin in one process (see :mod:`pale.bench`), on the GPU
where there is one (``--device``).

bf16 on a CPU without native bf16 instructions (or a GPU without bf16 units) is emulated: such rows
say "emulated" and are not bf16 speed. The attention kernel of each stage is timed by
benchmarks/kernel_choice.py."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Tuple

from ..errors import InputError
from ._options import positive_int

DEFAULT_MODELS = ["pale_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny", "deit_small_patch16_224"]


def _size(text: str) -> Tuple[int, int]:
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 3:  # the Pale stem (7x7, stride 4) needs 3x3
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with sides >= 3, got {text!r}")
    return size  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="speed and memory of Pale models next to timm peers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="MODEL",
                   help="timm model names (default: %(default)s)")
    p.add_argument("--img-size", nargs="+", type=_size, default=[(224, 224)], metavar="N|HxW",
                   help="input sizes, e.g. 224 448 896 or 512x1024 (default: 224)")
    p.add_argument("--batch-size", nargs="+", type=int, default=[16], metavar="B", help="batch sizes (default: 16)")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="fp32, or bf16 autocast (default: fp32)")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                   help="torch.compile the models; 'both' times eager and compiled in the same rounds")
    p.add_argument("--grad-checkpointing", choices=["no", "yes", "both"], default="no",
                   help="gradient checkpointing in the training step; 'both' times it on and off in the same rounds")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the models and inputs live: auto (cuda if available), cpu or cuda (default: auto)")
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"],
                   help="inference and/or training step (default: both)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes per model (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (default: 5)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--baseline", default="swin_tiny_patch4_window7_224",
                   help="model the ratio columns divide by (default: %(default)s; '' for none)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", "-o", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="also print the results as JSON (the older --json FILE writes FILE, as -o does)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import (check_model_name, checkpointing_summary, compile_summary, format_table, machine_info,
                         machine_peaks, resolve_device, run_benchmark, to_json)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 1 or args.repeats < 1:
        raise InputError(f"--warmup and --repeats must be >= 1, got {args.warmup} and {args.repeats}")
    if any(b < 1 for b in args.batch_size):
        raise InputError(f"batch sizes must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    for name in args.models:  # before the peaks and the models are measured, which takes a while
        check_model_name(name)
    log = (lambda s: None) if args.quiet else (lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    info = machine_info(device)
    log(f"on {device}: {info['device_name']}; {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"load average {info['loadavg']}")
    bf16_note = ("native bf16: yes" if not info["bf16_emulated"] else
                 f"native bf16: no (bf16 is emulated on this {'GPU' if device == 'cuda' else 'CPU'}: "
                 "its figures are not bf16 speed)")
    log(f"measuring the {device}'s matmul and 1x1-convolution peaks")
    peaks = machine_peaks(device=device)
    compile_modes: List[bool] = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    checkpointing: List[bool] = {"no": [False], "yes": [True], "both": [False, True]}[args.grad_checkpointing]
    baseline = args.baseline if args.baseline in args.models else None
    results = run_benchmark(args.models, args.img_size, args.batch_size, args.dtype, compile_modes, args.mode,
                            warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory,
                            peaks=peaks, checkpointing=checkpointing, log=log, device=device)
    info["loadavg_end"] = list(__import__("os").getloadavg())
    print(f"device: {device}, {info['device_name']}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
          f"torch {info['torch']}, load average {info['loadavg'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    print(f"instruction set: {info['cpu_capability']}; {bf16_note}")
    print("peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(format_table(results, baseline))
    for line in checkpointing_summary(results) + compile_summary(results):
        print(line)
    print("GFLOP/s = 2 x measured forward multiply-adds x inference images/s; % peak = of matmul peak in the "
          "same dtype. MiB = " + ("peak CUDA memory allocated" if device == "cuda" else "RSS high-water") +
          " growth over the built model, one process per model and mode.")
    if args.json or args.output:
        _emit_json(args, to_json(results, peaks, info, sys.argv))
    return 0


def _emit_json(args: argparse.Namespace, doc: dict) -> None:
    """Write ``doc`` to ``-o FILE`` and print it for ``--json`` (or write it to the ``--json FILE`` of old)."""
    from ..files import atomic_write_json

    for path in (args.output, None if args.json == "-" else args.json):
        if path:
            atomic_write_json(path, doc)
    if args.json == "-":
        print(json.dumps(doc, indent=2))
