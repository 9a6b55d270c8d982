"""Recipes: the shipped ImageNet recipes hold the values of the paper's appendix ("Image Classification
on ImageNet-1K"), their evaluation transform is the appendix's 256x256 resize then 224 centre crop; bad
keys and values get errors naming them; overrides parse and may add model constructor keys."""
import math

import numpy as np
import pytest
import timm
import torch

import pale  # noqa: F401
from pale.cli import main
from pale.train import ENGINE_DEFAULTS, RecipeError, resolve_config, resolved_lr
from pale.train.classification import build_eval_transform, check_model_kwargs, data_config
from pale.train.build import build_optimizer, build_scheduler
from pale.train.recipe import (ENGINE_RULES, check_optimizer_name, check_rules, ema_decay, list_rule, number_rule,
                               parse_override, recipe_path, schedule_warnings, shipped_recipes)

# The appendix, "Detailed Experimental Settings", "Image Classification on ImageNet-1K".
APPENDIX = {
    "drop_path_rate": {"pale_tiny": 0.1, "pale_small": 0.3, "pale_base": 0.5},
    "epochs": 300, "batch_size": 1024, "img_size": 224,
    "opt": "adamw", "weight_decay": 0.05, "lr_at_1024": 1e-3, "sched": "cosine", "warmup_epochs": 20,
    "eval_resize": (256, 256), "eval_crop": 224,
}
# What the paper does not state, taken from DeiT / Swin / CSWin (marked so in every recipe file).
NOT_IN_PAPER = {"mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "reprob": 0.25, "warmup_lr": 1e-6,
                "min_lr": 1e-5, "interpolation": "bicubic", "ema_decay": 0.9998}


@pytest.mark.parametrize("variant", sorted(APPENDIX["drop_path_rate"]))
def test_imagenet_recipe_matches_the_appendix(variant):
    cfg = resolve_config(f"{variant}_imagenet")
    assert cfg["task"] == "classification"
    assert cfg["model"]["name"] == variant and cfg["model"]["kwargs"] == {}
    assert cfg["model"]["drop_path_rate"] == APPENDIX["drop_path_rate"][variant]
    assert (cfg["epochs"], cfg["batch_size"]) == (APPENDIX["epochs"], APPENDIX["batch_size"])
    o = cfg["optim"]
    assert (o["opt"], o["weight_decay"]) == (APPENDIX["opt"], APPENDIX["weight_decay"])
    assert resolved_lr(cfg) == pytest.approx(APPENDIX["lr_at_1024"])
    # linear scaling: 1e-3 per 1024 images
    assert resolved_lr(resolve_config(f"{variant}_imagenet", ["batch_size=256"])) == pytest.approx(2.5e-4)
    s = cfg["sched"]
    assert (s["sched"], s["warmup_epochs"], s["step_on_epochs"]) == (APPENDIX["sched"], APPENDIX["warmup_epochs"], False)
    a = cfg["aug"]
    # AutoAugment (Cubuk et al. 2019: timm's "original" ImageNet policy) plus colour jitter and flips
    assert a["auto_augment"] == "original" and a["color_jitter"] > 0 and a["hflip"] == 0.5
    d = cfg["data"]
    assert d["img_size"] == APPENDIX["img_size"]
    assert (d["crop_mode"], math.floor(d["img_size"] / d["crop_pct"])) == ("squash", APPENDIX["eval_resize"][0])
    assert cfg["train"]["val_amp"] is False
    unstated = dict(mixup=a["mixup"], cutmix=a["cutmix"], smoothing=a["smoothing"], reprob=a["reprob"],
                    warmup_lr=s["warmup_lr"], min_lr=s["min_lr"], interpolation=d["interpolation"],
                    ema_decay=cfg["ema"]["decay"])
    assert unstated == NOT_IN_PAPER


