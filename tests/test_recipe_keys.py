"""Every recipe key reaches the computation it names.

:data:`CHECKS` maps each key of the defaults (the engine's and the classification task's) and of the
shipped recipes to a check that sets the key to a value other than its default and finds that value
where it acts: the loss of a known batch, the gradient norm the optimizer applies, the optimizer's
parameter groups, the scheduler's rates, the EMA's decay, drop path, the transforms, the loaders.
A key without an entry fails :func:`test_every_recipe_key_has_a_check`, so a new key needs a check.
A few keys that only act across restarts are shown by the resume tests, named here by their test.
Tiny runs: a 4-block model on 8 images of 24x24, a trainer built without training, or a dry run
(two updates, two validation batches, nothing written)."""
import importlib
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pale  # noqa: F401
from pale.train import TASKS, Trainer, train
from pale.train.classification import ClassificationTask
from pale.train.recipe import load_yaml, recipe_path, shipped_recipes
from pale.train.run import resolve_config, task_defaults
from tiny_train import tiny_recipe, write_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny folder (8 training, 4 validation images, two classes) with a third split ``few`` (4 of
    the training images) and a copy with 6 training images elsewhere (``other``)."""
    root = write_tiny_folder(tmp_path_factory.mktemp("data"))
    for cls in ("a", "b"):
        (root / "few" / cls).mkdir(parents=True)
        for path in sorted((root / "train" / cls).iterdir())[:2]:
            shutil.copy(path, root / "few" / cls / path.name)
    other = shutil.copytree(root, tmp_path_factory.mktemp("other") / "data")
    for cls in ("a", "b"):
        sorted((other / "train" / cls).iterdir())[0].unlink()
    return root, other


RUNS = {}  # whole runs, shared by the checks that read the same run


class Context:
    """What a check needs: a built trainer, a dry run, a whole run, for the tiny recipe and overrides."""

    def __init__(self, data, tmp_path, monkeypatch, capsys):
        self.root, self.other = data
        self.tmp, self.monkeypatch, self.capsys = tmp_path, monkeypatch, capsys

    def cfg(self, *overrides, recipe=None):
        return resolve_config(recipe or tiny_recipe(self.root), list(overrides))

    def trainer(self, *overrides, recipe=None, dry_run=True):
        cfg = self.cfg(*overrides, recipe=recipe)
        trainer = Trainer(TASKS[cfg["task"]](cfg), cfg, self.tmp / "run", dry_run=dry_run)
        return trainer

    def dry_run(self, *overrides):
        return train(tiny_recipe(self.root), list(overrides), self.tmp / "dry", dry_run=True)

    def run(self, *overrides):
        """``(run folder, summary)`` of a whole run (cached per overrides)."""
        if overrides not in RUNS:
            out = self.tmp / "whole"
            RUNS[overrides] = out, train(tiny_recipe(self.root), list(overrides), out)
        return RUNS[overrides]

    def during_loss(self, probe):
        """Calls ``probe(task, model, batch, rt)`` at every training loss; returns the list of results."""
        seen, original = [], ClassificationTask.training_loss

        def loss(task, model, batch, rt):
            seen.append(probe(task, model, batch, rt))
            return original(task, model, batch, rt)
        self.monkeypatch.setattr(ClassificationTask, "training_loss", loss)
        return seen


def transforms(trainer, train_split=True):
    """The flat list of the training (or evaluation) transform's steps."""
    ds = trainer.train_loader.dataset.dataset if train_split else trainer.val_loader.dataset
    return list(ds.transform.transforms)


def step_of(trainer, name, train_split=True):
    found = [t for t in transforms(trainer, train_split) if type(t).__name__ == name]
    assert len(found) == 1, (name, transforms(trainer, train_split))
    return found[0]


def lr_at(trainer, update):
    trainer.scheduler.step_update(num_updates=update)
    return trainer.optimizer.param_groups[0]["lr"]


