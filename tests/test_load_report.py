"""pale.checkpoint's reading side where mutants survived the other tests: LoadReport's text, the report a
WeightsMismatchError carries, which weights read_model_file picks, and create_model_from_file's
strictness and overrides."""
import re
from pathlib import Path

import pytest
import torch

from pale.checkpoint import (LoadReport, WeightsMismatchError, create_model_from_file, describe_weights, load_weights,
                             read_model_file, save_checkpoint, select_weights)
from pale.errors import CheckpointError, InputError, MissingFileError
from pale.files import load_safetensors, save_safetensors, save_torch

TINY = dict(embed_dims=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], num_classes=3)


def test_describe_lists_every_kind_of_difference_up_to_the_limit():
    report = LoadReport(missing=["a", "b"], unexpected=["z"],
                        mismatched=[(f"w{i}", (i, 2), (i, 3)) for i in range(25)])
    lines = report.describe().split("\n")
    assert lines[0] == "25 keys with another shape (file vs model):"
    assert lines[1:21] == [f"  w{i}: ({i}, 2) vs ({i}, 3)" for i in range(20)]   # 20 shown by default
    assert lines[21:] == ["2 keys missing from the file: a, b", "1 keys the model does not have: z"]
    assert LoadReport(unexpected=["y", "z"]).describe() == "2 keys the model does not have: y, z"
    assert report.describe(limit=2).split("\n")[1:3] == ["  w0: (0, 2) vs (0, 3)", "  w1: (1, 2) vs (1, 3)"]
    assert not report.ok and LoadReport().ok and LoadReport().describe() == ""


def test_mismatch_error_carries_its_report():
    model = torch.nn.Linear(2, 3)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(model, {"weight": torch.zeros(4, 2), "extra": torch.zeros(1)})
    report = info.value.report
    assert report.mismatched == [("weight", (4, 2), (3, 2))]
    assert report.missing == ["bias"] and report.unexpected == ["extra"]


def test_read_model_file_picks_the_asked_weights_and_keeps_training_state_out_of_the_description(tmp_path):
    model = torch.nn.Linear(2, 2)
    ema = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    state = dict(optimizer={"lr": 1}, scheduler={}, scaler={}, rng=[1], epoch=3)
    save_checkpoint(tmp_path / "c.pth", model, "m", {"a": 1}, ["x"], model_ema=ema, **state)
    weights, info = read_model_file(tmp_path / "c.pth", weights="ema")
    assert all(torch.equal(weights[k], ema[k]) for k in ema)
    assert {k: v for k, v in info.items() if not k.startswith("weights")} == \
        dict(model_name="m", model_kwargs={"a": 1}, class_names=["x"], epoch=3)
    assert info["weights"] == "ema"
    # never validated: "best" cannot know which is better and takes the raw weights, saying so
    weights, info = read_model_file(tmp_path / "c.pth")
    assert all(torch.equal(weights[k], model.state_dict()[k]) for k in weights) and info["weights"] == "raw"
    assert "without validation" in info["weights_reason"]

    save_torch(dict(state_dict=model.state_dict(), epoch=1), tmp_path / "s.pth")
    weights, info = read_model_file(tmp_path / "s.pth")
    assert all(torch.equal(weights[k], model.state_dict()[k]) for k in weights) and info["epoch"] == 1


def test_create_model_from_file_is_strict_and_applies_overrides(tmp_path):
    import timm

    import pale  # noqa: F401

    model = timm.create_model("pale_tiny", **TINY)
    save_checkpoint(tmp_path / "c.pth", model, "pale_tiny", TINY, ["a", "b", "c"])
    rebuilt, info = create_model_from_file(tmp_path / "c.pth", attn_mode="axial")
    assert rebuilt.attn_mode == "axial" and info["class_names"] == ["a", "b", "c"]
    with pytest.raises(WeightsMismatchError, match=re.escape(f"{tmp_path / 'c.pth'} does not fit PaleTransformer")):
        create_model_from_file(tmp_path / "c.pth", num_classes=5)
    # Non-strict: a warning naming the file, attributed to the caller (not to pale/checkpoint.py itself).
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'c.pth'}: loaded the weights that fit")) as caught:
        create_model_from_file(tmp_path / "c.pth", strict=False, num_classes=5)
    assert Path(caught[0].filename).name != "checkpoint.py"


def test_load_weights_strips_a_ddp_prefix_and_names_its_source():
    model = torch.nn.Linear(2, 2)
    wrapped = {"module." + k: v + 1 for k, v in model.state_dict().items()}
    assert load_weights(model, wrapped).ok
    assert all(torch.equal(model.state_dict()[k[len("module."):]], v) for k, v in wrapped.items())
    with pytest.raises(WeightsMismatchError, match="^state dict does not fit Linear"):
        load_weights(model, {})


def _set(value: float) -> dict:
    return {"w": torch.full((2,), value)}


def test_each_choice_of_weights_says_why():
    both = dict(model=_set(1.0), model_ema=_set(2.0), val_metrics={"raw": {"top1": 1.0}, "ema": {"top1": 2.0}},
                best_metric="top1")
    assert select_weights(both)[1:] == ("ema", "validated better: top1 2 (ema) vs 1")   # "best" by default
    raw_better = dict(both, val_metrics={"raw": {"top1": 3.0}, "ema": {"top1": 2.0}})
    assert select_weights(raw_better)[1:] == ("raw", "validated better: top1 3 (raw) vs 2")
    tie = dict(both, val_metrics={"raw": {"top1": 99.0}, "ema": {"top1": 99.0}})
    assert select_weights(tie)[1:] == ("raw", "validated as well as the EMA weights (top1 99); a tie goes to raw")
    assert select_weights(dict(both, val_metrics={"raw": 3.0, "ema": {"top1": 2.0}}))[2].startswith("raw weights chosen")
    assert select_weights(both, "ema")[1:] == ("ema", "EMA weights, as asked")
    assert select_weights(both, "raw")[1:] == ("raw", "raw weights, as asked")
    assert select_weights(dict(model=_set(1.0)))[1:] == ("raw", "the only weights in the file")
    with pytest.raises(CheckpointError, match="^checkpoint has no model weights"):
        select_weights(dict(model_ema=_set(2.0)))
    with pytest.raises(InputError, match="expected one of best, ema, raw$"):
        select_weights(both, "newest")


