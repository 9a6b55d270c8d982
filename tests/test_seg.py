"""UperNet + Pale segmentation: any input size, evaluators against hand-worked numbers, data errors,
backbone initialisation, training on the engine (short here, long behind `slow`), eval / predict CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pale.checkpoint import WeightsMismatchError, save_checkpoint
from pale.files import save_safetensors
from pale.cli import main as pale_main
from pale.dense.engine import run_training
from pale.dense.overlay import palette
from pale.dense.seg_data import SegmentationFolder, SegTrainTransform, label_lookup, load_label, scan_label_ids
from pale.dense.seg_eval import confusion_matrix, segment, segmentation_metrics
from pale.dense.seg_task import SegmentationTask, evaluate_segmenter, inference_settings, seg_loss
from pale.train import Runtime, resolve_recipe
from pale.dense.toydata import make_ade_dataset
from pale.dense.upernet import PaleUperNet
from timm.utils import random_seed

from dense_tiny import TINY, TINY_YAML


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_ade_dataset(tmp_path_factory.mktemp("ade"), {"training": 8, "validation": 3}, size_range=(64, 96),
                            obj_size=(12, 28))


def tiny_overrides(root: Path, **extra) -> list:
    cfg = {"data.root": str(root), "data.num_classes": 3, "data.reduce_zero_label": "false",
           "data.iters_per_epoch": 4, "data.scale": "[96, 64]", "data.crop_size": "[64, 64]", "test.scale": "null",
           "batch_size": 2, "epochs": 2, "train.eval_every": 1, "train.workers": 0, "train.amp": "none",
           "train.progress": "false", "optim.lr": 1e-3, "sched.warmup_updates": 2, "model.decoder_channels": 32,
           "model.drop_path_rate": 0.0, "model.kwargs": TINY_YAML}
    cfg.update(extra)
    return [f"{k}={v}" for k, v in cfg.items()]


# ---- model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(375, 500), (33, 47), (64, 64), (97, 31)])
def test_any_input_size_gives_logits_of_that_size(size):
    model = PaleUperNet("pale_tiny", 5, 32, **TINY).eval()
    x = torch.randn(2, 3, *size)
    logits, aux = model(x, with_aux=True)
    assert logits.shape == (2, 5, *size) and aux.shape == (2, 5, *size)
    assert torch.isfinite(logits).all()
    # padding is at the bottom/right and cropped away: the top-left of a padded input is unchanged
    # only up to the receptive field, but a size that needs no padding must equal its own crop run
    with torch.no_grad():
        assert torch.equal(model(x), logits)


def test_bad_model_input():
    model = PaleUperNet("pale_tiny", 3, 32, **TINY).eval()
    with pytest.raises(ValueError, match="expected an image batch"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="backbone"):
        PaleUperNet("resnet50", 3)


def test_backbone_initialisation_from_imagenet_checkpoint(tmp_path):
    import timm

    classifier = timm.create_model("pale_tiny", num_classes=10, **TINY)
    save_checkpoint(tmp_path / "cls.pth", classifier, "pale_tiny", dict(TINY, num_classes=10))
    save_safetensors(classifier.state_dict(), tmp_path / "cls.safetensors")
    for path in (tmp_path / "cls.pth", tmp_path / "cls.safetensors"):
        model = PaleUperNet("pale_tiny", 3, 32, **TINY)
        model.load_pretrained(path)
        got = model.trunk.state_dict()
        for k, v in classifier.state_dict().items():
            if k in got:
                assert torch.equal(got[k], v), k
        assert set(got) <= set(classifier.state_dict())
    other = timm.create_model("pale_tiny", num_classes=10, embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1),
                              num_heads=(2, 2, 2, 2))
    save_safetensors(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"keys with another shape[\s\S]*\(32,\) vs \(16,\)"):
        PaleUperNet("pale_tiny", 3, 32, **TINY).load_pretrained(tmp_path / "other.safetensors")


# ---- evaluators -----------------------------------------------------------------------------------

def test_metrics_match_hand_computation():
    # 3 classes, one 255 pixel. gt / pred pairs:
    # (0,0) (0,0) (0,1) (1,1) (1,1) (1,2) (2,2) (255, 0)
    gt = torch.tensor([0, 0, 0, 1, 1, 1, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 1]]
    m = segmentation_metrics(conf)
    # IoU: class 0: 2/(3+2-2)=2/3; class 1: 2/(3+3-2)=1/2; class 2: 1/(1+2-1)=1/2
    assert m["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1 / 2) / 3)
    # Acc: 2/3, 2/3, 1/1
    assert m["macc"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)
    assert m["aacc"] == pytest.approx(100 * 5 / 7)


def test_metrics_skip_absent_classes_like_mmseg():
    # class 2 never in gt nor predicted: left out; class 1 predicted but absent from gt: IoU 0, no Acc
    conf = confusion_matrix(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 0, 0]), 3)
    m = segmentation_metrics(conf)
    assert math.isnan(m["class_iou"][2]) and m["class_iou"][1] == 0.0
    assert m["miou"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    assert m["macc"] == pytest.approx(75.0)


class Pointwise(torch.nn.Module):
    """A per-pixel model: every inference mode must agree with it exactly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_slide_and_flip_agree_with_whole_for_a_per_pixel_model():
    torch.manual_seed(0)
    model, x = Pointwise().eval(), torch.randn(1, 3, 45, 70)
    whole = segment(model, x, 4, test_scale=None)
    assert torch.allclose(whole, model(x).softmax(1), atol=1e-6)
    slide = segment(model, x, 4, test_scale=None, mode="slide", crop=(16, 32), stride=(11, 21))
    assert torch.allclose(slide, whole, atol=1e-6)
    flipped = segment(model, x, 4, test_scale=None, flip=True)
    assert torch.allclose(flipped, whole, atol=1e-6)
    ms = segment(model, x, 4, test_scale=None, scales=(0.75, 1.0, 1.5), flip=True)
    assert ms.shape == whole.shape and torch.allclose(ms.sum(1), torch.ones(1, 45, 70), atol=1e-5)