@pytest.mark.parametrize("name", shipped_recipes())
def test_recipe_files_mark_what_the_paper_does_not_state_and_cite_only_the_paper(name):
    text = recipe_path(name).read_text()
    assert "design" not in text.lower() and "notes" not in text.lower() and "/work" not in text
    if name.endswith("_imagenet"):
        assert "appendix" in text
        lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
        for key in ("mixup", "cutmix", "smoothing", "reprob", "warmup_lr", "min_lr", "interpolation",
                    "enabled", "train_interpolation", "betas"):
            assert "not in the paper" in lines[key], key
        for key in ("epochs", "drop_path_rate", "hflip", "weight_decay", "warmup_epochs", "crop_pct", "opt"):
            assert "(paper" in lines[key], key


def test_imagenet_eval_transform_resizes_both_sides_to_256_then_crops_224():
    from PIL import Image
    from torchvision import transforms as T

    dc = data_config(resolve_config("pale_tiny_imagenet"))
    transform = build_eval_transform(dc)
    rng = np.random.default_rng(0)
    # a 500 wide, 300 high image with structure at every scale (noise on a gradient)
    array = (np.linspace(0, 255, 500)[None, :, None] * 0.5 + rng.integers(0, 128, (300, 500, 3))).astype(np.uint8)
    img = Image.fromarray(array)
    by_hand = T.Compose([T.Resize((256, 256), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                         T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    out = transform(img)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, by_hand(img))
    # the short-side resize (timm's default crop mode) is a different image
    short_side = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC)] + by_hand.transforms[1:])
    assert not torch.allclose(out, short_side(img), atol=0.1)


def test_recipe_optimizer_skips_decay_on_norms_biases_and_position_params():
    cfg = resolve_config("pale_tiny_imagenet")
    model = pale.PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4),
                                 pos_embed="ape", num_classes=3)
    opt = build_optimizer(model, cfg)
    assert type(opt).__name__ == "AdamW"
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.05) for g in opt.param_groups)
    tables = {f"stages.{i}.pos_embed" for i in range(4)}   # APE: one learned table per stage
    assert model.no_weight_decay() == tables
    # exactly the 1-D parameters (norm weights, biases, the separable projections' BatchNorms) and the tables
    assert plain == {n for n, p in model.named_parameters() if p.ndim == 1} | tables
    assert all(model.get_parameter(n).ndim > 1 and n not in tables for n in decayed)
    assert "stages.0.blocks.0.attn.proj.weight" in decayed
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_recipe_schedule_warms_up_then_cosine_to_min_lr():
    cfg = resolve_config("pale_tiny_imagenet")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    per_epoch = 10
    sched = build_scheduler(opt, cfg, per_epoch)
    lrs = {}
    for update in range(0, 300 * per_epoch + 1):
        sched.step_update(update)
        lrs[update] = opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10 * per_epoch] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-6)  # half-way through warm-up
    # timm's cosine spans all 300 epochs; the warm-up replaces its first 20
    assert lrs[20 * per_epoch] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 300)))
    assert max(lrs.values()) < 1e-3
    assert lrs[300 * per_epoch] == pytest.approx(1e-5, rel=1e-3)
    assert all(lrs[u] >= lrs[u + 1] for u in range(20 * per_epoch, 300 * per_epoch))


def test_schedule_warm_up_in_updates_and_multistep_milestones():
    # mmdet's 1x: 500 warm-up iterations, lr x0.1 at epochs 8 and 11 of 12.
    cfg = resolve_config("pale_tiny_imagenet", ["epochs=12", "sched.sched=multistep", "sched.warmup_epochs=0",
                                                "sched.warmup_updates=500", "sched.warmup_lr=1e-7",
                                                "sched.decay_milestones=[8, 11]", "optim.lr=1e-4"])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    per_epoch = 100
    sched = build_scheduler(opt, cfg, per_epoch)

    def lr_at(update):
        sched.step_update(update)
        return opt.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-7)
    assert lr_at(250) == pytest.approx(1e-7 + (1e-4 - 1e-7) * 0.5, rel=1e-6)  # half-way through 500 updates
    # (timm's multistep switches one update before the milestone's first update: test either side of it)
    assert lr_at(500) == pytest.approx(1e-4) and lr_at(790) == pytest.approx(1e-4)
    assert lr_at(800) == pytest.approx(1e-5) and lr_at(1090) == pytest.approx(1e-5)
    assert lr_at(1100) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="decay_milestones"):
        build_scheduler(opt, resolve_config("pale_tiny_imagenet", ["sched.sched=multistep"]), per_epoch)


