"""The training engine on a tiny generated image folder: every augmentation and the EMA run, resume
is exact (at an epoch boundary and after SIGTERM mid-epoch), bad input gets errors naming it,
non-finite losses stop or are skipped, checkpoints record both weights and their validation, a short
run's EMA is trained, validation runs in fp32, and `pale eval` reloads the export to the same top-1."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import pale  # noqa: F401
from pale.cli import main
from pale.checkpoint import create_model_from_file
from pale.files import load_torch
from pale.train import NonFiniteLossError, TrainingInterrupted, train
from pale.train.classification import ClassificationTask
from pale.train.data import write_image_folder

CLASSES = ["ant", "bee", "cat"]
TINY_MODEL = {"embed_dims": [16, 32, 32, 64], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4]}


def make_folder(root, n_train=24, n_val=12, size=40, seed=0):
    """3 classes told apart by the red channel's level, plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % len(CLASSES)
        images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        images[..., 0] = (labels[:, None, None] * 100 + rng.integers(0, 40, (n, size, size))).astype(np.uint8)
        write_image_folder(root / split, images, labels, CLASSES)
    return root


def tiny_recipe(**changes):
    """The ImageNet recipe's pipeline (AutoAugment with colour jitter, erasing, Mixup/CutMix, smoothing,
    drop path, EMA) on a tiny model and 32x32 inputs."""
    cfg = {
        "epochs": 2, "batch_size": 8, "seed": 0,
        "model": {"name": "pale_tiny", "kwargs": dict(TINY_MODEL), "drop_path_rate": 0.1},
        "data": {"img_size": 32},
        "optim": {"lr": 1e-3},
        "sched": {"warmup_epochs": 1},
        "ema": {"decay": 0.9},
        "train": {"workers": 0, "amp": "none", "progress": False},
    }
    for key, value in changes.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    return make_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    """An uninterrupted 2-epoch run of tiny_recipe(): (run folder, summary)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, train(tiny_recipe(), [f"data.root={folder}"], out)


def weights(path):
    ckpt = load_torch(path)
    return ckpt["model"], ckpt["model_ema"], ckpt


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Spy:
    """Counts calls of a method (and records what it returns)."""

    def __init__(self, monkeypatch, cls, name):
        self.calls, self.results = 0, []
        original = getattr(cls, name)

        def wrapper(obj, *args, **kwargs):
            self.calls += 1
            out = original(obj, *args, **kwargs)
            self.results.append(out)
            return out
        monkeypatch.setattr(cls, name, wrapper)


def test_dry_run_exercises_every_augmentation_and_the_ema(folder, tmp_path, monkeypatch):
    from timm.data.auto_augment import AutoAugment
    from timm.data.mixup import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from timm.layers import DropPath
    from torchvision.transforms import ColorJitter, RandomHorizontalFlip

    spies = {name: Spy(monkeypatch, cls, meth) for name, (cls, meth) in {
        "crop": (RandomResizedCropAndInterpolation, "__call__"), "flip": (RandomHorizontalFlip, "forward"),
        "autoaugment": (AutoAugment, "__call__"), "jitter": (ColorJitter, "forward"),
        "erasing": (RandomErasing, "__call__"), "mix": (Mixup, "_params_per_batch"),
        "drop_path": (DropPath, "forward")}.items()}
    # (colour jitter runs together with AutoAugment, which timm's create_transform would switch off)
    # with bf16 autocast, gradient accumulation, clipping and checkpointing switched on as well
    cfg = tiny_recipe(**{"aug.reprob": 1.0, "train.amp": "bf16", "epochs": 2, "batch_size": 4,
                         "train.accum_steps": 2, "train.clip_grad": 1.0, "train.grad_checkpointing": True})
    summary = train(cfg, [f"data.root={folder}"], tmp_path / "run")
    for name, spy in spies.items():
        assert spy.calls > 0, f"{name} never ran"
    assert spies["autoaugment"].calls == spies["jitter"].calls == spies["crop"].calls == 48
    # Mixup and CutMix (switch prob 0.5) both drawn, with mixing weights strictly inside (0, 1)
    kinds = {cutmix for lam, cutmix in spies["mix"].results}
    assert kinds == {True, False}
    assert all(0 < lam < 1 for lam, _ in spies["mix"].results)
    model, ema, ckpt = weights(tmp_path / "run" / "last.pth")
    assert ckpt["num_updates"] == 12  # 2 epochs x 24 images / (2 per micro-batch x 2 micro-batches per update)
    # EMA (decay 0.9 capped to 1 - 1/1.2 for 12 updates) lies strictly between the start and the trained weights
    moved = [k for k in model if model[k].is_floating_point() and not torch.equal(model[k], ema[k])]
    assert len(moved) > 0.9 * len([k for k in model if model[k].is_floating_point()])
    assert summary["last"]["ema_val_n"] == 12 and 0 <= summary["last"]["ema_val_top1"] <= 100
    assert ckpt["config"]["aug"]["auto_augment"] == "original"
    # trained under bf16 autocast, validated in fp32 (train.val_amp=false), and the history says so
    assert summary["last"]["val_precision"] == "fp32"
    dry = train(cfg, [f"data.root={folder}", "train.val_amp=true"], tmp_path / "dry", dry_run=True)
    assert dry["last"]["val_precision"] == "bf16"


def test_outputs_and_eval_reload_give_the_same_top1(folder, straight, tmp_path, capsys):
    out, summary = straight
    for name in ("last.pth", "best.pth", "best.safetensors", "last.safetensors", "metrics.jsonl", "curves.png",
                 "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"train_loss", "lr", "val_top1", "val_top5", "val_loss", "ema_val_top1", "val_precision"} <= set(history[0])
    best = summary["best"]
    # the better of the raw model and its EMA at each epoch competes for best.pth
    per_epoch = [max(h["val_top1"], h["ema_val_top1"]) for h in history]
    assert best["value"] == max(per_epoch) and best["epoch"] == 1 + per_epoch.index(best["value"])
    best_record = history[best["epoch"] - 1]
    prefix = {"raw": "val_", "ema": "ema_val_"}[best["weights"]]
    assert best["metric"] == prefix + "top1" and best_record[prefix + "top1"] == best["value"]
    # every checkpoint: both weights, the latest validation of both, the metric's name
    for name in ("last.pth", "best.pth"):
        ckpt = load_torch(out / name)
        record = history[ckpt["epoch"] - 1]
        assert ckpt["best_metric"] == "top1" and ckpt["model_ema"] is not None
        assert ckpt["val_metrics"]["raw"] == {k[4:]: float(v) for k, v in record.items()
                                              if k.startswith("val_") and k != "val_precision"}
        assert ckpt["val_metrics"]["ema"]["top1"] == record["ema_val_top1"]
        assert ckpt["val_metrics"]["ema"]["loss"] == record["ema_val_loss"]
    # best.safetensors holds the weights that won, and says which
    from pale.files import load_safetensors
    exported, meta = load_safetensors(out / "best.safetensors")
    assert meta["weights"] == best["weights"]
    assert_same_state(exported, load_torch(out / "best.pth")["model_ema" if best["weights"] == "ema" else "model"])
    assert main(["eval", str(out / "best.safetensors"), "--data", str(folder / "val"), "--output",
                 str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["top1"] == best["value"] and result["n"] == 12
    assert result["loss"] == pytest.approx(best_record[prefix + "loss"], rel=1e-5)
    assert result["top5"] == best_record[prefix + "top5"]
    assert "top1" in capsys.readouterr().out
    # the safetensors export loads through timm's own pretrained path and gives the same logits
    import timm
    model_st = timm.create_model("pale_tiny", pretrained=True, num_classes=3, **TINY_MODEL,
                                 pretrained_cfg_overlay=dict(file=str(out / "best.safetensors"), num_classes=3)).eval()
    model_file, info = create_model_from_file(out / "best.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model_st(x), model_file(x), rtol=0, atol=0)
    assert info["class_names"] == CLASSES


def test_a_short_run_hands_back_a_trained_ema(tmp_path):
    """60 updates with the ImageNet recipe's EMA decay 0.9998: capped to 1 - 1/6 for the run's length, the
    EMA validates like the raw model (uncapped it would still be at its random initialisation)."""
    data = make_folder(tmp_path / "data", n_train=24, n_val=30)
    cfg = tiny_recipe(**{"epochs": 20, "ema.decay": 0.9998, "aug.auto_augment": None, "aug.color_jitter": 0.0,
                         "aug.mixup": 0.0, "aug.cutmix": 0.0, "aug.reprob": 0.0, "train.eval_every": 20})
    summary = train(cfg, [f"data.root={data}"], tmp_path / "run")
    last = summary["last"]
    ckpt = load_torch(tmp_path / "run" / "last.pth")
    assert ckpt["num_updates"] == 60
    assert last["val_top1"] >= 90
    assert abs(last["ema_val_top1"] - last["val_top1"]) <= 10
    assert ckpt["val_metrics"]["ema"]["top1"] == last["ema_val_top1"]


def test_resume_is_exact(folder, straight, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, stop (SIGTERM during its validation), resume, 1 more epoch."""
    straight = straight[0]
    original = ClassificationTask.evaluate

    def evaluate_then_sigterm(self, model, batches, rt):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batches, rt)
    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate_then_sigterm)
    run = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        train(tiny_recipe(), [f"data.root={folder}"], run)
    ckpt = load_torch(run / "last.pth")
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["history"])) == (1, 0, 1)
    monkeypatch.setattr(ClassificationTask, "evaluate", original)
    train(None, [], resume=run / "last.pth")
    a_model, a_ema, a = weights(straight / "last.pth")
    b_model, b_ema, b = weights(run / "last.pth")
    assert b["epoch"] == 2
    assert_same_state(a_model, b_model)
    assert_same_state(a_ema, b_ema)
    for key in ("train_loss", "val_top1", "val_loss", "ema_val_loss", "lr"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def sigterm_during_training_batch(monkeypatch, n: int):
    """Make this process receive SIGTERM during its ``n``-th training batch; returns the unpatched
    ``ClassificationTask.training_loss``, to put back for the resumed run."""
    calls, original = {"n": 0}, ClassificationTask.training_loss

    def loss_then_sigterm(self, model, batch, rt):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batch, rt)
    monkeypatch.setattr(ClassificationTask, "training_loss", loss_then_sigterm)
    return original