def test_segment_rescales_to_test_scale_and_back():
    seen = []

    class Spy(Pointwise):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    probs = segment(Spy().eval(), torch.randn(1, 3, 375, 500), 4, test_scale=(2048, 512))
    assert seen == [(512, 683)] and probs.shape == (1, 4, 375, 500)


# ---- data -----------------------------------------------------------------------------------------

def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_reduce_zero_label_and_ranges(tmp_path):
    _write(tmp_path / "l.png", np.array([[0, 1, 2, 3]], dtype=np.uint8))
    path = str(tmp_path / "l.png")
    assert load_label(path, (1, 4), "img", label_lookup([1, 2, 3], True)).tolist() == [[255, 0, 1, 2]]
    assert load_label(path, (1, 4), "img", label_lookup([0, 1, 2, 3], False)).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"l\.png has label id\(s\) 3 that are not among the 3 classes \(ids 0\.\.2"):
        load_label(path, (1, 4), "img", label_lookup([0, 1, 2], False))


def test_sparse_label_ids_map_to_consecutive_classes(tmp_path):
    _write(tmp_path / "l.png", np.array([[0, 1, 3, 255, 3]], dtype=np.uint8))
    lookup = label_lookup([1, 3], reduce_zero_label=True)
    assert load_label(str(tmp_path / "l.png"), (1, 5), "img", lookup).tolist() == [[255, 0, 1, 255, 1]]
    assert scan_label_ids([("img", str(tmp_path / "l.png"))], reduce_zero_label=True) == [1, 3]
    assert scan_label_ids([("img", str(tmp_path / "l.png"))], reduce_zero_label=False) == [0, 1, 3]
    _write(tmp_path / "e.png", np.array([[0, 255]], dtype=np.uint8))
    with pytest.raises(ValueError, match="hold no class ids besides ignore"):
        scan_label_ids([("img", str(tmp_path / "e.png"))], reduce_zero_label=True)