def test_unknown_key_is_named():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optim\.lrr' \(did you mean 'lr'\?\)"):
        resolve_config("pale_tiny_imagenet", ["optim.lrr=1"])
    with pytest.raises(RecipeError, match="unknown recipe key 'augs'"):
        resolve_config({"augs": {"mixup": 0}})
    with pytest.raises(RecipeError, match="unknown recipe key 'aug.mix_up'"):
        resolve_config({"aug": {"mix_up": 0}})


def test_unknown_key_in_a_recipe_file_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 3\ntrain:\n  accumulate: 2\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'train.accumulate'"):
        resolve_config(str(path))


def test_wrong_types_and_bad_overrides_are_named():
    with pytest.raises(RecipeError, match="'epochs' must be a number"):
        resolve_config(None, ["epochs=many"])
    with pytest.raises(RecipeError, match="'epochs' must be an integer"):
        resolve_config(None, ["epochs=2.5"])
    with pytest.raises(RecipeError, match="'ema.enabled' must be true or false"):
        resolve_config(None, ["ema.enabled=3"])
    with pytest.raises(RecipeError, match="must look like key=value"):
        resolve_config(None, ["epochs"])
    with pytest.raises(RecipeError, match="recipe not found: nope_recipe"):
        resolve_config("nope_recipe")


def test_set_adds_any_model_constructor_key_and_refuses_a_misspelt_one():
    # demo_digits already sets some model.kwargs: --set may still add one it lacks
    cfg = resolve_config("demo_digits", ["model.kwargs.mlp_ratio=2.0", "model.kwargs.depths=[1,1,1,1]"])
    assert cfg["model"]["kwargs"]["mlp_ratio"] == 2.0 and cfg["model"]["kwargs"]["depths"] == [1, 1, 1, 1]
    assert cfg["model"]["kwargs"]["pale_size"] == 2  # the recipe's other kwargs stay
    check_model_kwargs(cfg["model"]["name"], cfg["model"]["kwargs"])
    with pytest.raises(RecipeError, match=r"model.kwargs.dephts: PaleTransformer \(model pale_tiny\) has no "
                                          r"parameter 'dephts' \(did you mean 'depths'\?\); it takes: .*embed_dims"):
        check_model_kwargs("pale_tiny", {"dephts": [1, 1, 1, 1]})
    with pytest.raises(RecipeError, match="model.kwargs.num_classes is set by the task"):
        check_model_kwargs("pale_tiny", {"num_classes": 3})
    with pytest.raises(RecipeError, match="unknown model 'pale_huge'"):
        check_model_kwargs("pale_huge", {})


def test_set_model_kwargs_through_pale_train(tmp_path, capsys):
    from pale.train.data import write_image_folder
    images = np.zeros((4, 40, 40, 3), np.uint8)
    for split in ("train", "val"):
        write_image_folder(tmp_path / split, images, [0, 1, 0, 1], ["a", "b"])
    args = ["train", "--recipe", "demo_digits", "--data", str(tmp_path), "--batch-size", "2", "--dry-run"]
    assert main(args + ["--set", "model.kwargs.depths=[1,1,1,1]"]) == 0
    assert main(args + ["--set", "model.kwargs.dpeths=[1,1,1,1]"]) == 1
    err = capsys.readouterr().err
    assert "model.kwargs.dpeths" in err and "did you mean 'depths'" in err and "num_heads" in err
    # values the constructor refuses: one line with its reason, not its traceback
    for value, reason in [("pale_size=[7,7,7]", "pale_size must be an int, a pair, or one entry per stage (4)"),
                          ("num_heads=[3,3,3,3]", "dim=32 is not divisible by num_heads=3")]:
        assert main(args + ["--set", f"model.kwargs.{value}"]) == 1
        err = capsys.readouterr().err
        assert "model settings (model.name, model.kwargs) do not build a model" in err and reason in err, err
        assert "Traceback" not in err


