"""torch.jit.trace taken at one size runs at other sizes: the traced graph pads and masks like the
model does (no size-dependent shortcut is fixed in it), or, for vanilla, raises a clear error."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import pale  # noqa: F401  (registers the models)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2), num_classes=3)


def trace(model, size=(224, 224)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, torch.randn(1, 3, *size), check_trace=False)


@pytest.mark.parametrize("mode,pos_embed,stem_type", [
    ("parallel", "cpe", "overlap"), ("parallel", "ape", "overlap"), ("sequential", "cpe", "overlap"),
    ("axial", "cpe", "overlap"), ("cross_shaped", "cpe", "overlap"), ("parallel", "ape", "deep")])
def test_trace_at_224_runs_at_other_sizes(mode, pos_embed, stem_type):
    # Pale size 7 at 224x224: square maps of 56/28/14/7, no padding, where the eager model takes its
    # one-call shortcut (the deep stem: 112/56/28/14); 97x131 pads every stage.
    torch.manual_seed(0)
    model = timm.create_model("pale_tiny", attn_mode=mode, pos_embed=pos_embed, stem_type=stem_type, **TINY).eval()
    traced = trace(model)
    for size in ((224, 224), (97, 131), (33, 47)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5, msg=str(size))


def test_vanilla_trace_refuses_another_size_clearly():
    model = timm.create_model("pale_tiny", attn_mode="vanilla", **TINY).eval()
    traced = trace(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(torch.jit.Error, match="traced on a 56x56 map and cannot run on 24x33"):
            traced(torch.randn(1, 3, 97, 131))
