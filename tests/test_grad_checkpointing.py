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


def test_checkpointed_gradients_equal_plain_while_the_kernel_is_measured():
    # The first checkpointed step measures the attention kernels inside the checkpointed forward;
    # the timing's own graph must not disturb the checkpoint's recomputation.
    x = torch.randn(2, 3, 48, 48)
    model = tiny()
    with ak.use_kernel("flash"):
        model(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    ak.clear_kernel_choices()
    with ak.use_kernel("auto"), ak.recording() as calls:
        model(x).square().sum().backward()
    assert calls and {key.train for key, *_ in calls} == {True}
    assert ak.kernel_choices()["choices"]  # measured inside the checkpointed forward
    for n, p in model.named_parameters():  # another kernel may have been chosen: float32 rounding apart
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5, msg=n)
    ak.clear_kernel_choices()