def test_bad_data_errors_name_the_file(tmp_path):
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    _write(tmp_path / "images" / "training" / "a.jpg", img)
    with pytest.raises(FileNotFoundError, match=r"annotations/training/a\.png"):
        SegmentationFolder(tmp_path, "training", 3)
    _write(tmp_path / "annotations" / "training" / "a.png", np.zeros((21, 30), dtype=np.uint8))
    ds = SegmentationFolder(tmp_path, "training", 3)
    with pytest.raises(ValueError, match=r"a\.png is 30x21 \(WxH\) but its image .*a\.jpg is 30x20"):
        ds[0]
    # a phone photo stored sideways is read upright; a mask drawn on the stored pixels no longer fits, and the
    # error says why
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "images" / "training" / "a.jpg", exif=exif)
    _write(tmp_path / "annotations" / "training" / "a.png", np.zeros((20, 30), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"a\.jpg is 20x30 \(turned upright by its EXIF orientation tag"):
        ds[0]
    _write(tmp_path / "images" / "training" / "a.jpg", img)
    _write(tmp_path / "annotations" / "training" / "a.png", np.full((20, 30), 7, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"a\.png has label id\(s\) 7"):
        SegmentationFolder(tmp_path, "training", 3)[0]
    (tmp_path / "images" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"images/empty holds no images"):
        SegmentationFolder(tmp_path, "empty", 3)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        SegmentationFolder(tmp_path, "nope", 3)


def test_train_transform_crops_pads_and_keeps_labels_aligned(toy):
    ds = SegmentationFolder(toy, "training", 3, transform=SegTrainTransform((96, 64), (0.5, 2.0), (64, 64),
                                                                             photometric=False))
    random_seed(0)
    for i in range(4):
        image, label = ds[i]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64)
        assert set(label.unique().tolist()) <= {0, 1, 2, 255}
        # discs/squares are pasted in fixed colours: where the label says object, the image shows it
        yellow = (label == 1)
        if yellow.sum() > 20:
            mean = torch.tensor([0.485, 0.456, 0.406])[:, None]
            std = torch.tensor([0.229, 0.224, 0.225])[:, None]
            rgb = image[:, yellow] * std + mean
            assert rgb[0].mean() > 0.7 and rgb[2].mean() < 0.4


# ---- training on the engine -----------------------------------------------------------------------

def test_short_training_lowers_loss_and_eval_reproduces_it(toy, tmp_path):
    out = tmp_path / "run"
    summary = run_training(SegmentationTask, None, tiny_overrides(toy, epochs=3, **{"optim.lr": 2e-3}), out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("last.pth", "best.pth", "best.safetensors", "curves.png", "summary.json"):
        assert (out / name).is_file()
    last = history[-1]
    assert pale_main(["seg", "eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(toy),
                      "--test-scale", "0", "0", "--json-out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["miou"] == pytest.approx(last["val_miou"], abs=1e-6)
    assert metrics["aacc"] == pytest.approx(last["val_aacc"], abs=1e-6)
    assert metrics["amp"] == "none" and metrics["weights"] == "raw"  # fp32 unless asked
    assert pale_main(["seg", "eval", "-c", str(out / "last.pth"), "--data", str(toy), "--test-scale", "0", "0",
                      "--amp", "bf16", "-o", str(tmp_path / "bf16.json")]) == 0
    bf16 = json.loads((tmp_path / "bf16.json").read_text())
    assert bf16["amp"] == "bfloat16" and bf16["miou"] == pytest.approx(metrics["miou"], abs=5.0)
    assert summary["epochs"] == 3
    # resume continues from the checkpoint with the stored recipe
    run_training(SegmentationTask, None, ["epochs=4"], None, resume=out / "last.pth")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_predict_writes_overlays_of_the_input_size(toy, tmp_path):
    task = SegmentationTask(resolve_recipe(
        {}, tiny_overrides(toy), SegmentationTask.defaults))
    model = task.build_model()
    save_safetensors(model.state_dict(), tmp_path / "m.safetensors", metadata=task.model_info())
    photo = tmp_path / "odd.png"
    _write(photo, np.random.default_rng(0).integers(0, 255, (75, 101, 3), dtype=np.uint8))
    assert pale_main(["seg", "predict", str(photo), "--checkpoint", str(tmp_path / "m.safetensors"),
                      "-o", str(tmp_path / "pred"), "--test-scale", "0", "0", "--flip"]) == 0
    overlay = Image.open(tmp_path / "pred" / "odd_overlay.png")
    labels = np.asarray(Image.open(tmp_path / "pred" / "odd_labels.png"))
    # the overlay is the image plus a legend strip below it
    assert overlay.width == 101 and overlay.height > 75 and labels.shape == (75, 101) and labels.max() < 3
    assert pale_main(["seg", "predict", str(tmp_path / "missing.jpg"), "--checkpoint",
                      str(tmp_path / "m.safetensors")]) == 1
    # inputs with one name in two folders (and two suffixes) each keep their outputs; they overwrote each other
    for name in ("a/x.png", "b/x.png", "b/x.jpg"):
        (tmp_path / "many" / name).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path / "many" / name, np.zeros((40, 50, 3), np.uint8))
    assert pale_main(["seg", "predict", str(tmp_path / "many"), "--checkpoint", str(tmp_path / "m.safetensors"),
                      "-o", str(tmp_path / "many_pred"), "--test-scale", "0", "0"]) == 0
    written = sorted(p.relative_to(tmp_path / "many_pred").as_posix() for p in (tmp_path / "many_pred").rglob("*.png"))
    assert written == ["a/x_labels.png", "a/x_overlay.png", "b/x_jpg_labels.png", "b/x_jpg_overlay.png",
                       "b/x_png_labels.png", "b/x_png_overlay.png"]


def _remapped_copy(toy: Path, dest: Path, mapping: dict) -> Path:
    """The toy data set with annotation ids replaced through ``mapping``."""
    import shutil

    shutil.copytree(toy, dest)
    for ann in (dest / "annotations").rglob("*.png"):
        label = np.asarray(Image.open(ann))
        _write(ann, np.vectorize(mapping.get)(label).astype(np.uint8))
    return dest


def test_predictions_use_the_data_sets_own_ids_and_the_overlay_has_a_legend(toy, tmp_path, capsys):
    data = _remapped_copy(toy, tmp_path / "ids13", {0: 1, 1: 3, 2: 3})  # ground truth uses ids {1, 3}
    overrides = [o for o in tiny_overrides(data) if not o.startswith("data.num_classes=")]
    task = SegmentationTask(resolve_recipe({}, overrides, SegmentationTask.defaults))
    assert task.label_ids == [1, 3] and task.num_classes == 2  # counted from the data, no default of 150
    info = task.model_info()
    assert info["model_kwargs"]["num_classes"] == 2 and info["data_config"]["label_ids"] == [1, 3]
    torch.manual_seed(0)
    save_safetensors(task.build_model().state_dict(), tmp_path / "m.safetensors", metadata=info)
    photo = next((data / "images" / "validation").iterdir())
    assert pale_main(["seg", "predict", str(photo), "-c", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "p"),
                      "--test-scale", "0", "0", "--device", "auto"]) == 0
    labels = np.asarray(Image.open(tmp_path / "p" / f"{photo.stem}_labels.png"))
    assert set(np.unique(labels).tolist()) <= {1, 3}
    image = Image.open(photo)
    overlay = Image.open(tmp_path / "p" / f"{photo.stem}_overlay.png")
    assert overlay.width == image.width and overlay.height > image.height  # legend strip below the image
    legend = np.asarray(overlay)[image.height:]
    colours = palette(2)
    for k in np.unique(labels):  # each predicted class's swatch is drawn in its colour
        assert (legend == colours[[1, 3].index(int(k))]).all(-1).any()
    # eval reads the same ids from the checkpoint: a ground-truth id it does not know is named
    assert pale_main(["seg", "eval", "-c", str(tmp_path / "m.safetensors"), "--data", str(toy), "--test-scale", "0", "0",
                      "-o", str(tmp_path / "e.json")]) == 1
    assert "label id(s) 0" in capsys.readouterr().err


def test_segmentation_data_without_class_ids_is_refused(toy, tmp_path):
    data = _remapped_copy(toy, tmp_path / "empty", {0: 255, 1: 255, 2: 255})
    overrides = [o for o in tiny_overrides(data) if not o.startswith("data.num_classes=")]
    with pytest.raises(ValueError, match="hold no class ids besides ignore"):
        SegmentationTask(resolve_recipe({}, overrides, SegmentationTask.defaults))


def test_empty_data_folder_fails_before_training(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        run_training(SegmentationTask, None, tiny_overrides(tmp_path), tmp_path / "run")


def test_the_loss_averages_labelled_pixels_and_is_zero_on_a_crop_without_any():
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits, aux = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, :2] = 255
    expected = F.cross_entropy(logits, labels, ignore_index=255) + 0.4 * F.cross_entropy(aux, labels, ignore_index=255)
    assert torch.allclose(seg_loss((logits, aux), labels, 0.4), expected)
    assert torch.allclose(seg_loss((logits, None), labels, 0.4), F.cross_entropy(logits, labels, ignore_index=255))
    # a crop of pure background under reduce_zero_label: every pixel ignored. PyTorch's mean gives NaN
    # there, which stopped training as a non-finite loss
    ignored = torch.full((2, 4, 5), 255)
    assert torch.isnan(F.cross_entropy(logits, ignored, ignore_index=255))
    loss = seg_loss((logits, aux), ignored, 0.4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_stopped_run_says_to_continue_with_pale_seg_train(toy, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from pale.train import TrainingInterrupted

    recipe_loss, calls = SegmentationTask.training_loss, []

    def loss_then_sigterm(self, *args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the run stops after this update
        return recipe_loss(self, *args)
    monkeypatch.setattr(SegmentationTask, "training_loss", loss_then_sigterm)
    with pytest.raises(TrainingInterrupted):
        run_training(SegmentationTask, None, tiny_overrides(toy), tmp_path / "run")
    last = tmp_path / "run" / "last.pth"
    assert f"continue with: pale seg train --resume {last} (or the same command with --resume auto)" in \
        capsys.readouterr().err
    assert last.is_file()


def test_one_image_per_forward_is_refused_before_training(toy, tmp_path):
    # the pyramid pooling's BatchNorm over 1x1 maps fails on one image (a ValueError deep in the first
    # update; under torchrun with --batch-size 2 on 2 processes)
    with pytest.raises(ValueError, match=r"batch_size 1 gives 1 image per forward .* set --batch-size 2 or more"):
        run_training(SegmentationTask, None, tiny_overrides(toy, batch_size=1), tmp_path / "run")
    with pytest.raises(ValueError, match=r"batch_size 2 gives 1 image per forward .* set --batch-size 4 or more"):
        run_training(SegmentationTask, None, tiny_overrides(toy, batch_size=2, **{"train.accum_steps": 2}),
                     tmp_path / "run")
    assert not (tmp_path / "run" / "last.pth").exists()


@pytest.mark.slow
def test_training_beats_untrained_model(tmp_path):
    """A few hundred CPU steps on real photos with pasted objects: mIoU well above the untrained model's."""
    root = make_ade_dataset(tmp_path / "ade", {"training": 40, "validation": 10})
    overrides = tiny_overrides(root, **{"data.iters_per_epoch": 50, "data.scale": "[160, 96]",
                                        "data.crop_size": "[96, 96]", "batch_size": 4, "epochs": 6,
                                        "train.eval_every": 3, "model.decoder_channels": 64,
                                        "sched.warmup_updates": 30})
    cfg = resolve_recipe({}, overrides, SegmentationTask.defaults)
    task = SegmentationTask(cfg)
    random_seed(cfg["seed"])
    untrained = task.build_model().eval()
    loader = torch.utils.data.DataLoader(task.val_dataset(), batch_size=1, collate_fn=task.collate_fn(False))
    with torch.no_grad():
        before = evaluate_segmenter(untrained, loader, Runtime(torch.device("cpu")), 3,
                                    inference_settings(cfg))
    summary = run_training(SegmentationTask, None, overrides, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    after = summary["last"]
    print(f"\nseg: untrained mIoU {before['miou']:.2f} mAcc {before['macc']:.2f} aAcc {before['aacc']:.2f}; "
          f"loss {history[0]['train_loss']:.3f} -> {history[-1]['train_loss']:.3f}; "
          f"trained mIoU {after['val_miou']:.2f} mAcc {after['val_macc']:.2f} aAcc {after['val_aacc']:.2f}")
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert after["val_miou"] > before["miou"] + 25
    assert after["val_miou"] > 60
