"""`pale seg train` / `pale det train` defaults against the paper's appendix ("Detailed Experimental
Settings"), per backbone."""
import pytest

from pale.cli import main as pale_main
from pale.dense.det_task import DetectionTask
from pale.dense.engine import fill_variant_defaults, resolve_dense_config
from pale.dense.seg_task import SegmentationTask

VARIANTS = ("pale_tiny", "pale_small", "pale_base")


@pytest.mark.parametrize("variant,drop_path,weight_decay", [
    ("pale_tiny", 0.2, 0.001), ("pale_small", 0.3, 0.001), ("pale_base", 0.5, 0.05)])
def test_coco_defaults_are_the_appendix(variant, drop_path, weight_decay):
    cfg = resolve_dense_config(DetectionTask, None, [f"model.name={variant}"])
    assert cfg["model"]["drop_path_rate"] == drop_path and cfg["optim"]["weight_decay"] == weight_decay
    assert (cfg["epochs"], cfg["batch_size"]) == (12, 16)                  # 1x schedule, 8 GPUs x 2
    assert (cfg["optim"]["opt"], cfg["optim"]["lr"]) == ("adamw", 1e-4)
    s = cfg["sched"]
    assert (s["sched"], s["decay_milestones"], s["decay_rate"]) == ("multistep", [8, 11], 0.1)
    d = cfg["data"]
    assert (d["min_size"], d["max_size"], d["test_min_size"]) == ([800], 1333, 800)   # single-scale


@pytest.mark.parametrize("variant,drop_path", [("pale_tiny", 0.3), ("pale_small", 0.3), ("pale_base", 0.5)])
def test_ade20k_defaults_are_the_appendix(variant, drop_path):
    cfg = resolve_dense_config(SegmentationTask, None, [f"model.name={variant}"])
    assert cfg["model"]["drop_path_rate"] == drop_path
    assert cfg["epochs"] * cfg["data"]["iters_per_epoch"] == 160_000 and cfg["batch_size"] == 16
    o, s = cfg["optim"], cfg["sched"]
    assert (o["opt"], o["lr"], o["weight_decay"]) == ("adamw", 6e-5, 0.01)
    assert (s["sched"], s["warmup_updates"]) == ("poly", 1500)
    assert cfg["model"]["aux_weight"] == 0.4                                # on stage 3 (upernet.py)
    d = cfg["data"]
    assert (d["crop_size"], d["ratio_range"], d["photometric"], d["flip"]) == ([512, 512], [0.5, 2.0], True, 0.5)
    assert cfg["test"]["scales"] == [1.0]                                    # single-scale by default


def test_explicit_values_win_over_the_per_backbone_default():
    cfg = resolve_dense_config(DetectionTask, None, ["model.name=pale_base", "model.drop_path_rate=0.1",
                                                     "data.min_size=[480, 800]"])
    assert cfg["model"]["drop_path_rate"] == 0.1 and cfg["optim"]["weight_decay"] == 0.05
    assert cfg["data"]["min_size"] == [480, 800]                             # multi-scale stays an option


def test_fill_fills_only_nulls_and_names_a_backbone_without_defaults():
    per_variant = {"pale_tiny": {"model.drop_path_rate": 0.2}}
    cfg = {"model": {"name": "pale_tiny", "drop_path_rate": None}}
    assert fill_variant_defaults(cfg, per_variant)["model"]["drop_path_rate"] == 0.2
    cfg = {"model": {"name": "pale_huge", "drop_path_rate": 0.4}}
    assert fill_variant_defaults(cfg, per_variant)["model"]["drop_path_rate"] == 0.4
    cfg = {"model": {"name": "pale_huge", "drop_path_rate": None}}
    with pytest.raises(ValueError, match="backbone 'pale_huge' has no paper default"):
        fill_variant_defaults(cfg, per_variant)


def test_print_config_shows_the_backbones_values(capsys):
    assert pale_main(["det", "train", "--backbone", "pale_base", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "weight_decay: 0.05" in out and "drop_path_rate: 0.5" in out


@pytest.mark.parametrize("task", [SegmentationTask, DetectionTask])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_defaults_keep_every_rule(task, variant):
    from pale.train.recipe import ENGINE_RULES, check_rules

    cfg = resolve_dense_config(task, None, [f"model.name={variant}"])
    check_rules(cfg, (*ENGINE_RULES, *task.rules))  # raises on the first value out of range


@pytest.mark.parametrize("command, override, message", [
    ("seg", "data.crop_size=[512]", "data.crop_size must be a list of 2 integers, each >= 1, got [512]"),
    ("seg", "data.flip=1.5", "data.flip must be a number in [0, 1], got 1.5"),
    ("seg", "test.mode=tiles", "test.mode must be one of whole, slide, got 'tiles'"),
    ("seg", "data.num_classes=0", "data.num_classes must be null or an integer >= 1, got 0"),
    ("det", "data.min_size=[]", "data.min_size must be a non-empty list of integers, each >= 1, got []"),
    ("det", "model.drop_path_rate=1", "model.drop_path_rate must be null or a number in [0, 1), got 1"),
    ("det", "epochs=0", "epochs must be an integer >= 1, got 0"),
])
def test_dense_settings_out_of_range_are_refused_by_name(tmp_path, capsys, command, override, message):
    # refused before the data folder is read: it does not exist
    assert pale_main([command, "train", "--data", str(tmp_path / "none"), "-o", str(tmp_path / "out"),
                      "--set", override]) == 1
    err = capsys.readouterr().err
    assert f"pale {command} train: error: {message}" in err and "Traceback" not in err, err
