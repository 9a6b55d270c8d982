"""Count the casts bf16 autocast makes in one training step, per model, by the op that asked for them.

The count does not depend on the CPU (autocast decides, not the kernels), so it can be read on a
machine without native bf16, where bf16 times mean nothing. One step (forward, cross-entropy,
backward, fused AdamW) runs first to warm up; the second runs under ``torch.profiler`` and every
``aten::_to_copy`` is attributed to its nearest parent op that is not a cast.

    python benchmarks/autocast_casts.py                         # Pale-T and Swin-T, 224x224, batch 4
    python benchmarks/autocast_casts.py --models pale_small --batch-size 2 --img-size 256
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import pale  # noqa: F401  (registers the Pale models with timm)

CAST_OPS = ("aten::to", "aten::_to_copy")


def casts_per_parent(model_name: str, img_size: int, batch_size: int) -> Dict[str, List[int]]:
    """``{parent op and cast tensor rank: [casts, elements]}`` for one bf16-autocast training step."""
    model = timm.create_model(model_name, num_classes=10)
    images = torch.randn(batch_size, 3, img_size, img_size)
    targets = torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up (and the attention kernels' measurement)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    counts: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for event in prof.events():
        if event.name != "aten::_to_copy":
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name in CAST_OPS:
            parent = parent.cpu_parent
        shape = event.input_shapes[0] if event.input_shapes else []
        key = f"{parent.name if parent is not None else '<top level>'} ({len(shape)}-d)"
        counts[key][0] += 1
        counts[key][1] += math.prod(shape)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pale_tiny", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top", type=int, default=8, help="parent ops listed per model")
    args = parser.parse_args()
    for name in args.models:
        counts = casts_per_parent(name, args.img_size, args.batch_size)
        total: Tuple[int, int] = (sum(c for c, _ in counts.values()), sum(n for _, n in counts.values()))
        print(f"{name}, {args.img_size}x{args.img_size}, batch {args.batch_size}: "
              f"{total[0]} casts, {total[1] / 1e6:.1f}M elements")
        for key, (calls, elements) in sorted(counts.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {key:55s} {calls:6d} casts {elements / 1e6:8.2f}M elements")


if __name__ == "__main__":
    main()
