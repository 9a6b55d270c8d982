"""How fast could a model be next to a peer if everything but its heavy kernels took no time?

For each model, in one process and round-robin, this times inference and the training step
(forward, cross-entropy, backward, AdamW) as `pale bench` runs them (``pale.bench.Runner``), then
profiles one run of each with ``torch.profiler`` and takes the share of self CPU time spent in the
"heavy" kernels: GEMMs (``addmm``, ``mm``, ``bmm``),
convolutions and their backward, and attention and its backward (SDPA's flash kernel, or the softmax
between the GEMMs of the math and explicit kernels, whichever ``pale.models.attention_kernels`` chose). Those kernels
already run near the machine's matmul peak (see docs/performance.md), so

    floor = measured time x heavy share

is what the model would take if every other op (GELU, norms, copies, adds, the optimizer) were
free. ``best ratio`` = baseline time / floor: no rewrite that keeps these kernels can make the model
faster than that next to the baseline.

    python benchmarks/kernel_floor.py                       # Pale-T against Swin-T, batch 16, 224x224
    python benchmarks/kernel_floor.py --rounds 7 --mode infer
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

from torch.profiler import ProfilerActivity, profile

from _options import add_model_pair_options
from pale.bench import Runner, Setting

HEAVY_KERNELS = (
    "aten::addmm", "aten::mm", "aten::bmm",
    "aten::mkldnn_convolution", "aten::convolution_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_softmax", "aten::_softmax_backward_data",
)


def heavy_share(fn: Callable[[], None]) -> float:
    """Fraction of self CPU time one call of ``fn`` spends in :data:`HEAVY_KERNELS`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in HEAVY_KERNELS) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_pair_options(parser)
    args = parser.parse_args()

    import torch

    names = [args.model, args.baseline]
    size = (args.img_size, args.img_size)
    print(f"{args.model} vs {args.baseline}, batch {args.batch_size}, {args.img_size}x{args.img_size}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'mode':6} {'model s':>8} {'heavy':>6} {'floor s':>8} {'base s':>7} {'base heavy':>10} "
          f"{'ratio':>6} {'best ratio':>10}")
    for mode in args.mode:
        # The same inference batch / training step (forward, cross-entropy, backward, AdamW) as `pale bench`.
        runners = {n: Runner(Setting(n, size, args.batch_size), mode) for n in names}
        for run in runners.values():  # warm-up
            run()
        times: Dict[str, List[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        share = {n: heavy_share(run) for n, run in runners.items()}
        median = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        per_round = sorted(b / m for m, b in zip(times[args.model], times[args.baseline]))
        floor = median[args.model] * share[args.model]
        print(f"{mode:6} {median[args.model]:8.3f} {share[args.model]:6.0%} {floor:8.3f} "
              f"{median[args.baseline]:7.3f} {share[args.baseline]:10.0%} "
              f"{per_round[len(per_round) // 2]:6.2f} {median[args.baseline] / floor:10.2f}")


if __name__ == "__main__":
    main()
