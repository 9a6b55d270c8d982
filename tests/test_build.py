"""Building a model as timm's own are built: device and dtype at construction, meta-device init."""
import pytest
import timm
import torch

import pale  # noqa: F401
from pale.models.pale_transformer import PaleTransformer

VARIANTS = ["pale_tiny", "pale_small", "pale_base"]


def small(**kw):
    args = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 2), num_heads=(2, 2, 4, 4), num_classes=5)
    args.update(kw)
    return PaleTransformer(**args)


def tensors(model):
    return dict(model.named_parameters(), **dict(model.named_buffers()))


@pytest.mark.parametrize("name", VARIANTS)
def test_device_and_dtype_reach_every_parameter_and_buffer(name):
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16, pos_embed="ape", stem_type="deep")
    for key, t in tensors(model).items():
        assert t.device.type == "meta", key
        assert t.dtype == (torch.bfloat16 if t.is_floating_point() else torch.long), key
    # the CPE's identity buffer too
    cpe = timm.create_model(name, device="meta", dtype=torch.bfloat16)
    assert cpe.stages[0].blocks[0].cpe.identity.dtype == torch.bfloat16
    assert cpe.stages[0].blocks[0].cpe.identity.device.type == "meta"


def test_bfloat16_build_runs_in_bfloat16():
    torch.manual_seed(0)
    model = small(dtype=torch.bfloat16, pos_embed="ape", img_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 48, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _assert_same_init(ref: torch.nn.Module, other: torch.nn.Module, model: torch.nn.Module):
    """Per tensor of ``model`` against two normal builds ``ref`` and ``other`` (another seed): what they
    build alike (norms, zero biases, running statistics, the CPE identity) exactly equal; random tensors
    with ``ref``'s median and interquartile range within about six standard errors.

    Quantiles, not mean and standard deviation: timm's ``trunc_normal_`` (bounds +-2) turns a uniform
    draw of exactly +-1 into a weight of +-2 (about one in 2**24, so about one per Pale-T), which moves a
    tensor's standard deviation by several of its standard errors.
    """
    ref_tensors, new_tensors = tensors(ref), tensors(model)
    assert ref_tensors.keys() == new_tensors.keys()
    for key, a in ref_tensors.items():
        b = new_tensors[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if torch.equal(a, tensors(other)[key]):
            assert torch.equal(a, b), key
            continue
        q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        (a1, a2, a3), (b1, b2, b3) = (torch.quantile(t.detach().double().flatten(), q).tolist() for t in (a, b))
        n, iqr = a.numel(), a3 - a1
        assert abs(b2 - a2) <= 8 * iqr / n ** 0.5, key
        assert abs((b3 - b1) / iqr - 1) <= 10 / n ** 0.5, key
        assert not torch.equal(a, b), key  # drawn, not copied


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(attn_mode="vanilla", pos_embed="ape", stem_type="deep"),
    dict(attn_mode="sequential", pos_embed="none"),
    dict(attn_mode="cross_shaped", stem_type="deep"),
])
def test_meta_build_then_init_weights_matches_a_normal_build(kwargs):
    torch.manual_seed(0)
    ref = timm.create_model("pale_tiny", **kwargs)
    other = timm.create_model("pale_tiny", **kwargs)
    model = timm.create_model("pale_tiny", device="meta", **kwargs)
    model.to_empty(device="cpu")
    model.init_weights()
    _assert_same_init(ref, other, model)
    x = torch.randn(2, 3, 61, 75)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_meta_build_loads_a_checkpoint_after_non_persistent_buffers_are_refilled():
    reinit = pytest.importorskip("timm.models._manipulate").reinit_non_persistent_buffers
    ref = small().eval()
    model = small(device="meta", weight_init="skip").eval()
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    reinit(model)   # the CPE identity kernels are not in the state dict
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_weight_init_skip_leaves_the_constructors_initialisation():
    torch.manual_seed(0)
    skipped = small(weight_init="skip")
    fc1 = skipped.stages[0].blocks[0].mlp.fc1   # PyTorch's default: uniform, bound 1 / sqrt(fan_in)
    assert abs(fc1.weight.std().item() - 1 / (3 * fc1.in_features) ** 0.5) < 0.01
    assert fc1.bias.abs().max() > 0
    skipped.init_weights(needs_reset=False)
    assert 0.018 < fc1.weight.std() < 0.022 and fc1.bias.abs().max() == 0
    with pytest.raises(ValueError, match="weight_init must be"):
        small(weight_init="jax")


def test_cpe_identity_is_refilled_by_init_weights():
    model = small(device="meta")
    model.to_empty(device="cpu")
    for cpe in (b.cpe for s in model.stages for b in s.blocks):
        cpe.identity.fill_(float("nan"))
    model.init_weights()
    expected = torch.zeros(16, 1, 3, 3)
    expected[:, :, 1, 1] = 1
    assert torch.equal(model.stages[0].blocks[0].cpe.identity, expected)
