"""Full dense models' parameter and multiply-add counts against hand-worked formulas."""
from __future__ import annotations

import pytest
import torch

from pale.dense.cost import PAPER, dense_cost, format_dense_cost, paper_note

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))


pytestmark = pytest.mark.usefixtures("one_thread")


def upernet_decoder_params(chans, d=512):
    bn = 2 * d
    return (2 * sum(chans)                                   # LayerNorm on each stage map
            + 4 * (chans[-1] * d + bn)                        # pyramid pooling 1x1 convs (bins 1, 2, 3, 6)
            + (chans[-1] + 4 * d) * d * 9 + bn                # PPM bottleneck 3x3
            + sum(c * d + bn for c in chans[:-1])             # FPN laterals
            + 3 * (d * d * 9 + bn)                            # FPN 3x3 convs
            + 4 * d * d * 9 + bn)                             # fusion 3x3


def test_upernet_parameters_by_hand():
    cost = dense_cost("upernet_pale_tiny", (64, 64), **TINY)
    p = cost.params_by_part
    assert p["decoder"] == upernet_decoder_params((16, 32, 64, 128))
    assert p["head"] == 512 * 150 + 150
    assert p["aux_head"] == 64 * 256 * 9 + 2 * 256 + 256 * 150 + 150
    import timm

    import pale  # noqa: F401
    cls = timm.create_model("pale_tiny", **TINY)
    no_head = sum(v.numel() for k, v in cls.named_parameters() if not k.startswith(("head.", "norm.")))
    assert p["backbone"] == no_head


def test_maskrcnn_head_macs_by_hand():
    from pale.complexity import measure_cost
    from pale.dense.cost import MaskRCNNCostView
    from pale.dense.maskrcnn import build_mask_rcnn

    # mmdetection counts 1000 box RoIs and 100 mask RoIs; fewer here keep the test quick
    view = MaskRCNNCostView(build_mask_rcnn(dict(backbone="pale_tiny", num_classes=80, pale_kwargs=TINY)),
                            box_rois=20, mask_rois=3)
    cost = measure_cost(view, (64, 96))
    m, p = cost.macs_by_part, cost.params_by_part
    # box head: fc 256*7*7 -> 1024 -> 1024, then 81 scores and 81*4 deltas, per RoI
    assert m["box_head"] == 20 * (256 * 49 * 1024 + 1024 * 1024 + 1024 * 81 + 1024 * 324)
    # mask head: four 3x3 convs at 14x14, 2x2 stride-2 deconv, 1x1 to 81 classes at 28x28, per RoI
    assert m["mask_head"] == 3 * (4 * 256 * 256 * 9 * 196 + 256 * 256 * 4 * 196 + 256 * 81 * 784)
    assert p["box_head"] == 256 * 49 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 81 + 81 + 1024 * 324 + 324
    assert cost.macs == sum(m.values()) and cost.params == sum(p.values())


def test_report_lines():
    cost = dense_cost("upernet_pale_tiny", (64, 64), **TINY)
    text = format_dense_cost(cost)
    assert "paper" in text and "52.00M" in text
    assert "996G" in paper_note("upernet", "pale_tiny", cost.params, cost.macs)
    assert paper_note("upernet", "resnet", 1, 1) is None
    assert set(PAPER) == {f"{k}_pale_{v}" for k in ("upernet", "maskrcnn") for v in ("tiny", "small", "base")}
    with pytest.raises(ValueError, match="unknown dense model"):
        dense_cost("fcn_pale_tiny")


def test_dense_loaders_refuse_a_checkpoint_of_another_task(tmp_path):
    from pale.dense.det_task import load_detector
    from pale.dense.seg_task import load_segmenter
    from pale.checkpoint import save_checkpoint
    from pale.errors import CheckpointError
    from pale.models.pale_transformer import PaleTransformer

    model = PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), num_classes=3)
    path = tmp_path / "classifier.pth"
    save_checkpoint(path, model, "pale_tiny", dict(num_classes=3), class_names=list("abc"))
    with pytest.raises(CheckpointError, match="not a segmentation checkpoint of `pale seg train`"):
        load_segmenter(str(path))
    with pytest.raises(CheckpointError, match="not a detection checkpoint of `pale det train`.*classification"):
        load_detector(str(path))


def test_ape_backbones_are_sized_at_the_task_resolution(tmp_path):
    """Table 9's dense APE models: the tables are learned at 512x2048 (UperNet) / 800x1280 (Mask R-CNN),
    and an ImageNet checkpoint (tables at 224) loads with each table resized."""
    from timm.layers import resample_abs_pos_embed_nhwc

    from pale.dense.maskrcnn import build_mask_rcnn
    from pale.dense.upernet import PaleUperNet
    from pale.checkpoint import save_checkpoint
    from pale.models.pale_transformer import PaleTransformer

    seg = PaleUperNet("pale_tiny", 3, 32, aux=False, pos_embed="ape", **TINY)
    assert [tuple(s.pos_embed.shape[1:3]) for s in seg.trunk.stages] == [(128, 512), (64, 256), (32, 128), (16, 64)]
    assert seg.no_weight_decay() == {f"upernet.encoder.model.model.stages.{i}.pos_embed" for i in range(4)}
    det = build_mask_rcnn(dict(backbone="pale_tiny", num_classes=2, pale_kwargs=dict(TINY, pos_embed="ape")))
    assert tuple(det.backbone.body.model.stages[0].pos_embed.shape[1:3]) == (200, 320)
    # an explicit img_size is kept
    assert tuple(PaleUperNet("pale_tiny", 3, 32, aux=False, pos_embed="ape", img_size=64, **TINY)
                 .trunk.stages[0].pos_embed.shape[1:3]) == (16, 16)

    classifier = PaleTransformer(pos_embed="ape", num_classes=3, **TINY)
    path = tmp_path / "imagenet.pth"
    save_checkpoint(path, classifier, "pale_tiny", dict(TINY, pos_embed="ape", num_classes=3), class_names=list("abc"))
    seg.load_pretrained(path)
    for mine, theirs in zip(seg.trunk.stages, classifier.stages):
        torch.testing.assert_close(mine.pos_embed, resample_abs_pos_embed_nhwc(theirs.pos_embed, list(mine.pos_embed.shape[1:3])))
