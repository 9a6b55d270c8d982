"""Does choosing the attention kernel by measurement make Pale-T faster or slower than one fixed kernel?

Times, round-robin in one process, the same Pale-T inference batch and training step (``pale.bench.Runner``:
forward, cross-entropy, backward, AdamW) with the attention kernel chosen by measurement (``auto``, what
``pale train`` uses) and with each fixed kernel (``flash`` was the only one before the choice existed),
next to Swin-T, per dtype. The first (untimed) pass of ``auto`` measures the kernels.

    python benchmarks/kernel_choice.py                          # fp32, batch 16, 224x224
    python benchmarks/kernel_choice.py --dtype fp32 bf16        # bf16 only where the CPU has it natively

``x fixed`` is the per-round median of (time with that kernel fixed) / (time with ``auto``): above 1,
the choice is faster. ``x Swin-T`` is Swin-T's time over Pale-T's, as in ``pale bench``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

from _options import add_model_pair_options
from pale.bench import Runner, Setting, machine_info
from pale.models.attention_kernels import CANDIDATES, use_kernel


def _timed(fn: Callable[[], None], kernel: str) -> float:
    with use_kernel(kernel):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def _median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_pair_options(parser)
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--kernels", nargs="+", choices=CANDIDATES["cpu"], default=list(CANDIDATES["cpu"]),
                        help="fixed kernels to compare with auto (default: all)")
    args = parser.parse_args()

    import torch

    info = machine_info()
    dtypes = [d for d in args.dtype if d != "bf16" or info["native_bf16"]]
    print(f"machine: {info['cpu']}, {torch.get_num_threads()} threads, torch {info['torch']}, "
          f"{info['cpu_capability']}, native bf16: {'yes' if info['native_bf16'] else 'no (bf16 skipped: emulated)'}")
    print(f"{args.model} vs {args.baseline}, batch {args.batch_size}, {args.img_size}x{args.img_size}, "
          f"{args.rounds} rounds (medians in seconds)")
    print(f"{'dtype':5} {'mode':5} {'kernel':9} {'s':>7} {'x fixed':>8} {'x Swin-T':>9}")
    size = (args.img_size, args.img_size)
    for dtype in dtypes:
        for mode in args.mode:
            pale_run = Runner(Setting(args.model, size, args.batch_size, dtype), mode)
            base_run = Runner(Setting(args.baseline, size, args.batch_size, dtype), mode)
            variants = ["auto"] + list(args.kernels)
            for kernel in variants:  # warm-up; auto measures its kernels here
                _timed(pale_run, kernel)
            base_run()
            times: Dict[str, List[float]] = {k: [] for k in variants + ["baseline"]}
            for _ in range(args.rounds):
                for kernel in variants:
                    times[kernel].append(_timed(pale_run, kernel))
                start = time.perf_counter()
                base_run()
                times["baseline"].append(time.perf_counter() - start)
            for kernel in variants:
                vs_auto = _median([f / a for f, a in zip(times[kernel], times["auto"])])
                vs_base = _median([b / p for p, b in zip(times[kernel], times["baseline"])])
                print(f"{dtype:5} {mode:5} {kernel:9} {_median(times[kernel]):7.3f} "
                      f"{'' if kernel == 'auto' else f'{vs_auto:.2f}':>8} {vs_base:9.2f}")
            print(f"{dtype:5} {mode:5} {'Swin-T':9} {_median(times['baseline']):7.3f}")


if __name__ == "__main__":
    main()
