"""torch.fx on Pale: graph node names, torchvision's feature extractor and timm's FX features give the
eager model's outputs and gradients, for the three registered variants, every attention mode, at
224x224 and at an odd size that pads every stage."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_graph_node_names
from torchvision.models.feature_extraction import create_feature_extractor

import pale  # noqa: F401  (registers the models)
from pale.models.pale_transformer import ATTN_MODES

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ("pale_tiny", "pale_small", "pale_base")
SIZES = ((224, 224), (97, 131))
# Pale-S and Pale-B at full depth or at 224x224 take tens of seconds here: slow tests.
LARGE = [pytest.param(name, marks=pytest.mark.slow) for name in VARIANTS[1:]]
CASES = [(name, size) for name in VARIANTS for size in SIZES if name == "pale_tiny" or size != (224, 224)] + [
    pytest.param(name, (224, 224), marks=pytest.mark.slow) for name in VARIANTS[1:]]
RETURN = {"stages.0": "s0", "stages.3": "s3", "norm": "features", "head.fc": "logits"}


def shallow(name: str, **kwargs) -> torch.nn.Module:
    """The registered variant with one block per stage (its Table 1 widths and heads), for speed."""
    torch.manual_seed(0)
    return timm.create_model(name, depths=(1, 1, 1, 1), num_classes=5, **kwargs)


def eager_outputs(model, x):
    final, maps = model.forward_intermediates(x, output_fmt="NHWC")
    return {"s0": maps[0], "s3": maps[3], "features": final, "logits": model.forward_head(final)}


@pytest.mark.parametrize("name", ["pale_tiny"] + LARGE)
def test_graph_node_names_of_the_full_variants(name):
    # shapes only: the full depth traces without memory or arithmetic
    model = timm.create_model(name, device="meta")
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert eval_nodes[:2] == ["x", "check_image_batch"]
    # The attention of every block: per branch (rows, columns) one grouping, one kernel and one
    # ungrouping leaf call, their size logic left to run at call time.
    for leaf in ("group_lines", "attend_in_groups", "ungroup_lines"):
        assert sum(n.startswith("stages.") and n.split(".attn.")[-1] in (leaf, f"{leaf}_1") for n in eval_nodes) == 44
    assert {"stages.2.blocks.15.attn.proj", "norm", "head.fc"} <= set(eval_nodes)
    assert "stages.0.blocks.0.attn.q.bn" in train_nodes   # BatchNorm on batch statistics while training


@pytest.mark.parametrize("name,size", CASES)
def test_feature_extractor_equals_eager_forward_and_backward(name, size):
    model = shallow(name)
    extractor = create_feature_extractor(model, RETURN)   # torchvision's, with no timm tracer settings
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got, want = extractor.eval()(x), eager_outputs(model.eval(), x)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    # Training graph: same loss and same gradients (the extractor shares the model's parameters).
    model.train()
    model(x).square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    extractor.train()(x)["logits"].square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_fx_features_only(name):
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 1, 1))
    features = timm.create_model(name, features_only=True, feature_cls="fx", **kwargs).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    assert model.output_fmt == "NHWC" and features.output_fmt.value == "NHWC"
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            got = features(x)
            want = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert [t.shape for t in got] == [t.shape for t in want]
        assert [t.shape[-1] for t in got] == features.feature_info.channels()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,pos_embed,stem_type", [(mode, pos, "overlap") for mode in ATTN_MODES
                                                      for pos in ("cpe", "ape")] + [("parallel", "ape", "deep")])
def test_every_attention_mode_traces(mode, pos_embed, stem_type):
    torch.manual_seed(0)
    model = timm.create_model("pale_tiny", embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2),
                              pale_size=3, attn_mode=mode, pos_embed=pos_embed, num_classes=3,
                              stem_type=stem_type).eval()
    extractor = create_feature_extractor(model, {"head.fc": "logits"})
    for size in ((48, 48), (33, 47)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(extractor(x)["logits"], model(x), rtol=1e-5, atol=1e-5)


def test_traced_graph_checks_its_input():
    model = timm.create_model("pale_tiny", embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
    extractor = create_feature_extractor(model.eval(), {"stages.0": "s0"})
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        extractor(torch.randn(1, 1, 32, 32))