def step_gradients(ctx, *overrides):
    """``(total norm, largest |value|)`` of the gradients at each optimizer step of a dry run (after
    clipping: torch's step pre-hook runs inside ``optimizer.step``)."""
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad.detach().float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item(),
                     max(g.abs().max().item() for g in grads)))
    handle = register_optimizer_step_pre_hook(hook)
    try:
        ctx.dry_run(*overrides)
    finally:
        handle.remove()
    assert len(seen) == 2
    return seen


# ---- engine keys -------------------------------------------------------------------------------

def check_task(ctx):
    class Toy(ClassificationTask):
        losses = 0

        def training_loss(self, model, batch, rt):
            Toy.losses += 1
            return super().training_loss(model, batch, rt)
    ctx.monkeypatch.setitem(TASKS, "toy", Toy)
    train(tiny_recipe(ctx.root), ["task=toy"], ctx.tmp / "toy", dry_run=True)
    assert Toy.losses == 2


def check_epochs(ctx):
    out, summary = ctx.run("epochs=2")
    assert summary["epochs"] == 2 and [h["epoch"] for h in summary_history(out)] == [1, 2]


def summary_history(out):
    from pale.files import load_torch
    return load_torch(out / "last.pth")["history"]


def check_batch_size(ctx):
    t = ctx.trainer("batch_size=2")
    assert (t.batch_per_device, t.train_loader.batch_size, t.updates_per_epoch) == (2, 2, 4)


def check_seed(ctx):
    def weights(seed):
        return [p.detach().clone() for p in ctx.trainer(f"seed={seed}").model.parameters()]
    one, again, zero = weights(1), weights(1), weights(0)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not all(torch.equal(a, b) for a, b in zip(one, zero))


def check_opt(ctx):
    assert type(ctx.trainer("optim.opt=sgd").optimizer) is torch.optim.SGD
    assert type(ctx.trainer().optimizer) is torch.optim.AdamW


def check_lr(ctx):
    t = ctx.trainer("optim.lr=0.02")
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.02, 0.02]


def check_lr_base(ctx):
    t = ctx.trainer("optim.lr=null", "optim.lr_base=2e-3")
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 4 / 1024)


def check_lr_base_size(ctx):
    t = ctx.trainer("optim.lr=null", "optim.lr_base_size=512")
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 512)


def check_weight_decay(ctx):
    t = ctx.trainer("optim.weight_decay=0.07")
    names = {id(p): n for n, p in t.model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in t.optimizer.param_groups}
    assert set(decay) == {0.0, 0.07}
    no_decay = {n for n, p in t.model.named_parameters() if p.ndim <= 1} | set(t.model.no_weight_decay())
    assert decay[0.0] == no_decay and decay[0.07] == set(names.values()) - no_decay


def check_betas(ctx):
    assert {g["betas"] for g in ctx.trainer("optim.betas=[0.8, 0.99]").optimizer.param_groups} == {(0.8, 0.99)}


def check_eps(ctx):
    assert {g["eps"] for g in ctx.trainer("optim.eps=1e-6").optimizer.param_groups} == {1e-6}


def check_momentum(ctx):
    t = ctx.trainer("optim.opt=sgd", "optim.momentum=0.5")
    assert {g["momentum"] for g in t.optimizer.param_groups} == {0.5}