def test_sigterm_mid_epoch_saves_and_resume_is_exact(folder, straight, tmp_path, monkeypatch):
    straight = straight[0]
    original = sigterm_during_training_batch(monkeypatch, 5)  # second epoch, second update
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_recipe(), [f"data.root={folder}"], run)
    assert info.value.code == 128 + signal.SIGTERM
    ckpt = load_torch(run / "last.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    monkeypatch.setattr(ClassificationTask, "training_loss", original)
    assert main(["train", "--resume", str(run / "last.pth")]) == 0
    a_model, a_ema, a = weights(straight / "last.pth")
    b_model, b_ema, b = weights(run / "last.pth")
    assert_same_state(a_model, b_model)
    assert_same_state(a_ema, b_ema)
    assert a["history"] == [dict(h, train_images_per_s=a["history"][i]["train_images_per_s"])
                            for i, h in enumerate(b["history"])]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ClassificationTask.training_loss

    def nan_in_epoch_two(self, model, batch, rt):
        calls["n"] += 1
        loss, n = original(self, model, batch, rt)
        return (loss * float("nan") if calls["n"] == 4 else loss), n
    monkeypatch.setattr(ClassificationTask, "training_loss", nan_in_epoch_two)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, update 1 .*last good checkpoint"):
        train(tiny_recipe(), [f"data.root={folder}"], run)
    assert load_torch(run / "last.pth")["epoch"] == 1
    calls["n"] = 0
    summary = train(tiny_recipe(), [f"data.root={folder}", "train.on_nonfinite=skip"], tmp_path / "skip")
    assert summary["skipped_nonfinite_batches"] == 1
    ckpt = load_torch(tmp_path / "skip" / "last.pth")
    assert ckpt["num_updates"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                             if v.is_floating_point())


def test_a_nonfinite_micro_batch_skips_its_whole_update(folder, tmp_path, monkeypatch):
    # accumulation over 2 micro-batches: the 4th (the second of epoch 1's update 2) is NaN; the update's
    # gradients, the finite first half's included, are dropped and the optimizer never sees them
    calls = {"n": 0}
    original = ClassificationTask.training_loss

    def nan_fourth(self, model, batch, rt):
        calls["n"] += 1
        loss, n = original(self, model, batch, rt)
        return (loss * float("nan") if calls["n"] == 4 else loss), n
    monkeypatch.setattr(ClassificationTask, "training_loss", nan_fourth)
    steps = Spy(monkeypatch, torch.optim.AdamW, "step")
    summary = train(tiny_recipe(), [f"data.root={folder}", "train.on_nonfinite=skip", "train.accum_steps=2"],
                    tmp_path / "run")
    assert summary["skipped_nonfinite_batches"] == 1 and steps.calls == 5
    ckpt = load_torch(tmp_path / "run" / "last.pth")
    assert ckpt["num_updates"] == 5 and ckpt["history"][0]["train_loss"] == ckpt["history"][0]["train_loss"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# Each of these used to train silently on a meaningless setting or to fail deep inside timm or torch
# (AssertionError, "Invalid learning rate", "bernoulli_ expects p to be in [0, 1]").
@pytest.mark.parametrize("override, message", [
    ("epochs=0", "epochs must be an integer >= 1, got 0"),
    ("batch_size=-4", "batch_size must be an integer >= 1, got -4"),
    ("optim.lr=-1", "optim.lr must be null or a number > 0, got -1"),
    ("optim.lr=fast", "optim.lr must be null or a number > 0, got 'fast'"),
    ("optim.weight_decay=-0.05", "optim.weight_decay must be null or a number >= 0"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers, each in [0, 1), got [0.9]"),
    ("optim.opt=adamww", "optim.opt 'adamww' is not a timm optimizer (did you mean adamw"),
    ("sched.sched=plateau", "sched.sched must be one of cosine, tanh, step, multistep, poly, none, got 'plateau'"),
    ("sched.min_lr=-1e-5", "sched.min_lr must be a number >= 0"),
    ("sched.decay_milestones=[8,3]", "sched.decay_milestones must be a list of numbers, each >= 0, in increasing order"),
    ("ema.decay=1.5", "ema.decay must be a number in [0, 1), got 1.5"),
    ("train.eval_every=0", "train.eval_every must be an integer >= 1, got 0"),
    ("train.accum_steps=0", "train.accum_steps must be an integer >= 1, got 0"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite must be one of stop, skip, got 'ignore'"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate must be a number in [0, 1), got 1.5"),
    ("data.img_size=2", "data.img_size must be an integer >= 3 or a list [height, width] of them"),
    ("data.crop_pct=0", "data.crop_pct must be a number in (0, 1], got 0"),
    ("data.std=[0,1,1]", "data.std must be null or a non-empty list of numbers, each > 0, got [0, 1, 1]"),
    ("aug.scale=[0.9,0.1]", "aug.scale must be a list of 2 numbers, each in (0, 1], in non-decreasing order"),
    ("aug.hflip=2", "aug.hflip must be a number in [0, 1], got 2"),
    ("aug.smoothing=1.5", "aug.smoothing must be a number in [0, 1), got 1.5"),
    ("aug.mixup=-1", "aug.mixup must be a number >= 0, got -1"),
])
def test_out_of_range_settings_are_refused_by_name(folder, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    assert main(["train", "--recipe", "small_data", "--data", str(folder), "-o", str(out), "--dry-run",
                 "--set", override]) == 1
    err = capsys.readouterr().err
    assert f"pale train: error: {message}" in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


def test_bad_input_errors_name_the_problem(folder, tmp_path, capsys):
    def fails(args, *needles):
        assert main(args) == 1
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err
        assert "Traceback" not in err

    recipe = tmp_path / "tiny.yaml"
    import yaml
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    base = ["train", "--recipe", str(recipe), "-o", str(tmp_path / "out")]
    fails(base + ["--data", str(tmp_path / "missing")], "data folder not found", str(tmp_path / "missing"))
    fails(["train", "--recipe", str(recipe), "--data", str(folder), "-o", str(recipe / "run")],
          f"run folder {recipe / 'run'}: {recipe} is a file, not a folder")
    fails(base + ["--data", str(folder), "--set", "aug.mixup_alpha=0.2"], "unknown recipe key 'aug.mixup_alpha'")
    fails(base + ["--data", str(folder), "--set", "train.attention_kernel=fastest"],
          "train.attention_kernel='fastest': ", "unknown attention kernel", "math, explicit")
    one_class = make_folder(tmp_path / "one_class", n_train=6, n_val=3)
    for extra in sorted((one_class / "train").iterdir())[1:]:
        shutil.rmtree(extra)
    fails(base + ["--data", str(one_class)], f"training folder {one_class / 'train'} has one class",
          "needs at least two class sub-folders")
    fails(base + ["--data", str(folder), "--set", "data.val_split=validation"],
          f"validation folder not found: {folder / 'validation'}", "data.val_split=null")
    empty = make_folder(tmp_path / "empty", n_train=6, n_val=3)
    (empty / "train" / "dog").mkdir()
    fails(base + ["--data", str(empty)], "class folder", str(empty / "train" / "dog"), "holds no images")
    broken = make_folder(tmp_path / "broken", n_train=12, n_val=6)
    bad = broken / "train" / "bee" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    fails(base + ["--data", str(broken)], "cannot read image", str(bad))
    # skipped and counted when asked
    summary = train(tiny_recipe(**{"epochs": 1}), [f"data.root={broken}", "data.skip_bad_images=true"],
                    tmp_path / "skip")
    assert summary["skipped_images"] == 1
    fails(["eval", str(tmp_path / "skip" / "best.pth"), "--data", str(tmp_path / "nothing")],
          "evaluation folder not found")


def test_a_fixed_attention_kernel_is_in_force_in_training_and_validation_and_then_undone(folder, tmp_path,
                                                                                       monkeypatch):
    from pale.models import attention_kernels as ak

    seen = []
    for name in ("training_loss", "evaluate"):
        original = getattr(ClassificationTask, name)

        def probe(self, *args, _original=original, _name=name):
            seen.append((_name, ak.get_kernel()))
            return _original(self, *args)
        monkeypatch.setattr(ClassificationTask, name, probe)
    before = ak.get_kernel()
    train(tiny_recipe(**{"epochs": 1, "train.attention_kernel": "math"}), [f"data.root={folder}"], tmp_path / "run")
    assert {kernel for _, kernel in seen} == {"math"} and {name for name, _ in seen} == {"training_loss", "evaluate"}
    assert ak.get_kernel() == before  # the process's choice comes back after the run


def test_more_loader_workers_than_cores_is_said_once(tmp_path, capsys):
    """The run's own warning, once; not PyTorch's, repeated for each loader and epoch."""
    import warnings
    from tiny_train import tiny_recipe as two_update_recipe, write_tiny_folder
    from pale.train.data import usable_cores
    data = write_tiny_folder(tmp_path / "data")
    workers = usable_cores() + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(two_update_recipe(data), ["epochs=2", f"train.workers={workers}"], tmp_path / "run")
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]
    err = capsys.readouterr().err
    assert err.count(f"warning: {workers} data loader processes for {usable_cores()} CPU core(s)") == 1, err


def test_resume_can_extend_the_schedule(folder, straight, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(straight[0] / "last.pth", run / "last.pth")
    assert main(["train", "--resume", str(run / "last.pth"), "--epochs", "3"]) == 0
    ckpt = load_torch(run / "last.pth")
    assert ckpt["epoch"] == 3 and ckpt["config"]["epochs"] == 3
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]
    assert ckpt["scheduler"]["t_initial"] == 3 * 3  # the cosine now spans 3 epochs of 3 updates
    assert ckpt["history"][2]["lr"] == pytest.approx(1e-5)  # and reaches min_lr at the new end
    assert ckpt["history"][:2] == load_torch(straight[0] / "last.pth")["history"]


@pytest.mark.parametrize("native", [False, True])
def test_amp_auto_on_cpu_uses_bf16_only_where_native_and_bf16_asked_where_emulated_warns(native, monkeypatch, capsys):
    import torch

    from pale.train import runtime
    monkeypatch.setattr(runtime, "native_bf16", lambda: native)
    assert runtime.setup_runtime("cpu", "auto").amp_dtype == (torch.bfloat16 if native else None)
    assert "warning" not in capsys.readouterr().err
    assert runtime.setup_runtime("cpu", "bf16").amp_dtype == torch.bfloat16  # asked for: used, and on an
    err = capsys.readouterr().err                                          # emulating CPU said to be slow
    assert ("bf16 runs emulated, far slower than float32" in err) == (not native)


@pytest.mark.parametrize("num_classes", [3, 10])
def test_evaluate_classifier_counts_match_a_direct_computation(num_classes):
    import torch.nn.functional as F

    from pale.train.classification import evaluate_classifier
    from pale.train.runtime import Runtime

    g = torch.Generator().manual_seed(num_classes)
    batches = [(torch.randn(n, num_classes, generator=g), torch.randint(0, num_classes, (n,), generator=g))
               for n in (7, 5)]
    logits, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    rank = (logits > logits.gather(1, targets[:, None])).sum(1)   # classes scored above the target
    got = evaluate_classifier(torch.nn.Identity(), batches, Runtime(torch.device("cpu")))
    assert got["n"] == 12
    assert got["top1"] == pytest.approx(100 * (rank == 0).float().mean().item())
    assert got["top5"] == pytest.approx(100 * (rank < 5).float().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    if num_classes <= 5:
        assert got["top5"] == 100.0


def test_adamw_is_the_fused_kernel_and_updates_like_the_loop():
    """The engine's AdamW runs PyTorch's fused kernel on the CPU; the same three updates as the loop."""
    from pale.train.build import build_optimizer
    from pale.train.run import resolve_config

    cfg = resolve_config(tiny_recipe(**{"optim.weight_decay": 0.05}))
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        start = model[0].weight.detach().clone()
        opt = build_optimizer(model, cfg)
        assert all(group["fused"] for group in opt.param_groups)
        assert len(opt.param_groups) == 2  # decay on the weights only, as without fusing
        if not fused:
            for group in opt.param_groups:
                group["fused"] = None
        x = torch.randn(4, 6)
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert (results[0][0] - start).abs().min() > 1e-4  # every weight moved
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
