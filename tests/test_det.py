"""Mask R-CNN + Pale: any input size, COCOeval against hand-worked APs, COCO data errors, training on
the engine (short here, long behind `slow`), eval / predict CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


from pale.cli import main as pale_main
from pale.dense.backbone import PaleFPNBackbone
from pale.dense.det_data import CocoInstances, load_coco
from pale.dense.det_task import DetectionTask, coco_metrics, coco_results, evaluate_detector
from pale.dense.engine import run_training
from pale.dense.maskrcnn import build_mask_rcnn
from pale.dense.toydata import make_coco_dataset
from pale.train import Runtime, resolve_recipe
from timm.utils import random_seed

from dense_tiny import TINY, TINY_YAML


# pycocotools calls numpy.array(copy=False), deprecated under numpy 2.
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), {"train": 8, "val": 3}, size_range=(64, 96),
                             obj_size=(14, 30))


def tiny_overrides(root: Path, **extra) -> list:
    cfg = {"data.root": str(root), "data.train_split": "train", "data.val_split": "val", "data.min_size": "[64, 80]",
           "data.test_min_size": 80, "data.max_size": 160, "batch_size": 2, "epochs": 2, "train.workers": 0,
           "train.amp": "none", "train.progress": "false", "optim.lr": 3e-4, "sched.warmup_updates": 2,
           "sched.decay_milestones": "[100]", "model.drop_path_rate": 0.0, "model.fpn_channels": 32,
           "model.roi_samples": 64, "model.kwargs": TINY_YAML}
    cfg.update(extra)
    return [f"{k}={v}" for k, v in cfg.items()]


def tiny_spec(**extra):
    return dict(dict(backbone="pale_tiny", num_classes=2, min_size=[64, 80], max_size=160, test_min_size=80,
                     fpn_channels=32, roi_samples=64, pale_kwargs=TINY), **extra)


# ---- model -----------------------------------------------------------------------------------------

def test_backbone_gives_torchvision_what_it_expects():
    bb = PaleFPNBackbone("pale_tiny", 32, **TINY).eval()
    feats = bb(torch.randn(1, 3, 96, 160))
    assert bb.out_channels == 32 and list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    assert all(f.shape[1] == 32 for f in feats.values())


@pytest.mark.parametrize("sizes", [[(375, 500), (97, 131)], [(64, 64)]])
def test_any_input_size_gives_outputs_in_its_coordinates(sizes):
    torch.manual_seed(0)
    model = build_mask_rcnn(tiny_spec()).eval()
    # lower the score threshold so the untrained model returns detections to check
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        outs = model([torch.rand(3, h, w) for h, w in sizes])
    for (h, w), out in zip(sizes, outs):
        assert len(out["boxes"]) > 0
        assert out["masks"].shape[-2:] == (h, w)
        assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()


def test_multiscale_training_sizes_and_fixed_test_size():
    model = build_mask_rcnn(tiny_spec(min_size=[480, 512, 800], test_min_size=800))
    assert model.transform.min_size == (480, 512, 800)
    model.eval()
    assert model.transform.min_size == (800,)
    model.train()
    assert model.transform.min_size == (480, 512, 800)


def _off_bf16_grid(x: torch.Tensor) -> bool:
    """Whether some value of ``x`` is not a bf16 number (bf16 steps 8 px between 1024 and 2048)."""
    return bool((x != x.bfloat16().float()).any())


def test_bf16_autocast_runs_backbone_only_boxes_stay_float32():
    """Under bf16 autocast the backbone and FPN compute in bf16, the RPN and RoI heads in float32: proposals,
    the ground truth the box head regresses to and the returned boxes keep float32 coordinates (torchvision
    casts boxes to its heads' dtype, which under bf16 moves an edge at 1300.2 px to 1304)."""
    h, w = 96, 1344  # wide enough for coordinates past 1024; the resize keeps the scale at exactly 1
    model = build_mask_rcnn(tiny_spec(min_size=[h], test_min_size=h, max_size=w))
    gt = torch.tensor([[1001.3, 10.7, 1300.2, 70.1], [20.5, 30.25, 300.7, 90.9]])
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, gt.int().tolist()):
        m[y1:y2, x1:x2] = 1
    targets = [dict(boxes=gt, labels=torch.tensor([1, 2]), masks=masks)]
    proposals, regressed = [], []
    model.rpn.register_forward_hook(lambda mod, args, out: proposals.extend(out[0]))
    encode = model.roi_heads.box_coder.encode

    def spy(matched_gt, boxes):
        regressed.extend(matched_gt)
        return encode(matched_gt, boxes)
    model.roi_heads.box_coder.encode = spy
    image = torch.rand(3, h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(image[None])
        losses = model([image], targets)
    assert all(f.dtype == torch.bfloat16 for f in feats.values())  # the backbone does run in bf16
    sum(losses.values()).backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    (props,), (matched,) = proposals, regressed
    assert props.dtype == torch.float32 and _off_bf16_grid(props)
    # every matched ground-truth box is one of the given boxes, to the bit
    assert matched.dtype == torch.float32 and len(matched) > 0
    assert {tuple(b) for b in matched.tolist()} <= {tuple(b) for b in gt.tolist()}

    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = model([image])
    assert len(out["boxes"]) > 0 and out["boxes"].dtype == torch.float32 and _off_bf16_grid(out["boxes"])
    assert out["scores"].dtype == torch.float32 and out["masks"].dtype == torch.float32
    # without autocast, the same detections as torchvision's own forward
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    with torch.no_grad():
        ours, theirs = model([image])[0], GeneralizedRCNN.forward(model, [image])[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in ("boxes", "scores", "labels", "masks"))


def test_training_targets_are_checked():
    model = build_mask_rcnn(tiny_spec())
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="needs targets"):
        model([image])
    flat = dict(boxes=torch.tensor([[5.0, 5.0, 20.0, 5.0]]), labels=torch.tensor([1]),
                masks=torch.zeros(1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"target 0: box \[5.0, 5.0, 20.0, 5.0\] .* has no area"):
        model([image], [flat])
    with pytest.raises(ValueError, match=r"target 0: boxes must be a tensor of shape \(N, 4\)"):
        model([image], [dict(flat, boxes=torch.zeros(4))])


# ---- evaluators --------------------------------------------------------------------------------------

def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _gt(tmp_path: Path, anns: list) -> object:
    data = dict(images=[dict(id=1, file_name="a.jpg", height=100, width=100)],
                categories=[dict(id=3, name="disc"), dict(id=7, name="square")], annotations=anns)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    return load_coco(tmp_path / "gt.json")


def test_box_ap_matches_hand_computation(tmp_path):
    gt = _gt(tmp_path, [dict(id=1, image_id=1, category_id=3, bbox=[10, 10, 40, 40], area=1600, iscrowd=0)])
    # IoU 0.62 (intersection 40 x 24.8 = 992 over 1600): a true positive at IoU thresholds 0.50, 0.55, 0.60 only
    det = [dict(image_id=1, category_id=3, bbox=[10, 10, 40, 24.8], score=0.9)]
    m = coco_metrics(gt, det, iou_types=("bbox",))
    assert m["bbox_ap"] == pytest.approx(30.0) and m["bbox_ap50"] == pytest.approx(100.0)
    assert m["bbox_ap75"] == pytest.approx(0.0)
    # two objects, one found exactly: recall 1/2 at precision 1 -> 51 of COCO's 101 recall points
    gt2 = _gt(tmp_path, [dict(id=1, image_id=1, category_id=3, bbox=[10, 10, 40, 40], area=1600, iscrowd=0),
                         dict(id=2, image_id=1, category_id=3, bbox=[60, 60, 30, 30], area=900, iscrowd=0)])
    m2 = coco_metrics(gt2, [dict(image_id=1, category_id=3, bbox=[10, 10, 40, 40], score=0.9)], iou_types=("bbox",))
    assert m2["bbox_ap"] == pytest.approx(100 * 51 / 101)
    # a wrong class finds nothing
    m3 = coco_metrics(gt, [dict(image_id=1, category_id=7, bbox=[10, 10, 40, 40], score=0.9)], iou_types=("bbox",))
    assert m3["bbox_ap"] == 0.0


def test_mask_ap_matches_hand_computation(tmp_path):
    gt_mask = np.zeros((100, 100), bool)
    gt_mask[10:35, 10:30] = True  # 25 x 20 = 500 pixels
    gt = _gt(tmp_path, [dict(id=1, image_id=1, category_id=7, bbox=[10, 10, 20, 25], area=500, iscrowd=0,
                             segmentation=_rle(gt_mask))])
    det_mask = np.zeros((100, 100), bool)
    det_mask[10:26, 10:30] = True  # 16 x 20 = 320 pixels inside: IoU 0.64
    det = [dict(image_id=1, category_id=7, bbox=[10, 10, 20, 25], score=0.8, segmentation=_rle(det_mask))]
    m = coco_metrics(gt, det)
    assert m["segm_ap"] == pytest.approx(30.0) and m["bbox_ap"] == pytest.approx(100.0)


def test_coco_results_map_labels_back_to_category_ids():
    out = dict(boxes=torch.tensor([[1.0, 2.0, 11.0, 22.0]]), scores=torch.tensor([0.5]), labels=torch.tensor([2]),
               masks=torch.zeros(1, 1, 30, 30))
    (r,) = coco_results([out], [5], [3, 7])
    assert r["category_id"] == 7 and r["image_id"] == 5 and r["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert r["segmentation"]["size"] == [30, 30]


# ---- data --------------------------------------------------------------------------------------------

def _coco_folder(tmp_path: Path, images: list, anns: list, cats=None) -> Path:
    (tmp_path / "train").mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(tmp_path / "train" / im["file_name"])
    ann = tmp_path / "annotations" / "instances_train.json"
    ann.parent.mkdir(exist_ok=True)
    ann.write_text(json.dumps(dict(images=images, annotations=anns,
                                   categories=cats if cats is not None else [dict(id=1, name="disc")])))
    return ann


def test_bad_data_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        CocoInstances(tmp_path, tmp_path / "annotations" / "instances_train.json")
    box = dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5], area=25, iscrowd=0)
    ann = _coco_folder(tmp_path, [dict(id=1, file_name="a.jpg", height=20, width=30)], [dict(box, category_id=9)])
    with pytest.raises(ValueError, match=r"instances_train\.json: annotation 1 .* category_id 9"):
        CocoInstances(tmp_path / "train", ann)
    ann = _coco_folder(tmp_path, [], [])
    with pytest.raises(ValueError, match=r"instances_train\.json lists no images"):
        CocoInstances(tmp_path / "train", ann)
    ann = _coco_folder(tmp_path, [dict(id=1, file_name="a.jpg", height=20, width=30)], [box])
    # the file on disk is 30x20; say 30x21 in the annotations
    data = json.loads(ann.read_text())
    data["images"][0]["height"] = 21
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"a\.jpg is 30x20 but .*instances_train\.json says 30x21"):
        CocoInstances(tmp_path / "train", ann)[0]
    # stored 30x20 with an EXIF tag that turns it: read as 20x30, and the error says why
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "train" / "a.jpg", exif=exif)
    data["images"][0]["height"] = 20
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"a\.jpg is 20x30 \(turned upright by its EXIF orientation tag.* says 30x20"):
        CocoInstances(tmp_path / "train", ann)[0]
    data["images"][0].update(height=20, file_name="missing.jpg")
    ann.write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        CocoInstances(tmp_path / "train", ann)[0]


