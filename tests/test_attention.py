"""PS-attention and the ablation modes against dense masked references (tests/reference.py)."""
import pytest
import torch

from pale import ATTN_MODES, PSAttention, PaleTransformer, create_attention
from pale.models import GroupedAttention, attention_kernels
from reference import mode_masks, reference_attention

# (H, W, pale_size, heads): odd sizes, padding in one or both directions, a 1-row map, and 56x56.
CASES = [
    (9, 5, (3, 2), 2),
    (9, 5, (3, 2), 4),
    (8, 10, 3, 2),
    (8, 10, 3, 8),
    (1, 13, 7, 2),
    (13, 1, 7, 4),
    (7, 7, 7, 2),
    (56, 56, 7, 2),
    (56, 56, 7, 8),
]


def _layer(dim, heads, pale_size, **kw):
    layer = create_attention(dim, heads, pale_size, **kw).double().eval()
    # Random BatchNorm statistics, so the eval-mode projections are not the identity on stats.
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("h,w,pale_size,heads", CASES)
def test_parallel_matches_dense_reference(h, w, pale_size, heads):
    layer = _layer(16, heads, pale_size)
    x = torch.randn(2, h, w, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_attention(layer, x), rtol=1e-5, atol=1e-5)


MODE_CASES = [
    ("sequential", dict(direction="row")),
    ("sequential", dict(direction="column")),
    ("vanilla", {}),
    ("axial", {}),
    ("cross_shaped", dict(stripe_width=3)),
    ("cross_shaped", dict(stripe_width=7)),
]


@pytest.mark.parametrize("mode,kw", MODE_CASES)
@pytest.mark.parametrize("h,w,pale_size,heads", [(9, 5, (3, 2), 2), (8, 10, 3, 4), (14, 11, 3, 2), (7, 7, 7, 2)])
def test_modes_match_dense_reference(mode, kw, h, w, pale_size, heads):
    layer = _layer(16, heads, pale_size, mode=mode, **kw)
    x = torch.randn(2, h, w, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_attention(layer, x), rtol=1e-5, atol=1e-5)


def test_parallel_row_groups_are_interlaced():
    # The authors' example (PaddleViT issue #151): 9 rows, 3 per pale -> {0,3,6}, {1,4,7}, {2,5,8}.
    row_mask = mode_masks("parallel", 9, 1, (3, 3))[0]
    assert row_mask[0].nonzero().flatten().tolist() == [0, 3, 6]
    assert row_mask[4].nonzero().flatten().tolist() == [1, 4, 7]


def test_token_sees_only_its_pale():
    """Gradient of one output token reaches exactly the inputs its pale covers (through q/k/v's 3x3 convs)."""
    layer = _layer(8, 2, 3)
    x = torch.randn(1, 9, 9, 8, dtype=torch.float64, requires_grad=True)
    layer(x)[0, 4, 4].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    rows, cols = mode_masks("parallel", 9, 9, (3, 3))
    pale = (rows[4 * 9 + 4] | cols[4 * 9 + 4]).view(9, 9)
    # widen the pale by the 3x3 depthwise convolutions of q, k, v
    widened = torch.nn.functional.max_pool2d(pale.double()[None, None], 3, 1, 1)[0, 0] > 0
    assert touched.equal(widened)


@pytest.mark.parametrize("pale_size", [7, (7, 7), (3, 5)])
def test_pale_size_forms(pale_size):
    layer = create_attention(32, 4, pale_size)
    assert layer.group_size == ((pale_size, pale_size) if isinstance(pale_size, int) else tuple(pale_size))


def test_fp32_close_to_fp64():
    layer = _layer(32, 4, 7)
    x = torch.randn(2, 20, 17, 32, dtype=torch.float64)
    ref = layer(x)
    out = layer.float()(x.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, num_heads=4), "not divisible"),
    (dict(dim=24, num_heads=3), "must be even"),
    (dict(dim=0, num_heads=2), "positive"),
    (dict(dim=32, num_heads=4, pale_size=0), "pale_size must be >= 1"),
    (dict(dim=32, num_heads=4, pale_size=(7, 7, 7)), "pale_size must be an int or a pair"),
    (dict(dim=32, num_heads=4, mode="diagonal"), "unknown attention mode"),
    (dict(dim=32, num_heads=4, direction="row"), "only used by mode='sequential'"),
    (dict(dim=32, num_heads=4, mode="sequential", direction="up"), "direction must be"),
    (dict(dim=32, num_heads=4, mode="cross_shaped", stripe_width=0), "stripe_width must be >= 1"),
])
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_attention(**kwargs)


def test_odd_heads_allowed_for_single_branch_modes():
    create_attention(24, 3, mode="sequential")
    create_attention(24, 3, mode="vanilla")


@pytest.mark.parametrize("x,err,match", [
    (torch.randn(2, 7, 7), ValueError, r"expects \(B, H, W, C\)"),
    (torch.randn(2, 7, 7, 16), ValueError, "got 16 channels"),
    (torch.ones(2, 7, 7, 32, dtype=torch.long), TypeError, "floating-point"),
])
def test_bad_input_raises(x, err, match):
    with pytest.raises(err, match="^PSAttention.* " + match):
        PSAttention(32, 4)(x)


