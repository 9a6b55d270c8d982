"""Re-derive the attention kernel rule on this machine: every kernel timed at a Pale model's stage shapes.

One forward of the model (``--model``, ``--img-size``, ``--batch-size``) records the shape of every
attention call per stage, and whether it carries a padding mask (sizes the pale size does not divide
do). Each distinct call is then timed with every kernel that can be forced (``flash``, ``math``,
``explicit``; on CUDA also ``efficient``, ``cudnn`` and ``sdpa``, SDPA's own dispatch, the rule's CUDA
choice), per dtype (bf16 under autocast, as the model runs it) and mode (forward; forward and
backward of q, k and v for training), round-robin so that load from other processes falls on all
alike, best of ``--rounds``. The table prints each kernel's milliseconds, the rule's pick
(:func:`pale.models.attention_kernels.choose_kernel`) and ``SLOWER`` where the pick is more than 10%
slower than the fastest kernel: where the rule should change for this machine.

    python benchmarks/kernel_choice.py                                  # Pale-T, 224x224, batch 8, fp32 and bf16
    python benchmarks/kernel_choice.py --img-size 200 --dtype bf16      # padded groups: masked calls
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Tuple

import torch

from pale.bench import machine_info
from pale.models import attention_kernels as ak

Call = Tuple[int, Tuple[int, int, int, int], Optional[torch.Tensor]]  # stage, (N, heads, L, D), key mask
SLOWER = 1.10


def stage_calls(model_name: str, img_size: int, batch_size: int, device: str) -> List[Call]:
    """The distinct attention calls of one forward, in order: (stage, q shape, key mask)."""
    import timm

    import pale  # noqa: F401  (registers the models)

    model = timm.create_model(model_name).to(device).eval()
    if not hasattr(model, "stages"):
        raise SystemExit(f"{model_name} has no stages: this script is for Pale models")
    calls: Dict[Tuple[int, Tuple[int, ...], bool], Call] = {}
    stage = [0]
    hooks = [s.register_forward_pre_hook(lambda *_, i=i: stage.__setitem__(0, i + 1)) for i, s in enumerate(model.stages)]
    real = ak.kernel_for

    def record(q, k, v, key_mask=None):
        calls.setdefault((stage[0], tuple(q.shape), key_mask is not None), (stage[0], tuple(q.shape), key_mask))
        return real(q, k, v, key_mask)
    ak.kernel_for = record
    try:
        with torch.no_grad():
            model(torch.randn(batch_size, 3, img_size, img_size, device=device))
    finally:
        ak.kernel_for = real
        for h in hooks:
            h.remove()
    return list(calls.values())


def kernels_for(device: str) -> List[str]:
    return (["sdpa"] if device == "cuda" else []) + list(ak.CANDIDATES[device])


def time_kernels(call: Call, dtype: torch.dtype, train: bool, device: str, rounds: int) -> Tuple[Dict[str, float], str]:
    """Best milliseconds per kernel over ``rounds`` round-robin rounds, and the rule's pick."""
    _, shape, mask = call
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_(train) for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run(name: str) -> float:
        with ak.use_kernel("auto" if name == "sdpa" else name), torch.autocast(**autocast):
            sync()
            start = time.perf_counter()
            out = ak.attention(q, k, v, mask)
            if train:
                torch.autograd.grad(out, (q, k, v), dout)
            sync()
            return 1000 * (time.perf_counter() - start)

    with ak.use_kernel("auto"), torch.autocast(**autocast):
        pick = ak.kernel_for(q, k, v, mask)
    names = kernels_for(device)
    for name in names:  # warm-up
        run(name)
    best = {name: float("inf") for name in names}
    for _ in range(rounds):
        for name in names:
            best[name] = min(best[name], run(name))
    return best, pick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pale_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")

    info = machine_info(args.device)
    dtypes = [d for d in args.dtype if d != "bf16" or not info["bf16_emulated"]]
    print(f"device: {args.device}, {info['device_name']}; {info['cpu_capability']}, {torch.get_num_threads()} threads, "
          f"torch {info['torch']}" + ("" if dtypes == args.dtype else "; bf16 skipped: emulated here"))
    print(f"{args.model}, {args.img_size}x{args.img_size}, batch {args.batch_size}: best of {args.rounds} rounds, ms "
          f"(forward; training: forward and backward)")
    names = kernels_for(args.device)
    header = ["stage", "mode", "dtype", "N x heads x L x D", "mask"] + names + ["rule", ""]
    rows = [header]
    calls = stage_calls(args.model, args.img_size, args.batch_size, args.device)
    for dtype in dtypes:
        for mode in args.mode:
            for call in calls:
                times, pick = time_kernels(call, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                                           mode == "train", args.device, args.rounds)
                flag = "SLOWER" if times[pick] > SLOWER * min(times.values()) else ""
                rows.append([str(call[0]), mode, dtype, "x".join(map(str, call[1])), "yes" if call[2] is not None else "no"]
                            + [f"{times[n]:.2f}" for n in names] + [pick, flag])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("-" * sum(w + 2 for w in widths))
    print(f"rule: pale.models.attention_kernels.choose_kernel; SLOWER: its pick is over {SLOWER:.2f}x the fastest")


if __name__ == "__main__":
    main()