def test_ema_decay_is_capped_by_the_run_length():
    ema = {"decay": 0.9998, "max_window": 0.1}
    assert ema_decay(ema, 300 * 1251) == 0.9998  # the paper's run: cap 1 - 1/37530 is above 0.9998
    assert ema_decay(ema, 60) == pytest.approx(1 - 1 / 6)  # time constant 6 updates = 10% of 60
    assert ema_decay(ema, 8) == 0.0  # a window under one update: the EMA is the model
    assert ema_decay(dict(ema, max_window=None), 60) == 0.9998


def test_schedule_warnings_name_a_warm_up_longer_than_half_the_run_and_too_many_workers():
    cfg = resolve_config("pale_tiny_imagenet", ["epochs=30", "batch_size=16"])
    warnings = schedule_warnings(cfg, updates_per_epoch=200, num_samples=3200, workers=8, cores=2)
    assert len(warnings) == 2
    assert "warm-up (4000 updates) is longer than half the run (6000 updates" in warnings[0]
    assert "8 data loader processes for 2 CPU core(s) compete with training (train.workers" in warnings[1]
    assert warnings[0].endswith("lower sched.warmup_epochs, or try --recipe small_data")
    small = resolve_config("small_data")
    assert schedule_warnings(small, updates_per_epoch=50, num_samples=3200, workers=1, cores=2) == []
    # a dense recipe counts its warm-up in updates, and small_data is a classification recipe
    from pale.dense.engine import resolve_dense_config
    from pale.dense.seg_task import SegmentationTask

    seg = resolve_dense_config(SegmentationTask, None, ["epochs=1", "data.iters_per_epoch=4"])
    warnings = schedule_warnings(seg, updates_per_epoch=4, num_samples=8, workers=1, cores=2)
    assert warnings == ["the warm-up (1500 updates) is longer than half the run (4 updates: 1 epoch(s) x 4 for "
                        "8 images); lower sched.warmup_updates"]