@pytest.mark.parametrize("entries,expected", [
    (dict(), "raw"),                                                            # no history, no best
    (dict(best=dict(metric="val_top1")), "raw"),                               # a best entry, no history
    (dict(history=[dict(epoch=3, val_top1=1.0, ema_val_top1=2.0)]), "raw"),  # history, no best entry
    (dict(history=[], best=dict(metric="val_top1")), "raw"),                   # empty history
    (dict(history=[dict(epoch=1, val_top1=5.0, ema_val_top1=9.0), dict(epoch=2, val_top1=5.0, ema_val_top1=9.0),
                   dict(epoch=3, val_top1=1.0, ema_val_top1=2.0)], best=dict(metric="val_top1")), "ema"),
])
def test_best_reads_the_last_history_entry_only_when_it_validated_these_weights(entries, expected):
    """Checkpoints without ``val_metrics``: the last of 3 history entries (not the 2nd), a ``best``
    metric with or without ``ema_``, and no ``step`` key (an end-of-epoch save)."""
    ckpt = dict(model=_set(1.0), model_ema=_set(2.0), epoch=3, **entries)
    which, why = select_weights(ckpt)[1:]
    assert which == expected
    assert why.startswith("validated better: top1 2 (ema) vs 1" if expected == "ema" else "raw weights chosen")


def test_single_set_files_and_the_line_commands_print(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_torch(model.state_dict(), tmp_path / "plain.pth")
    info = read_model_file(tmp_path / "plain.pth")[1]
    assert (info["weights"], info["weights_reason"]) == ("raw", "the only weights in the file")
    assert describe_weights(info) == "weights: raw (the only weights in the file)"
    assert describe_weights({}) == "weights: raw (the only weights in the file)"
    assert describe_weights(dict(weights="ema", weights_reason="EMA weights, as asked")) == \
        "weights: ema (EMA weights, as asked)"
    save_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    tensors = load_safetensors(tmp_path / "w.safetensors")[0]
    assert all(v.device.type == "cpu" for v in tensors.values())
    with pytest.raises(MissingFileError, match="^weights file not found: "):
        load_safetensors(tmp_path / "missing.safetensors")


def test_errors_about_a_files_weights_name_the_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    sd = model.state_dict()
    files = dict(plain=(tmp_path / "plain.pth", sd), wrapped=(tmp_path / "wrapped.pth", dict(state_dict=sd, epoch=1)),
                 raw=(tmp_path / "raw.pth", dict(model=sd)))
    for path, obj in files.values():
        save_torch(obj, path)
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{path} holds")):
            read_model_file(path, "ema")
    weights, info = read_model_file(files["plain"][0])
    assert all(torch.equal(weights[k], sd[k]) for k in sd) and info == dict(
        weights="raw", weights_reason="the only weights in the file")
    assert "state_dict" not in read_model_file(files["wrapped"][0])[1]
    save_safetensors(sd, tmp_path / "plain.safetensors")   # an export without a 'weights' entry
    assert read_model_file(tmp_path / "plain.safetensors")[1]["weights"] == "raw"
    save_safetensors(sd, tmp_path / "e.safetensors", metadata=dict(weights="ema"))
    info = read_model_file(tmp_path / "e.safetensors")[1]
    assert (info["weights"], info["weights_reason"]) == ("ema", "the only weights in the file")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{tmp_path / 'e.safetensors'} holds one set")):
        read_model_file(tmp_path / "e.safetensors", "raw")
    save_torch(dict(epoch=1, note="no weights"), tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="has no model weights"):
        read_model_file(tmp_path / "none.pth")


def test_create_model_from_file_checks_the_task_and_the_stored_settings(tmp_path):
    import timm

    import pale  # noqa: F401

    model = timm.create_model("pale_tiny", **TINY)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pth", model, "pale_tiny", TINY, task="classification", model_ema=ema)
    assert create_model_from_file(tmp_path / "c.pth", weights="ema")[1]["weights"] == "ema"
    for task, command, loader in (("segmentation", "seg", "seg_task.load_segmenter"),
                                  ("detection", "det", "det_task.load_detector")):
        save_checkpoint(tmp_path / "s.pth", model, "upernet_pale_tiny", TINY, task=task)
        with pytest.raises(CheckpointError, match="^" + re.escape(
                f"{tmp_path / 's.pth'} is a {task} checkpoint (upernet_pale_tiny), which the classifier commands "
                f"(eval, predict, export, visualize) do not take: use `pale {command} eval` or `pale {command} "
                f"predict` with it (in Python: pale.dense.{loader})") + "$"):
            create_model_from_file(tmp_path / "s.pth")
    save_checkpoint(tmp_path / "b.pth", model, "pale_tiny", dict(TINY, pale_size=0))
    with pytest.raises(InputError, match="^" + re.escape(f"{tmp_path / 'b.pth'}: cannot build pale_tiny")):
        create_model_from_file(tmp_path / "b.pth")