def test_layout_defaults_are_the_papers_7():
    from pale.models.pale_transformer import attention_layout
    assert attention_layout("parallel").group_size == attention_layout("cross_shaped").group_size == (7, 7)


# ---- vanilla PS-attention: the paper's per-pale definition -------------------------------------

VANILLA_CASES = [  # (H, W, pale size, heads): padding in one or both directions, none, one row
    (9, 5, (3, 2), 2), (13, 11, (3, 2), 4), (13, 11, 7, 2), (12, 12, 3, 2), (1, 13, 7, 2), (5, 1, (2, 3), 1)]


@pytest.mark.parametrize("h,w,pale_size,heads", VANILLA_CASES)
def test_per_pale_attention_matches_definition(h, w, pale_size, heads):
    """Values and gradients against attention inside each pale, averaged over a token's pales."""
    from pale.models.pale_ablations import per_pale_attention
    from pale.models.pale_transformer import as_pair
    from reference import per_pale_reference
    pale_size = as_pair(pale_size, "pale_size")
    q, k, v = (torch.randn(2, h, w, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = per_pale_attention(q, k, v, heads, pale_size)
    ref = per_pale_reference(q, k, v, heads, pale_size)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_pales_hold_the_papers_token_count():
    """Pale i: interlaced rows i, i+N, ... and columns i, i+N, ..., s_r Wp + s_c Hp - s_r s_c tokens;
    every token is in pale (y mod N) and pale (x mod N)."""
    from pale.models.pale_ablations import pale_index
    n, (s_r, s_c) = 3, (3, 2)
    hp, wp = n * s_r, n * s_c
    index, count = pale_index(n, (s_r, s_c))
    assert index.shape == (n, s_r * wp + s_c * hp - s_r * s_c)
    for i in range(n):
        y, x = index[i] // wp, index[i] % wp
        assert len(set(index[i].tolist())) == index.shape[1]
        assert ((y % n == i) | (x % n == i)).all()
        assert sorted(set(y[x % n != i].tolist())) == list(range(i, hp, n))      # its s_r rows, whole
    y, x = torch.arange(hp * wp) // wp, torch.arange(hp * wp) % wp
    assert count.tolist() == (1 + (y % n != x % n).long()).tolist()


@pytest.mark.parametrize("h,w,pale_size,heads", [(9, 5, (3, 2), 2), (13, 11, (3, 2), 4), (56, 56, (7, 7), 2)])
def test_per_pale_attention_costs_2cNP2(h, w, pale_size, heads):
    """The attention matmuls count exactly 2 c N P^2 multiply-adds (N pales of P tokens, all c channels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pale.models.pale_ablations import per_pale_attention
    from pale.models.pale_transformer import pale_count
    c = 8
    q = torch.randn(1, h, w, c)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        per_pale_attention(q, q, q, heads, pale_size)
    n = pale_count(h, w, pale_size)
    p = pale_size[0] * n * pale_size[1] + pale_size[1] * n * pale_size[0] - pale_size[0] * pale_size[1]
    assert counter.get_total_flops() == 2 * (2 * c * n * p * p)


@pytest.mark.parametrize("interlaced", [True, False])
@pytest.mark.parametrize("h,w,s,heads", [(14, 14, 7, 2), (12, 12, 3, 4), (6, 6, 2, 2), (7, 7, 7, 2), (4, 4, 1, 2)])
def test_fused_branches_equal_separate_branches(h, w, s, heads, interlaced):
    """The one-call path (square, unpadded) against the two per-branch calls: values and gradients."""
    from pale.models.pale_transformer import column_group_attention, ps_attention_one_call, row_group_attention
    q, k, v = (torch.randn(2, h, w, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fused = ps_attention_one_call(q, k, v, heads, s, interlaced)
    separate = torch.cat((row_group_attention(q[..., :4], k[..., :4], v[..., :4], heads, s, interlaced),
                          column_group_attention(q[..., 4:], k[..., 4:], v[..., 4:], heads, s, interlaced)), dim=-1)
    torch.testing.assert_close(fused, separate, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, (q, k, v), grad)
    separate_grads = torch.autograd.grad(separate, (q, k, v), grad)
    for a, b in zip(fused_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h,w", [(12, 13), (12, 12), (14, 7)])   # neither, not a multiple, not square
def test_fused_branches_refuse_maps_that_need_padding(h, w):
    from pale.models.pale_transformer import ps_attention_one_call
    q = torch.randn(1, h, w, 8)
    with pytest.raises(ValueError, match=f"square map .* multiple of the group size 7, got {h}x{w}"):
        ps_attention_one_call(q, q, q, 2, 7, True)


def test_eval_projection_folds_batchnorm_exactly():
    """Eval-mode q/k/v projections fold BatchNorm into the depthwise conv: same result as conv -> BN -> linear."""
    proj = _layer(16, 2, 7).q
    x = torch.randn(2, 6, 5, 16, dtype=torch.float64)
    unfolded = proj.pw(proj.bn(proj.dw(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1))
    folded = proj(x)
    torch.testing.assert_close(folded, unfolded, rtol=1e-12, atol=1e-12)
    # Gradients reach the conv and BatchNorm weights as unfolded (fine-tuning with frozen statistics).
    weights = (proj.dw.weight, proj.bn.weight, proj.bn.bias)
    grad = torch.randn_like(folded)
    for a, b in zip(torch.autograd.grad(folded, weights, grad), torch.autograd.grad(unfolded, weights, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    proj.train()  # training uses batch statistics, so nothing is folded
    unfolded = proj.pw(proj.bn(proj.dw(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1))
    torch.testing.assert_close(proj(x), unfolded, rtol=1e-12, atol=1e-12)


# ---- the attention backend switch ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ATTN_MODES)
def test_explicit_attention_equals_the_default_in_float32(mode, monkeypatch):
    """fused_attn=False runs softmax(q k^T) v and never the fused kernels; same outputs to 1e-5."""
    model = PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2), pale_size=3,
                            attn_mode=mode, num_classes=5).eval()
    layers = [m for m in model.modules() if isinstance(m, GroupedAttention)]
    assert len(layers) == 5 and all(layer.fused_attn for layer in layers)   # timm's use_fused_attn() default
    # 48x48: maps 12/6/3/2, unpadded square ones (one-call path) and a padded one; 33x47 pads everywhere.
    images = [torch.randn(2, 3, 48, 48), torch.randn(2, 3, 33, 47)]
    with torch.no_grad():
        fused = [model(x) for x in images]
        for layer in layers:
            layer.fused_attn = False

        def no_fused_kernel(*args, **kwargs):
            raise AssertionError("fused_attn=False called the fused attention kernel")
        monkeypatch.setattr(attention_kernels, "attention", no_fused_kernel)
        for x, want in zip(images, fused):
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_layers_follow_timms_fused_attention_setting():
    from timm.layers import set_fused_attn, use_fused_attn
    assert use_fused_attn()
    set_fused_attn(False)
    try:
        layer = create_attention(16, 2, 3)
    finally:
        set_fused_attn(True)
    assert layer.fused_attn is False and create_attention(16, 2, 3).fused_attn is True


@pytest.mark.parametrize("mode", ATTN_MODES)
def test_explicit_weights_are_softmax_rows_on_the_map(mode):
    """The explicit path's weights, read by a forward hook on attn_probs (one module per branch):
    query rows sum to one and cover exactly the keys of the mode's groups (tests/reference.py)."""
    from pale.visualize import capturing_attention, group_tokens, query_weights
    layer = create_attention(16, 4, (3, 2), mode=mode, stripe_width=2).double().eval()
    h, w = 7, 9
    with torch.no_grad(), capturing_attention([layer]) as kept:
        layer(torch.randn(2, h, w, 16, dtype=torch.float64))
    masks = mode_masks(mode, h, w, layer.group_size, layer.direction or "row")
    masks = masks if isinstance(masks, tuple) else (masks,)
    assert list(kept[0]) == list(layer.branches) and len(layer.branches) == len(masks)
    groups = group_tokens(layer, (h, w))
    for name, mask in zip(layer.branches, masks):
        for token in (0, 4 * w + 5, h * w - 1):
            weights = query_weights(kept[0][name], groups[name], token, h * w)     # (B, heads, H W)
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2], dtype=torch.float64))
            assert ((weights > 0) == mask[token]).all()
    assert layer.fused_attn   # restored