def test_small_data_recipe_fits_a_few_thousand_images():
    cfg = resolve_config("small_data")
    assert resolved_lr(cfg) == pytest.approx(1e-3) and cfg["batch_size"] == 64
    assert cfg["sched"]["warmup_epochs"] <= cfg["epochs"] / 10
    a = cfg["aug"]
    assert (a["mixup"], a["cutmix"], a["reprob"], a["auto_augment"]) == (0.0, 0.0, 0.0, None)
    assert cfg["train"]["workers"] is None  # from the cores
    assert cfg["data"]["mean"] is None and cfg["data"]["std"] is None  # the model's statistics
    model = timm.create_model(cfg["model"]["name"], num_classes=4, **cfg["model"]["kwargs"])
    assert sum(p.numel() for p in model.parameters()) < 5e6
    dc = data_config(cfg, model)
    assert dc["mean"] == list(model.pretrained_cfg["mean"]) == [0.485, 0.456, 0.406]
    # the stage maps 40/20/10/5 at 160 px are multiples of the pale size: no padding
    assert all((cfg["data"]["img_size"] // 4 // 2 ** i) % cfg["model"]["kwargs"]["pale_size"] == 0 for i in range(4))


def test_overrides_parse_yaml_values():
    cfg = resolve_config("pale_tiny_imagenet", ["optim.lr_base=5e-4", "model.kwargs.pale_size=[7,7]",
                                                "ema.enabled=false", "data.mean=null", "epochs=3"])
    assert cfg["optim"]["lr_base"] == 5e-4
    assert cfg["model"]["kwargs"] == {"pale_size": [7, 7]}  # free-form section
    assert cfg["ema"]["enabled"] is False and cfg["epochs"] == 3
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}
    assert set(ENGINE_DEFAULTS) <= set(cfg)


def test_numbers_without_a_dot_in_the_exponent_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; optim.lr (default null) then refused "got '1e-3'"
    assert parse_override("optim.lr=1e-3") == {"optim": {"lr": 0.001}}
    assert parse_override("x=[5E-4,-2e+1,1.5e-3]") == {"x": [5e-4, -20.0, 1.5e-3]}
    assert parse_override("x=1e") == {"x": "1e"} and parse_override("x=abc1e3") == {"x": "abc1e3"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: classification\noptim:\n  lr: 4e-4\n  weight_decay: 5e-2\n")
    cfg = resolve_config(str(recipe), ["sched.min_lr=1e-6"])
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["sched"]["min_lr"]) == (4e-4, 0.05, 1e-6)
    assert isinstance(cfg["optim"]["lr"], float)


def test_print_config_cli(capsys):
    assert main(["train", "--recipe", "pale_small_imagenet", "--set", "epochs=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "name: pale_small" in out and "drop_path_rate: 0.3" in out
    assert main(["train", "--set", "optim.nope=1", "--print-config"]) == 1
    assert "unknown recipe key 'optim.nope'" in capsys.readouterr().err


def test_an_unknown_auto_augment_policy_is_named():
    from pale.train.classification import build_train_transform
    cfg = resolve_config("small_data", ["aug.auto_augment=orignal"])
    with pytest.raises(RecipeError, match="aug.auto_augment 'orignal' is not a timm policy"):
        build_train_transform(cfg, data_config(cfg))


def test_number_rules_keep_their_bounds_open_or_closed():
    cfg = {"a": {"x": 0.0}}
    check_rules(cfg, [number_rule("a.x", 0, 1)])
    with pytest.raises(RecipeError, match=r"a.x must be a number in \(0, 1\], got 0.0"):
        check_rules(cfg, [number_rule("a.x", 0, 1, lo_open=True)])
    check_rules({"a": {"x": 1}}, [number_rule("a.x", 0, 1)])
    with pytest.raises(RecipeError, match=r"must be a number in \[0, 1\), got 1"):
        check_rules({"a": {"x": 1}}, [number_rule("a.x", 0, 1, hi_open=True)])
    with pytest.raises(RecipeError, match="must be an integer >= 1, got 2.5"):
        check_rules({"n": 2.5}, [number_rule("n", 1, integer=True)])
    for bad in (True, "3", float("nan"), float("inf"), [3]):  # booleans, strings, non-finite, lists
        with pytest.raises(RecipeError, match="n must be a number >= 0"):
            check_rules({"n": bad}, [number_rule("n", 0)])
    check_rules({"n": None}, [number_rule("n", 0, nullable=True)])
    with pytest.raises(RecipeError, match="n must be a number >= 0, got None"):
        check_rules({"n": None}, [number_rule("n", 0)])
    check_rules({"other": {"section": 1}}, [number_rule("a.x", 0)])  # absent keys: another task's


def test_list_rules_check_length_bounds_and_order():
    pair = list_rule("p", 0, 1, length=2, lo_open=True, order="non-decreasing")
    check_rules({"p": [0.5, 0.5]}, [pair])
    for bad in ([0.5], [0.5, 0.4], [0, 0.5], [0.5, 1.5], "0.5,0.6", None):
        with pytest.raises(RecipeError, match=r"p must be a list of 2 numbers, each in \(0, 1\], in non-decreasing"):
            check_rules({"p": bad}, [pair])
    epochs = list_rule("m", 0, order="increasing", empty=True)
    check_rules({"m": []}, [epochs])
    with pytest.raises(RecipeError, match="m must be a list of numbers, each >= 0, in increasing order, got \\[8, 8\\]"):
        check_rules({"m": [8, 8]}, [epochs])
    with pytest.raises(RecipeError, match="s must be null or a non-empty list of numbers, each > 0, got \\[\\]"):
        check_rules({"s": []}, [list_rule("s", 0, lo_open=True, nullable=True)])


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipes_keep_every_rule(name):
    from pale.train.run import TASKS

    cfg = resolve_config(name, [])
    task = TASKS[cfg["task"]]
    check_rules(cfg, (*ENGINE_RULES, *task.rules))  # raises on the first value out of range
    check_optimizer_name(cfg["optim"]["opt"])


def test_optimizer_names_are_timm_names():
    for name in ("adamw", "sgd", "lamb", "lookahead_adamw", "AdamW"):
        check_optimizer_name(name)
    with pytest.raises(RecipeError, match="'adamww' is not a timm optimizer \\(did you mean adamw"):
        check_optimizer_name("adamww")
    with pytest.raises(RecipeError, match="'fast_adamw' is not a timm optimizer"):
        check_optimizer_name("fast_adamw")
