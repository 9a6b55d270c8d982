"""Gradient checkpointing runs each block's forward twice per training step (forward, then the
recomputation in backward), never three times, and gives the same gradients."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from pale.models import attention_kernels as ak
from pale.models.pale_transformer import PaleBlock, PaleTransformer


def tiny() -> PaleTransformer:
    torch.manual_seed(0)
    return PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2),
                           pale_size=3, num_classes=5).train()


def block_forward_calls(model: PaleTransformer, x: torch.Tensor) -> Counter:
    calls: Counter = Counter()
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.update([name]))
               for name, m in model.named_modules() if isinstance(m, PaleBlock)]
    try:
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("enabled, expected", [(False, 1), (True, 2)])
def test_each_block_runs_once_or_twice_per_step(enabled, expected):
    model = tiny()
    model.set_grad_checkpointing(enabled)
    calls = block_forward_calls(model, torch.randn(2, 3, 48, 48))
    assert len(calls) == 5 and set(calls.values()) == {expected}, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointed_gradients_equal_plain_under_the_kernel_rule(dtype):
    # The recomputation in backward asks the rule again, under the same grad mode and autocast: it gets
    # the same kernel (flash in fp32, explicit in bf16), so the gradients are the same to the bit.
    x = torch.randn(2, 3, 48, 48)
    model = tiny()
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        with ak.use_kernel("auto"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(x).float().square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