@pytest.mark.parametrize("mode", ["parallel", "vanilla"])
def test_key_masks_are_built_once_per_size_and_serve_autograd(mode):
    # 10x9 pads for pale size 3 in every mode. The masks (and vanilla's pale index) are built once per
    # size in eager calls; one first built under inference_mode must still serve a training step.
    from pale.models.pale_ablations import pale_key_mask
    from pale.models.pale_transformer import batch_key_mask

    cache = pale_key_mask if mode == "vanilla" else batch_key_mask
    cache.cache_clear()
    layer = create_attention(16, 2, 3, mode=mode)
    x = torch.randn(2, 10, 9, 16)
    with torch.inference_mode():
        layer.eval()(x)
    built = cache.cache_info().misses
    assert built >= 1
    layer(x).sum()
    assert cache.cache_info().misses == built  # the second call built nothing
    layer.train()(x.requires_grad_()).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        cached = layer.eval()(x)
        cache.cache_clear()
        torch.testing.assert_close(cached, layer(x), rtol=0, atol=0)


def test_key_masks_are_not_cached_while_traced_or_compiled():
    from pale.models.pale_transformer import batch_key_mask

    batch_key_mask.cache_clear()
    layer = create_attention(16, 2, 3).eval()
    x = torch.randn(2, 10, 9, 16)
    torch.compile(layer, backend="eager", fullgraph=True)(x)
    torch.jit.trace(layer, x, check_trace=False)
    assert batch_key_mask.cache_info().currsize == 0