def check_layer_decay(ctx):
    t = ctx.trainer("optim.layer_decay=0.5")
    scales = sorted({g["lr_scale"] for g in t.optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[-2] == 0.5  # the head 1, the layer below it 0.5
    assert {g["lr"] for g in t.optimizer.param_groups} == {1e-2 * s for s in scales}


def check_sched(ctx):
    assert type(ctx.trainer("sched.sched=tanh").scheduler).__name__ == "TanhLRScheduler"
    assert type(ctx.trainer().scheduler).__name__ == "CosineLRScheduler"
    assert ctx.trainer("sched.sched=none").scheduler is None


def check_warmup_epochs(ctx):
    t = ctx.trainer("sched.warmup_epochs=1", "sched.warmup_lr=1e-4")   # 2 updates of warm-up
    assert lr_at(t, 1) == pytest.approx(1e-4 + (1e-2 - 1e-4) / 2)


def check_warmup_lr(ctx):
    t = ctx.trainer("sched.warmup_epochs=1", "sched.warmup_lr=1e-4")
    assert lr_at(t, 0) == pytest.approx(1e-4)


def check_min_lr(ctx):
    t = ctx.trainer("epochs=2", "sched.min_lr=1e-3")
    assert lr_at(t, 2) == pytest.approx(1e-3 + (1e-2 - 1e-3) / 2) and lr_at(t, 4) == pytest.approx(1e-3)


def check_cooldown_epochs(ctx):
    """timm's meaning: the schedule spans ``epochs``, then ``cooldown_epochs`` more at ``min_lr``."""
    out, summary = ctx.run("sched.cooldown_epochs=1", "sched.min_lr=1e-3")
    history = summary_history(out)
    assert summary["epochs"] == 2 and [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["lr"] == pytest.approx(1e-3)


def check_decay_rate(ctx):
    t = ctx.trainer("epochs=3", "sched.sched=multistep", "sched.decay_milestones=[1]", "sched.decay_rate=0.25")
    assert lr_at(t, 0) == pytest.approx(1e-2) and lr_at(t, 3) == pytest.approx(2.5e-3)


def check_decay_milestones(ctx):
    # (timm's multistep switches one update before the milestone's first update, here update 4 of 2 per epoch)
    t = ctx.trainer("epochs=3", "sched.sched=multistep", "sched.decay_milestones=[2]")
    assert lr_at(t, 2) == pytest.approx(1e-2) and lr_at(t, 3) == pytest.approx(1e-3)


def check_warmup_updates(ctx):
    t = ctx.trainer("epochs=3", "sched.warmup_updates=4", "sched.warmup_lr=0")
    assert lr_at(t, 1) == pytest.approx(1e-2 / 4) and lr_at(t, 3) == pytest.approx(1e-2 * 3 / 4)


def check_step_on_epochs(ctx):
    overrides = ("epochs=3", "sched.warmup_epochs=1", "sched.warmup_lr=1e-4")
    by_epoch = ctx.trainer(*overrides, "sched.step_on_epochs=true")
    assert lr_at(by_epoch, 1) == pytest.approx(1e-4)   # an update within the first epoch changes nothing
    by_epoch.scheduler.step(1)
    assert by_epoch.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(ctx.trainer(*overrides), 2))


def check_ema_enabled(ctx):
    assert ctx.trainer("ema.enabled=false").ema is None and ctx.trainer().ema is not None


def check_ema_decay(ctx):
    assert ctx.trainer("ema.decay=0.3", "ema.max_window=null").ema.decay == pytest.approx(0.3)


def check_ema_warmup(ctx):
    ema = ctx.trainer("ema.warmup=true", "ema.decay=0.9", "ema.max_window=null").ema
    assert ema.get_decay(10) == pytest.approx(1 - 10 ** (-2 / 3))  # timm: 1 - (1 + step - 1)^(-2/3)
    assert ctx.trainer("ema.decay=0.9", "ema.max_window=null").ema.get_decay(10) == pytest.approx(0.9)


def check_ema_max_window(ctx):
    # 2 updates in the run: a window of all of them caps the decay at 1 - 1/2
    assert ctx.trainer("ema.decay=0.9", "ema.max_window=1.0").ema.decay == pytest.approx(0.5)


def check_device(ctx):
    if torch.cuda.is_available():
        assert ctx.trainer("train.device=cuda").rt.device.type == "cuda"
    else:
        with pytest.raises(ValueError, match="'cuda' asked for, but CUDA is not available"):
            ctx.trainer("train.device=cuda")


def autocast_state(*args):
    return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")


def check_amp(ctx):
    seen = ctx.during_loss(autocast_state)
    ctx.dry_run("train.amp=bf16")
    assert set(seen) == {(True, torch.bfloat16)}


def check_val_amp(ctx):
    seen, original = [], ClassificationTask.evaluate

    def evaluate(task, model, batches, rt):
        seen.append(autocast_state())
        return original(task, model, batches, rt)
    ctx.monkeypatch.setattr(ClassificationTask, "evaluate", evaluate)
    assert ctx.dry_run("train.amp=bf16", "train.val_amp=true")["last"]["val_precision"] == "bf16"
    assert set(seen) == {(True, torch.bfloat16)}
    seen.clear()
    ctx.dry_run("train.amp=bf16")
    assert seen and not any(enabled for enabled, _ in seen)


def check_channels_last(ctx):
    seen = ctx.during_loss(lambda task, model, batch, rt: rt.to_device(batch[0]).is_contiguous(
        memory_format=torch.channels_last) and not batch[0].is_contiguous(memory_format=torch.channels_last))
    t = ctx.trainer("train.channels_last=true")
    convs = [p for p in t.model.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)
    ctx.dry_run("train.channels_last=true")
    assert seen == [True, True]


def check_tf32(ctx):
    """A CUDA-only, process-wide setting (tests/test_runtime.py shows what it sets): here, that the key
    reaches it."""
    from pale.train import runtime
    seen, original = [], runtime.use_tf32
    ctx.monkeypatch.setattr(runtime, "use_tf32", lambda device, enabled: seen.append(enabled) or original(device, enabled))
    ctx.trainer("train.tf32=false")
    ctx.trainer()
    assert seen == [False, True]


def check_attention_kernel(ctx):
    from pale.models import attention_kernels as ak
    seen = ctx.during_loss(lambda *args: ak.get_kernel())
    ctx.dry_run("train.attention_kernel=math")
    assert seen == ["math", "math"]


def one_process_group(ctx):
    """A gloo group of this process alone, and the Trainer made to believe it is one of 2 ranks."""
    import torch.distributed as dist
    from pale.train import Runtime

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ctx.monkeypatch.setattr(sys.modules[Trainer.__module__], "setup_runtime",
                            lambda *args: Runtime(torch.device("cpu"), None, rank=0, world_size=2))
    return dist


def check_sync_bn(ctx):
    """PyTorch's SyncBatchNorm runs on CUDA only: on the CPU the key is refused by name."""
    dist = one_process_group(ctx)
    try:
        with pytest.raises(ValueError, match="train.sync_bn needs CUDA"):
            ctx.trainer("train.sync_bn=true")
        kinds = {type(m).__name__ for m in ctx.trainer().model.modules()}
        assert "DistributedDataParallel" in kinds and "SyncBatchNorm" not in kinds
    finally:
        dist.destroy_process_group()


def check_dist_bn(ctx):
    """reduce: the mean over ranks (the sum over this one rank, halved for the 2 the trainer counts)."""
    from timm.utils import unwrap_model
    from pale.train.runtime import sync_norm_stats
    dist = one_process_group(ctx)
    try:
        for mode, factor in (("reduce", 0.5), ("none", 1.0)):
            t = ctx.trainer(f"train.dist_bn={mode}")
            bns = [m for m in t.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            for m in bns:
                m.running_var.fill_(4.0)
            sync_norm_stats([unwrap_model(t.model)], t.rt, mode)
            assert bns and all(torch.equal(m.running_var, torch.full_like(m.running_var, 4.0 * factor)) for m in bns)
    finally:
        dist.destroy_process_group()


def check_grad_checkpointing(ctx):
    assert all(s.grad_checkpointing for s in ctx.trainer("train.grad_checkpointing=true").model.stages)
    assert not any(s.grad_checkpointing for s in ctx.trainer().model.stages)


def check_accum_steps(ctx):
    events = ctx.during_loss(lambda task, model, batch, rt: ("loss", len(batch[0])))
    handle = register_optimizer_step_pre_hook(lambda *args: events.append("step"))
    try:
        ctx.dry_run("train.accum_steps=2")
    finally:
        handle.remove()
    assert events == [("loss", 2), ("loss", 2), "step"] * 2


def check_clip_grad(ctx):
    free = step_gradients(ctx)
    clip = free[0][0] / 4
    clipped = step_gradients(ctx, f"train.clip_grad={clip}")
    assert all(norm <= clip * (1 + 1e-5) for norm, _ in clipped)


def check_clip_mode(ctx):
    free = step_gradients(ctx)
    clip = free[0][1] / 4
    clipped = step_gradients(ctx, f"train.clip_grad={clip}", "train.clip_mode=value")
    assert all(largest <= clip * (1 + 1e-5) for _, largest in clipped)
    assert clipped[0][0] > clip  # each value clipped on its own, not the norm


def check_workers(ctx):
    t = ctx.trainer("train.workers=1")
    assert (t.train_loader.num_workers, t.val_loader.num_workers) == (1, 1)


def check_eval_every(ctx):
    out, _ = ctx.run("epochs=2", "train.eval_every=2")
    assert ["val_top1" in h for h in summary_history(out)] == [False, True]


def check_eval_batch_size(ctx):
    assert ctx.trainer("train.eval_batch_size=3").val_loader.batch_size == 3


def check_tensorboard(ctx):
    out, _ = ctx.run("train.tensorboard=true")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def check_progress(ctx):
    ctx.monkeypatch.setenv("PALE_PROGRESS_INTERVAL", "0")
    ctx.capsys.readouterr()
    ctx.dry_run("train.progress=true")
    assert "epoch 1/1: 1/2 updates" in ctx.capsys.readouterr().err
    ctx.dry_run()
    assert "epoch 1/1" not in ctx.capsys.readouterr().err


# ---- classification keys -----------------------------------------------------------------------

def check_model_name(ctx):
    recipe = tiny_recipe(ctx.root)
    recipe["model"] = {"name": "resnet10t", "kwargs": {}}
    model = ctx.trainer(recipe=recipe).model
    assert type(model).__name__ == "ResNet" and model.pretrained_cfg["architecture"] == "resnet10t"


#: a value for each constructor argument that the shipped recipes set, other than the tiny recipe's
KWARGS = {"embed_dims": [8, 16, 16, 24], "depths": [1, 1, 2, 1], "num_heads": [2, 2, 2, 4], "pale_size": 2,
          "stem_type": "deep"}


def constructor_kwargs(ctx, *overrides):
    from pale.models import pale_transformer
    seen, original = {}, pale_transformer.PaleTransformer.__init__

    def init(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)
    ctx.monkeypatch.setattr(pale_transformer.PaleTransformer, "__init__", init)
    ctx.trainer(*overrides)
    return seen


def check_model_kwargs(ctx):
    assert {k: v for k, v in constructor_kwargs(ctx).items() if k in tiny_recipe(ctx.root)["model"]["kwargs"]} \
        == tiny_recipe(ctx.root)["model"]["kwargs"]


def kwarg_check(name):
    def check(ctx):
        value = KWARGS[name]
        assert constructor_kwargs(ctx, f"model.kwargs.{name}={value}")[name] == value
    check.__name__ = f"check_model_kwargs_{name}"
    return check


def check_drop_path_rate(ctx):
    from timm.layers import DropPath
    rates = [m.drop_prob for m in ctx.trainer("model.drop_path_rate=0.3").model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3)   # timm's rule: rising to the rate at the last block


def check_drop_rate(ctx):
    assert ctx.trainer("model.drop_rate=0.2").model.head.drop.p == 0.2


def check_pretrained(ctx):
    from pale.files import save_safetensors
    model = ctx.trainer().model
    state = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_safetensors(state, ctx.tmp / "start.safetensors", metadata={})
    loaded = ctx.trainer(f"model.pretrained={ctx.tmp / 'start.safetensors'}").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def check_root(ctx):
    assert len(ctx.trainer(f"data.root={ctx.other}").train_loader.dataset) == 6


def check_train_split(ctx):
    assert len(ctx.trainer("data.train_split=few").train_loader.dataset) == 4


def check_val_split(ctx):
    assert ctx.trainer("data.val_split=null").val_loader is None
    assert len(ctx.trainer("data.val_split=train").val_loader.dataset) == 8


def check_img_size(ctx):
    t = ctx.trainer("data.img_size=20")
    assert step_of(t, "RandomResizedCropAndInterpolation").size == (20, 20)
    assert step_of(t, "CenterCrop", train_split=False).size == (20, 20)


def check_crop_pct(ctx):
    assert step_of(ctx.trainer("data.crop_pct=0.8"), "Resize", train_split=False).size == (30, 30)


def check_crop_mode(ctx):
    assert step_of(ctx.trainer("data.crop_mode=center", "data.crop_pct=0.8"), "Resize", train_split=False).size == 30


def check_interpolation(ctx):
    from torchvision.transforms import InterpolationMode
    assert step_of(ctx.trainer("data.interpolation=bilinear"), "Resize", False).interpolation == InterpolationMode.BILINEAR


def check_mean(ctx):
    t = ctx.trainer("data.mean=[0.1, 0.2, 0.3]")
    for split in (True, False):
        assert step_of(t, "Normalize", split).mean.tolist() == pytest.approx([0.1, 0.2, 0.3])


def check_std(ctx):
    t = ctx.trainer("data.std=[0.5, 0.6, 0.7]")
    for split in (True, False):
        assert step_of(t, "Normalize", split).std.tolist() == pytest.approx([0.5, 0.6, 0.7])


def check_skip_bad_images(ctx):
    t = ctx.trainer("data.skip_bad_images=true")
    assert t.train_loader.dataset.dataset.skip_bad and t.val_loader.dataset.skip_bad
    assert not ctx.trainer().train_loader.dataset.dataset.skip_bad


def check_scale(ctx):
    assert step_of(ctx.trainer("aug.scale=[0.5, 0.9]"), "RandomResizedCropAndInterpolation").scale == (0.5, 0.9)


def check_ratio(ctx):
    assert step_of(ctx.trainer("aug.ratio=[0.9, 1.1]"), "RandomResizedCropAndInterpolation").ratio == (0.9, 1.1)


def check_hflip(ctx):
    assert step_of(ctx.trainer("aug.hflip=0.3"), "RandomHorizontalFlip").p == 0.3


def check_vflip(ctx):
    assert step_of(ctx.trainer("aug.vflip=0.2"), "RandomVerticalFlip").p == 0.2


def check_color_jitter(ctx):
    assert step_of(ctx.trainer("aug.color_jitter=0.3"), "ColorJitter").brightness == pytest.approx((0.7, 1.3))


def check_auto_augment(ctx):
    assert step_of(ctx.trainer("aug.auto_augment=rand-m3-n3"), "RandAugment").num_layers == 3
    assert not [s for s in transforms(ctx.trainer("aug.auto_augment=null")) if "Augment" in type(s).__name__]


def check_fill(ctx):
    from pale.train.classification import _augment_ops
    fills = {op.kwargs["fillcolor"] for op in _augment_ops(transforms(ctx.trainer("aug.fill=7")))
             if "fillcolor" in op.kwargs}
    assert fills == {(7, 7, 7)}


def check_train_interpolation(ctx):
    from torchvision.transforms import InterpolationMode
    crop = step_of(ctx.trainer("aug.train_interpolation=bilinear"), "RandomResizedCropAndInterpolation")
    assert crop.interpolation == InterpolationMode.BILINEAR


def check_reprob(ctx):
    assert step_of(ctx.trainer("aug.reprob=0.5"), "RandomErasing").probability == 0.5


def check_remode(ctx):
    assert step_of(ctx.trainer("aug.remode=const"), "RandomErasing").mode == "const"


def check_recount(ctx):
    assert step_of(ctx.trainer("aug.recount=3"), "RandomErasing").max_count == 3


def mixup(ctx, *overrides):
    return ctx.trainer(*overrides).task.mixup_fn


def check_mixup(ctx):
    assert mixup(ctx, "aug.mixup=0.3").mixup_alpha == 0.3
    assert mixup(ctx, "aug.mixup=0", "aug.cutmix=0") is None


def check_cutmix(ctx):
    assert mixup(ctx, "aug.cutmix=0.7").cutmix_alpha == 0.7


def check_cutmix_minmax(ctx):
    assert mixup(ctx, "aug.cutmix_minmax=[0.2, 0.8]").cutmix_minmax == [0.2, 0.8]


def check_mixup_prob(ctx):
    assert mixup(ctx, "aug.mixup_prob=0.4").mix_prob == 0.4


def check_mixup_switch_prob(ctx):
    assert mixup(ctx, "aug.mixup_switch_prob=0.2").switch_prob == 0.2


def check_mixup_mode(ctx):
    assert mixup(ctx, "aug.mixup_mode=pair").mode == "pair"


def known_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 24, 24, generator=g), torch.tensor([0, 1, 1, 0])


def check_smoothing_without_mixup(ctx):
    """The loss of a known batch is the label-smoothed cross-entropy, written out."""
    t = ctx.trainer("aug.mixup=0", "aug.cutmix=0", "aug.smoothing=0.3")
    model = t.model.eval()   # no drop path: the same logits below
    images, targets = known_batch()
    loss, n = t.task.training_loss(model, (images, targets), t.rt)
    with torch.no_grad():
        logp = F.log_softmax(model(images), dim=-1)
    by_hand = (0.7 * -logp.gather(1, targets[:, None]).squeeze(1) - 0.3 * logp.mean(-1)).mean()
    assert n == 4 and loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert not loss.item() == pytest.approx(F.nll_loss(logp, targets).item(), rel=1e-3)


def check_smoothing_in_mixup_targets(ctx):
    """Mixup/CutMix's soft targets carry the smoothing: a batch of one class mixes into the smoothed
    one-hot, ``1 - s + s/C`` on the class and ``s/C`` elsewhere, whatever the mixing weight."""
    from timm.loss import SoftTargetCrossEntropy
    seen, original = [], SoftTargetCrossEntropy.forward
    ctx.monkeypatch.setattr(SoftTargetCrossEntropy, "forward",
                            lambda self, x, target: seen.append(target) or original(self, x, target))
    t = ctx.trainer("aug.smoothing=0.3")
    images, _ = known_batch()
    t.task.training_loss(t.model, (images, torch.zeros(4, dtype=torch.long)), t.rt)
    (target,) = seen
    assert torch.allclose(target, torch.tensor([[0.85, 0.15]]).expand(4, 2))


class Elsewhere:
    """A key shown by another test (it acts across restarts), which must exist."""

    def __init__(self, test):
        self.test = test
        self.__name__ = test.split("::")[1]

    def __call__(self, ctx):
        module, name = self.test.split("::")
        assert callable(getattr(importlib.import_module(module), name)), self.test


CHECKS = {
    "task": check_task, "epochs": check_epochs, "batch_size": check_batch_size, "seed": check_seed,
    "optim.opt": check_opt, "optim.lr": check_lr, "optim.lr_base": check_lr_base,
    "optim.lr_base_size": check_lr_base_size, "optim.weight_decay": check_weight_decay, "optim.betas": check_betas,
    "optim.eps": check_eps, "optim.momentum": check_momentum, "optim.layer_decay": check_layer_decay,
    "sched.sched": check_sched, "sched.warmup_epochs": check_warmup_epochs, "sched.warmup_lr": check_warmup_lr,
    "sched.min_lr": check_min_lr, "sched.cooldown_epochs": check_cooldown_epochs,
    "sched.decay_rate": check_decay_rate, "sched.decay_milestones": check_decay_milestones,
    "sched.warmup_updates": check_warmup_updates, "sched.step_on_epochs": check_step_on_epochs,
    "ema.enabled": check_ema_enabled, "ema.decay": check_ema_decay, "ema.warmup": check_ema_warmup,
    "ema.max_window": check_ema_max_window,
    "train.device": check_device, "train.amp": check_amp, "train.val_amp": check_val_amp,
    "train.channels_last": check_channels_last, "train.tf32": check_tf32,
    "train.compile": Elsewhere("test_train_compile::test_compiled_training_saves_the_plain_module_keys"), "train.attention_kernel": check_attention_kernel,
    "train.sync_bn": check_sync_bn, "train.dist_bn": check_dist_bn,
    "train.grad_checkpointing": check_grad_checkpointing, "train.accum_steps": check_accum_steps,
    "train.clip_grad": check_clip_grad, "train.clip_mode": check_clip_mode, "train.workers": check_workers,
    "train.eval_every": check_eval_every, "train.eval_batch_size": check_eval_batch_size,
    "train.on_nonfinite": Elsewhere("test_train::test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint"),
    "train.resume": Elsewhere("test_resume::test_auto_continues_the_same_command_and_refuses_another_recipe"),
    "train.checkpoint_every_updates": Elsewhere("test_resume::test_rotation_keeps_k_files_and_drops_older_ones"),
    "train.keep_checkpoints": Elsewhere("test_resume::test_rotation_keeps_k_files_and_drops_older_ones"),
    "train.tensorboard": check_tensorboard, "train.progress": check_progress,
    "model.name": check_model_name, "model.kwargs": check_model_kwargs,
    **{f"model.kwargs.{name}": kwarg_check(name) for name in KWARGS},
    "model.drop_path_rate": check_drop_path_rate, "model.drop_rate": check_drop_rate,
    "model.pretrained": check_pretrained,
    "data.root": check_root, "data.train_split": check_train_split, "data.val_split": check_val_split,
    "data.img_size": check_img_size, "data.crop_pct": check_crop_pct, "data.crop_mode": check_crop_mode,
    "data.interpolation": check_interpolation, "data.mean": check_mean, "data.std": check_std,
    "data.skip_bad_images": check_skip_bad_images,
    "aug.scale": check_scale, "aug.ratio": check_ratio, "aug.hflip": check_hflip, "aug.vflip": check_vflip,
    "aug.color_jitter": check_color_jitter, "aug.auto_augment": check_auto_augment, "aug.fill": check_fill,
    "aug.train_interpolation": check_train_interpolation, "aug.reprob": check_reprob, "aug.remode": check_remode,
    "aug.recount": check_recount, "aug.mixup": check_mixup, "aug.cutmix": check_cutmix,
    "aug.cutmix_minmax": check_cutmix_minmax, "aug.mixup_prob": check_mixup_prob,
    "aug.mixup_switch_prob": check_mixup_switch_prob, "aug.mixup_mode": check_mixup_mode,
    "aug.smoothing": (check_smoothing_without_mixup, check_smoothing_in_mixup_targets),
}


def leaf_keys(mapping, prefix=""):
    """Dotted keys of a nested mapping; an empty mapping (a free-form section) is a key itself."""
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_recipe_key_has_a_check():
    keys = set(leaf_keys(task_defaults("classification")))
    for name in shipped_recipes():
        keys |= set(leaf_keys(load_yaml(recipe_path(name))))
    assert keys - set(CHECKS) == set(), "recipe keys without a check in CHECKS"
    assert set(CHECKS) - keys == set(), "checks of keys no recipe or default has"


CASES = [(key, check) for key, checks in CHECKS.items() for check in (checks if isinstance(checks, tuple) else (checks,))]


@pytest.mark.parametrize("key, check", CASES, ids=[f"{key}-{check.__name__}" for key, check in CASES])
def test_the_key_reaches_its_computation(key, check, data, tmp_path, monkeypatch, capsys):
    check(Context(data, tmp_path, monkeypatch, capsys))
