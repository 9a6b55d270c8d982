"""torch.compile on Pale: one full graph, equal outputs, and no recompilation per call when the input
size changes between two sizes."""
from __future__ import annotations

import pytest
import torch

from pale.models.pale_transformer import PaleBlock, PaleTransformer


def tiny_model(**kwargs) -> PaleTransformer:
    torch.manual_seed(0)
    return PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                           pale_size=3, num_classes=5, **kwargs).eval()


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def test_block_compiles_once_per_size_class():
    # One block keeps dynamo's tracing time small; 10x9 needs padding for pale size 3, 12x6 does not.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PaleBlock(16, 2, 3).eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    a, b = torch.randn(2, 10, 9, 16), torch.randn(2, 12, 6, 16)
    with torch.no_grad():
        for x in (a, b, a, b, a, b):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # The first size compiles a static graph, the second one dynamic graph; later calls reuse them.
    assert 1 <= backend.graphs <= 2


def test_block_backward_compiled_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PaleBlock(16, 2, 3).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 9, 9, 16)
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_full_model_two_sizes_no_recompile_per_call():
    torch._dynamo.reset()
    model = tiny_model()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        for x in (a, b, a, b):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert 1 <= backend.graphs <= 2


@pytest.mark.slow
def test_inductor_matches_eager_on_two_sizes():
    torch._dynamo.reset()
    model = tiny_model()
    compiled = torch.compile(model)
    with torch.no_grad():
        for x in (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 80), torch.randn(2, 3, 64, 64)):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


class AttentionCallsBackend(CountingBackend):
    """Counts the graphs and, in them, the SDPA calls with and without a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.masked = self.unmasked = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.nn.functional.scaled_dot_product_attention:
                masked = node.kwargs.get("attn_mask") is not None or len(node.args) > 3
                self.masked += masked
                self.unmasked += not masked
        return super().__call__(gm, example_inputs)


@pytest.mark.parametrize("size, masked, unmasked", [((9, 9), 0, 1), ((10, 9), 1, 1)])
def test_compiled_block_takes_the_eager_attention_path(size, masked, unmasked):
    # As in eager: a square map that needs no padding is one unmasked call over both branches; at 10x9
    # the rows pad to 12 (masked) and the 9 columns need none. The export-only path (always padded and
    # masked) must stay out of torch.compile: before PyTorch 2.14 is_exporting() read True there too.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PaleBlock(16, 2, 3).eval()
    backend = AttentionCallsBackend()
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend, fullgraph=True)(x), model(x))
    assert (backend.graphs, backend.masked, backend.unmasked) == (1, masked, unmasked)
