"""What the demo's deep stem costs: the training step of the ``demo_digits`` model as shipped (28x28 digits
through ``stem_type="deep"``) against the same model with the paper's 7x7 stride-4 stem on 56x56 digits
(the demo recipe's earlier stem).

Times, round-robin in one process with one torch thread (as ``pale demo`` trains beside its loader), a
forward, cross-entropy, backward and fused AdamW step at the recipe's batch, with the recipe's attention
kernel:

    python benchmarks/demo_stem.py               # batch 64, 8 rounds
    python benchmarks/demo_stem.py --rounds 20

``x`` is the per-round median of (deep stem's time) / (7x7 stem's time).
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round and model")
    args = parser.parse_args()

    import timm
    import torch

    from pale.bench import machine_info
    from pale.models.attention_kernels import use_kernel
    from pale.train.recipe import load_yaml, recipe_path

    torch.set_num_threads(1)
    recipe = load_yaml(recipe_path("demo_digits"))
    kwargs = dict(recipe["model"]["kwargs"], num_classes=10, drop_path_rate=recipe["model"]["drop_path_rate"])
    sizes = {"deep": recipe["data"]["img_size"], "overlap": 56}
    batch = int(recipe["batch_size"])
    info = machine_info()
    print(f"machine: {info['cpu']}, 1 thread, torch {info['torch']}, {info['cpu_capability']}; batch {batch}, "
          f"kernel {recipe['train']['attention_kernel']}, {args.rounds} rounds of {args.steps} steps")
    steps = {}
    for stem, side in sizes.items():
        torch.manual_seed(0)
        model = timm.create_model(recipe["model"]["name"], **dict(kwargs, stem_type=stem)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))

        def step(model=model, optimizer=optimizer, x=x, y=y) -> None:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[stem] = step
    times: Dict[str, List[float]] = {stem: [] for stem in steps}
    with use_kernel(recipe["train"]["attention_kernel"]):
        for stem in steps:  # warm-up
            steps[stem]()
        for _ in range(args.rounds):
            for stem, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[stem].append((time.perf_counter() - start) / args.steps)

    def median(values: List[float]) -> float:
        return sorted(values)[len(values) // 2]

    print(f"{'stem':8} {'input':>6} {'ms/step':>8} {'digits/s':>9}")
    for stem, side in sizes.items():
        print(f"{stem:8} {side:>4}px {median(times[stem]) * 1e3:8.0f} {batch / median(times[stem]):9.0f}")
    ratio = median([d / o for d, o in zip(times["deep"], times["overlap"])])
    print(f"x {ratio:.2f} (deep stem over the 7x7 stem)")


if __name__ == "__main__":
    main()
