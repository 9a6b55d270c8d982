"""Adding an attention mode touches one module: a toy sixth mode, global attention (one group of all
tokens, the attention of the paper's Eq. 4), registered here, built into a Pale Transformer, counted
by pale.complexity (analytic and measured), visualised, then unregistered."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from pale import ATTN_MODES, PaleTransformer, create_attention
from pale.cli import main
from pale.complexity import PaleConfig, analytic_cost, attention_matmul_macs, measure_cost
from pale.models import (AttentionMode, GroupedAttention, attention_mode, register_attention_mode,
                         unregister_attention_mode)
from pale.models.pale_transformer import merge_heads, split_heads
from pale.visualize import receptive_field, stage_attention, token_attention
from reference import masked_attention

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2), num_classes=3)


class GlobalAttention(GroupedAttention):
    """Every token attends to every token of the map: one group, no padding."""

    def group(self, branch, q, k, v):
        b, h, w, c = q.shape
        return tuple(split_heads(t.reshape(b, h * w, c), self.num_heads) for t in (q, k, v)) + (None,)

    def ungroup(self, branch, out, like):
        return merge_heads(out).view(*like.shape[:3], -1)


def global_macs(layout, h, w, c, padded):
    return 2 * c * (h * w) ** 2          # q.k and attention.v over all hw tokens (Eq. 4's second term)


@pytest.fixture
def global_mode():
    mode = register_attention_mode(AttentionMode("global", GlobalAttention, lambda pale_size, stripe_width: (1, 1),
                                                 global_macs))
    try:
        yield mode
    finally:
        unregister_attention_mode("global")
    assert "global" not in ATTN_MODES


def test_a_registered_mode_is_built_counted_and_visualised(global_mode, tmp_path, capsys):
    assert ATTN_MODES[-1] == "global" and attention_mode("global") is global_mode
    torch.manual_seed(0)
    # the layer: dense attention over the whole map
    layer = create_attention(16, 4, mode="global").double().eval()
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = layer.q(x), layer.k(x), layer.v(x)
        want = layer.proj(masked_attention(q, k, v, torch.ones(35, 35, dtype=torch.bool), 4))
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)

    # the model, fused and explicit paths
    model = PaleTransformer(**TINY, attn_mode="global").eval()
    assert all(type(b.attn) is GlobalAttention for s in model.stages for b in s.blocks)
    image = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        assert model(image).shape == (1, 3)

    # pale.complexity: the analytic count (from the registered cost) equals the measured one
    cfg = PaleConfig.from_kwargs(**TINY, attn_mode="global")
    for size in ((64, 64), (45, 61)):
        assert analytic_cost(cfg, size).macs == measure_cost(model, size).macs
    assert attention_matmul_macs("global", 14, 14, 64, (1, 1)) == 2 * 64 * 196 ** 2

    # pictures: every token reached, weights summing to one over the whole map, a PNG per mode
    field = receptive_field(create_attention(8, 2, mode="global"), (5, 7), (2, 3))
    assert list(field) == ["all"] and field["all"].all()
    weights = token_attention(layer, x, (4, 6))
    assert weights.shape == (4, 5, 7) and (weights > 0).all()
    torch.testing.assert_close(weights.sum((1, 2)), torch.ones(4, dtype=torch.float64))
    maps = stage_attention(model, image, token=(20, 30))
    assert [m.mode for m in maps] == ["global"] * 4 and all((m.weights > 0).all() for m in maps)
    out = tmp_path / "rf.png"
    assert main(["visualize", "receptive-field", "--mode", "global", "--mode", "parallel", "--size", "5", "7",
                 "-o", str(out)]) == 0
    assert "global                 tokens reached:   35  (all 35)" in capsys.readouterr().out
    assert Image.open(out).size[0] > 2 * 7 * 16


def test_unregistered_and_duplicate_modes_are_refused(global_mode):
    with pytest.raises(ValueError, match="attention mode 'global' is already registered"):
        register_attention_mode(global_mode)
    unregister_attention_mode("global")
    try:
        with pytest.raises(ValueError, match="unknown attention mode 'global'; expected one of parallel, axial"):
            PaleTransformer(**TINY, attn_mode="global")
    finally:
        register_attention_mode(global_mode)   # for the fixture to remove


def test_a_layer_class_refuses_another_classes_mode():
    from pale import PSAttention
    from pale.models.pale_transformer import attention_layout
    with pytest.raises(ValueError, match="mode 'vanilla' is computed by VanillaPSAttention, not PSAttention"):
        PSAttention(16, 2, attention_layout("vanilla"))
