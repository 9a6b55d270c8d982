"""Recipes: the shipped ImageNet recipes resolve to the design notes' hyper-parameters; bad keys and
values get errors naming them; overrides parse."""
import math

import pytest
import torch

import pale  # noqa: F401
from pale.cli import main
from pale.train import ENGINE_DEFAULTS, RecipeError, resolve_config, resolved_lr
from pale.train.engine import build_optimizer, build_scheduler
from pale.train.recipe import parse_override, shipped_recipes

DROP_PATH = {"pale_tiny": 0.2, "pale_small": 0.3, "pale_base": 0.5}


@pytest.mark.parametrize("variant", sorted(DROP_PATH))
def test_imagenet_recipe_matches_the_notes(variant):
    cfg = resolve_config(f"{variant}_imagenet")
    assert cfg["task"] == "classification"
    assert cfg["model"]["name"] == variant and cfg["model"]["kwargs"] == {}
    assert cfg["model"]["drop_path_rate"] == DROP_PATH[variant]
    assert cfg["epochs"] == 300 and cfg["batch_size"] == 1024
    o = cfg["optim"]
    assert o["opt"] == "adamw" and o["betas"] == [0.9, 0.999] and o["weight_decay"] == 0.05
    assert resolved_lr(cfg) == pytest.approx(1e-3)
    # linear scaling: 1e-3 per 1024 images
    assert resolved_lr(resolve_config(f"{variant}_imagenet", ["batch_size=256"])) == pytest.approx(2.5e-4)
    s = cfg["sched"]
    assert (s["sched"], s["warmup_epochs"], s["warmup_lr"], s["min_lr"]) == ("cosine", 20, 1e-6, 1e-5)
    a = cfg["aug"]
    assert a["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert (a["mixup"], a["cutmix"], a["smoothing"], a["reprob"]) == (0.8, 1.0, 0.1, 0.25)
    assert cfg["ema"]["enabled"] and cfg["ema"]["decay"] == 0.9998
    d = cfg["data"]
    assert (d["img_size"], d["crop_pct"], d["interpolation"]) == (224, 0.9, "bicubic")
    assert set(shipped_recipes()) >= {"pale_tiny_imagenet", "pale_small_imagenet", "pale_base_imagenet", "demo_digits"}


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


def test_overrides_parse_yaml_values():
    cfg = resolve_config("pale_tiny_imagenet", ["optim.lr_base=5e-4", "model.kwargs.pale_size=[7,7]",
                                                "ema.enabled=false", "data.mean=null", "epochs=3"])
    assert cfg["optim"]["lr_base"] == 5e-4
    assert cfg["model"]["kwargs"] == {"pale_size": [7, 7]}  # free-form section
    assert cfg["ema"]["enabled"] is False and cfg["epochs"] == 3
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}
    assert set(ENGINE_DEFAULTS) <= set(cfg)


def test_print_config_cli(capsys):
    assert main(["train", "--recipe", "pale_small_imagenet", "--set", "epochs=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "name: pale_small" in out and "drop_path_rate: 0.3" in out
    assert main(["train", "--set", "optim.nope=1", "--print-config"]) == 1
    assert "unknown recipe key 'optim.nope'" in capsys.readouterr().err
