"""Property-based tests (hypothesis) over random sizes, pale sizes, head counts and modes."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pale import ATTN_MODES, create_attention
from pale.models.pale_transformer import PaleTransformer
from reference import reference_attention

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_cases(draw):
    mode = draw(st.sampled_from(ATTN_MODES))
    heads = draw(st.sampled_from([2, 4]))
    dim = heads * draw(st.sampled_from([2, 4]))
    pale = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    h, w = draw(st.integers(1, 15)), draw(st.integers(1, 15))
    if mode == "vanilla":  # vanilla needs no more pales than rows and columns
        n = max(-(-h // pale[0]), -(-w // pale[1]))
        if n > min(h, w):
            pale = (h, w)
    direction = draw(st.sampled_from(["row", "column"])) if mode == "sequential" else None
    return mode, dim, heads, pale, (h, w), direction


def _build(mode, dim, heads, pale, direction):
    return create_attention(dim, heads, pale, mode=mode, direction=direction, stripe_width=pale[0]).double().eval()


@SETTINGS
@given(layer_cases(), st.integers(1, 3))
def test_layer_shape_finite_deterministic_and_equal_to_reference(case, batch):
    mode, dim, heads, pale, (h, w), direction = case
    layer = _build(mode, dim, heads, pale, direction)
    x = torch.randn(batch, h, w, dim, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert torch.equal(out, layer(x))
        torch.testing.assert_close(out, reference_attention(layer, x), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(layer_cases())
def test_layer_batch_independence(case):
    mode, dim, heads, pale, (h, w), direction = case
    layer = _build(mode, dim, heads, pale, direction)
    x = torch.randn(3, h, w, dim, dtype=torch.float64)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(st.integers(3, 70), st.integers(3, 70), st.sampled_from(["parallel", "cross_shaped", "sequential"]),
       st.integers(1, 7))
def test_model_any_size(h, w, mode, pale):
    torch.manual_seed(0)
    model = PaleTransformer(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 2), num_heads=(2, 2, 2, 4),
                            num_classes=3, attn_mode=mode, pale_size=pale, stripe_width=pale).eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        assert torch.equal(out, model(x))
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-4, atol=1e-5)