def test_dataset_targets_and_flip(toy):
    ds = CocoInstances(toy / "train", toy / "annotations" / "instances_train.json", train=True, flip=1.0)
    plain = CocoInstances(toy / "train", toy / "annotations" / "instances_train.json", train=False)
    image, target = ds[0]
    image0, target0 = plain[0]
    w = image.shape[-1]
    assert torch.equal(image, image0.flip(-1)) and torch.equal(target["masks"], target0["masks"].flip(-1))
    assert torch.allclose(target["boxes"][:, 0], w - target0["boxes"][:, 2])
    # boxes enclose their masks exactly
    for box, mask in zip(target0["boxes"], target0["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# ---- training on the engine --------------------------------------------------------------------------

def test_short_training_lowers_loss_and_eval_reproduces_it(toy, tmp_path, capsys):
    out = tmp_path / "run"
    run_training(DetectionTask, None, tiny_overrides(toy, epochs=3), out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert pale_main(["det", "eval", "-c", str(out / "last.pth"), "--data", str(toy), "--split", "val",
                      "-o", str(tmp_path / "m.json"), "--device", "auto"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["bbox_ap"] == pytest.approx(history[-1]["val_bbox_ap"], abs=1e-6)
    assert metrics["segm_ap"] == pytest.approx(history[-1]["val_segm_ap"], abs=1e-6)
    assert pale_main(["det", "eval", "-c", str(out / "last.pth"), "--data", str(toy), "--split", "val",
                      "-o", str(tmp_path / "m16.json"), "--amp", "bf16"]) == 0
    assert json.loads((tmp_path / "m16.json").read_text())["amp"] == "bfloat16"
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (75, 101, 3), dtype=np.uint8)).save(odd)
    assert pale_main(["det", "predict", str(odd), "-c", str(out / "last.safetensors"), "-o",
                      str(tmp_path / "pred"), "--score-thr", "0", "--device", "auto"]) == 0
    assert Image.open(tmp_path / "pred" / "odd_overlay.png").size == (101, 75)
    assert isinstance(json.loads((tmp_path / "pred" / "odd_detections.json").read_text()), list)
    capsys.readouterr()
    # the dense recipes train without EMA: asking for EMA weights is a one-line error
    assert pale_main(["det", "eval", "-c", str(out / "last.pth"), "--data", str(toy), "--split", "val",
                      "--weights", "ema"]) == 1
    assert "holds no EMA weights" in capsys.readouterr().err


@pytest.mark.slow
def test_training_beats_untrained_model(tmp_path):
    """A few hundred CPU steps on real photos with pasted objects: AP well above the untrained model's."""
    root = make_coco_dataset(tmp_path / "coco", {"train": 32, "val": 10}, size_range=(96, 128), obj_size=(16, 40))
    overrides = tiny_overrides(root, **{"data.min_size": "[96, 112, 128]", "data.test_min_size": 128,
                                        "data.max_size": 256, "batch_size": 2, "epochs": 8, "train.eval_every": 8,
                                        "optim.lr": 6e-4, "sched.warmup_updates": 20, "sched.decay_milestones": "[7]",
                                        "model.fpn_channels": 64, "model.roi_samples": 64})
    cfg = resolve_recipe({}, overrides, DetectionTask.defaults)
    task = DetectionTask(cfg)
    random_seed(cfg["seed"])
    untrained = task.build_model().eval()
    loader = torch.utils.data.DataLoader(task.val_dataset(), batch_size=2, collate_fn=task.collate_fn(False))
    before = evaluate_detector(untrained, loader, Runtime(torch.device("cpu")), task.val_set.coco, task.cat_ids)
    summary = run_training(DetectionTask, None, overrides, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    after = summary["last"]
    print(f"\ndet: untrained box AP {before['bbox_ap']:.2f} mask AP {before['segm_ap']:.2f}; "
          f"loss {history[0]['train_loss']:.3f} -> {history[-1]['train_loss']:.3f}; trained box AP "
          f"{after['val_bbox_ap']:.2f} (AP50 {after['val_bbox_ap50']:.2f}) mask AP {after['val_segm_ap']:.2f} "
          f"(AP50 {after['val_segm_ap50']:.2f})")
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert after["val_bbox_ap"] > before["bbox_ap"] + 20
    assert after["val_segm_ap"] > before["segm_ap"] + 20
