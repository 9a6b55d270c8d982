"""ONNX export with dynamic batch/height/width (onnxruntime vs PyTorch), safetensors export, and the timm
model folder (loaded back by timm.create_model("local-dir:..."))."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import pale  # noqa: F401
from pale import export as ex
from pale.checkpoint import create_model_from_file, save_checkpoint
from pale.cli import main
from pale.errors import InputError

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=5)
CLASSES = ["cat", "coffee", "person", "rocket", "tree"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("pale_tiny", **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, model, "pale_tiny", TINY, class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def onnx_file(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    # Traced at the model's input size (224x224, where no layer pads); the command checks the trace
    # size and 33x47 itself, the test below checks the file independently.
    assert main(["export", "pale_tiny", "--checkpoint", str(tiny_checkpoint), "--output", str(out),
                 "--check-size", "33", "47"]) == 0
    return out


def _pads(model, size):
    """Whether any attention layer pads at this image size."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append((m.group_size, a[0].shape[1:3])))
             for layer in ex.attention_layers(model)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for h in hooks:
        h.remove()
    assert seen
    return any(h % s_r or w % s_c for (s_r, s_c), (h, w) in seen)


def test_onnx_equals_pytorch_at_three_sizes_from_one_file(onnx_file, tiny_checkpoint):
    import onnxruntime as ort

    model, _ = create_model_from_file(tiny_checkpoint)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    # 224: no layer pads (56/28/14/7 with pale size 7); 97x131 and 33x47: odd, layers pad.
    shapes = [(1, 3, 224, 224), (3, 3, 97, 131), (2, 3, 33, 47)]
    assert not _pads(model, (224, 224)) and _pads(model, (97, 131)) and _pads(model, (33, 47))
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"image": x.numpy()})[0]
        assert out.shape == ref.shape == (shape[0], 5)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, (shape, rel)


def test_onnx_metadata_holds_class_names_and_preprocessing(onnx_file):
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_file)).metadata_props}
    assert props["model_name"] == "pale_tiny"
    assert props["class_names"] == CLASSES
    assert props["data_config"]["input_size"] == [3, 224, 224]


def test_default_trace_size_is_the_models_input_size(tiny_checkpoint, tmp_path):
    # A trace taken where no layer pads still pads and masks at every other size (no trace-size search).
    model, _ = create_model_from_file(tiny_checkpoint)
    result = ex.export_onnx(model, tmp_path / "m.onnx", exporter="legacy", check_sizes=[(61, 45)])
    assert result.trace_size == (224, 224) and not _pads(model, (224, 224)) and _pads(model, (61, 45))
    assert [c.shape[2:] for c in result.checks] == [(224, 224), (61, 45)]
    assert all(c.max_rel_err <= 1e-4 for c in result.checks)


def test_failed_check_leaves_existing_output_untouched(tiny_checkpoint, tmp_path):
    model, _ = create_model_from_file(tiny_checkpoint)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(ValueError, match="legacy ONNX export does not match PyTorch"):
        ex.export_onnx(model, out, exporter="legacy", trace_size=(64, 64), rtol=1e-12)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_vanilla_dynamic_export_is_refused(tmp_path):
    model = timm.create_model("pale_tiny", **dict(TINY, attn_mode="vanilla"))
    with pytest.raises(ValueError, match="vanilla"):
        ex.export_onnx(model, tmp_path / "v.onnx")
    assert not (tmp_path / "v.onnx").exists()


def test_export_checkpoint_of_other_model_is_an_error(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", "pale_small", "-c", str(tiny_checkpoint), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "holds a pale_tiny, not a pale_small" in capsys.readouterr().err


def test_safetensors_export_loads_back(tiny_checkpoint, tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert main(["export", "pale_tiny", "-c", str(tiny_checkpoint), "--format", "safetensors", "-o", str(out)]) == 0
    model, _ = create_model_from_file(tiny_checkpoint)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        ref = model(x)
        again, info = create_model_from_file(out)
        assert info["class_names"] == CLASSES and info["model_name"] == "pale_tiny"
        assert torch.equal(again(x), ref)
        # timm drops a checkpoint's classifier when num_classes differs from the pretrained
        # config's (1000), so the overlay states the class count too (docs/deploy.md).
        kwargs = info["model_kwargs"]
        overlay = dict(file=str(out), num_classes=kwargs["num_classes"])
        via_timm = timm.create_model("pale_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
        assert torch.equal(via_timm(x), ref)


def test_the_file_name_chooses_the_format_and_a_contradiction_is_refused(tiny_checkpoint, tmp_path, capsys):
    # -o x.safetensors used to get an ONNX graph (the default format) under that name
    out = tmp_path / "weights.safetensors"
    assert main(["export", "-c", str(tiny_checkpoint), "-o", str(out)]) == 0
    again, info = create_model_from_file(out)
    assert info["model_name"] == "pale_tiny"
    capsys.readouterr()
    for args, message in [
        (["-o", str(tmp_path / "m.onnx"), "--format", "safetensors"], "names an onnx file but --format is safetensors"),
        (["-o", str(tmp_path / "m.txt")], "cannot tell the format from -o"),
        (["-o", str(tmp_path / "m") + "/", "--format", "onnx"], "names a folder but --format is onnx"),
        (["-o", str(tmp_path / "m.onnx"), "--format", "timm"], "names an onnx file but --format is timm"),
        (["-o", str(tmp_path / "m.onnx"), "--opset", "99"], "ONNX opset 99 is not one torch"),
        # sizes the model refuses: one line naming the size, not a failed trace and a failed torch.export
        (["-o", str(tmp_path / "m.onnx"), "--trace-size", "2", "2"], "does not run on 2x2 images"),
        (["-o", str(tmp_path / "m.onnx"), "--check-size", "1", "5"], "does not run on 1x5 images"),
    ]:
        assert main(["export", "-c", str(tiny_checkpoint), *args]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]  # nothing else written


@pytest.mark.slow
def test_dynamo_exporter_also_matches(tiny_checkpoint, tmp_path):
    model, _ = create_model_from_file(tiny_checkpoint)
    result = ex.export_onnx(model, tmp_path / "d.onnx", exporter="dynamo",
                            check_sizes=[(224, 224), (97, 131), (33, 47)])
    assert result.exporter == "dynamo" and result.opset == 18 and result.trace_size == (224, 224)
    assert len(result.checks) == 3 and all(c.max_rel_err <= 1e-4 for c in result.checks)


@pytest.mark.slow
def test_auto_falls_back_to_dynamo_for_static_vanilla(tmp_path):
    # The legacy exporter cannot export vanilla's pale index, which is built while tracing.
    model = timm.create_model("pale_tiny", **dict(TINY, attn_mode="vanilla"))
    result = ex.export_onnx(model, tmp_path / "v.onnx", dynamic=False)
    assert result.exporter == "dynamo" and "cannot export this model" in result.failed["legacy"]
    assert result.checks[0].max_rel_err <= 1e-4


def test_exporter_errors_become_one_plain_line():
    # the dynamo exporter's messages carry terminal colour codes and a multi-line report
    raw = "Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of exporting.\nNext steps: ..."
    with pytest.raises(InputError) as caught:
        with ex._clear_exporter_errors("dynamo"):
            raise torch.onnx.errors.OnnxExporterError(raw)
    assert str(caught.value) == ("the dynamo ONNX exporter cannot export this model: Failed to export the model "
                                 "with torch.export. This is step 1/3 of exporting.")


# ---- timm model folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint of a real (tiny) `pale train` run: raw and EMA weights, 24x24 images, classes a, b."""
    from pale.train import train
    from tiny_train import tiny_recipe, write_tiny_folder

    root = tmp_path_factory.mktemp("trained")
    train(tiny_recipe(write_tiny_folder(root / "data")), ["ema.max_window=1.0"], root / "run")  # EMA != raw
    return root / "run" / "last.pth"


def test_timm_folder_loads_back_with_the_checkpoints_outputs(trained_checkpoint, tmp_path, capsys):
    """What `timm.create_model("local-dir:...", pretrained=True)` builds from the folder computes exactly
    what the checkpoint's chosen weights compute, and carries the class names and evaluation crop."""
    from timm.data import resolve_model_data_config

    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for weights in ("raw", "ema", "best"):
        folder = tmp_path / weights
        # the format from the name: a folder (ending in /) is a timm folder
        assert main(["export", "-c", str(trained_checkpoint), "-o", str(folder) + "/", "--weights", weights]) == 0
        assert f"wrote {folder}/ (" in capsys.readouterr().out, weights
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        config = json.loads((folder / "config.json").read_text())
        assert (config["architecture"], config["num_classes"], config["label_names"]) == ("pale_tiny", 2, ["a", "b"])
        assert config["model_args"]["embed_dims"] == [8, 16, 16, 16]
        loaded = timm.create_model("local-dir:" + str(folder), pretrained=True).eval()
        expected, _ = create_model_from_file(trained_checkpoint, weights=weights)
        with torch.no_grad():
            outputs[weights] = loaded(x)
            assert torch.equal(outputs[weights], expected(x)), weights
        data = resolve_model_data_config(loaded)
        assert (data["crop_pct"], data["crop_mode"], data["input_size"]) == (0.875, "squash", (3, 24, 24))
    assert not torch.equal(outputs["raw"], outputs["ema"])  # the choice of weights reaches the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "ema", "raw"]  # no temporary folders left


def test_timm_folder_of_a_checkpoint_without_preprocessing_has_the_papers_crop(tiny_checkpoint, tmp_path):
    """...and the folder and its files get ordinary permissions (not mkdtemp's or safetensors' owner-only)."""
    import os

    folder = tmp_path / "tiny"
    old_umask = os.umask(0o022)
    try:
        assert main(["export", "-c", str(tiny_checkpoint), "--format", "timm", "-o", str(folder)]) == 0
    finally:
        os.umask(old_umask)
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert (cfg["crop_pct"], cfg["crop_mode"], cfg["input_size"]) == (0.875, "squash", [3, 224, 224])
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [folder, *folder.iterdir()]}
    assert modes == {"tiny": "0o755", "config.json": "0o644", "model.safetensors": "0o644"}


def test_timm_folder_bad_targets_are_one_line_errors_and_nothing_is_lost(tiny_checkpoint, tmp_path, capsys,
                                                                         monkeypatch):
    def export(out, checkpoint=tiny_checkpoint):
        code = main(["export", "-c", str(checkpoint), "--format", "timm", "-o", str(out)])
        return code, capsys.readouterr().err.strip()

    missing = tmp_path / "nope.pth"
    assert export(tmp_path / "m", missing) == (1, f"pale export: error: checkpoint not found: {missing}")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert export(other) == (1, f"pale export: error: {other} is a folder of other files, not a timm model folder "
                                f"(no config.json): name a new or empty folder")
    assert [p.name for p in other.iterdir()] == ["todo.txt"]
    (tmp_path / "file").write_text("x")
    assert export(tmp_path / "file") == (1, f"pale export: error: cannot write the folder {tmp_path / 'file'}: it is a file")

    # an export that fails half-way leaves the earlier timm folder as it was, and no temporary folder
    good = tmp_path / "good"
    assert export(good)[0] == 0
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def half_then_fail(model, folder, **kwargs):
        (Path(folder) / "config.json").write_text("{")
        raise OSError("disk full")
    monkeypatch.setattr(timm.models, "save_for_hf", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export(good)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "good", "notes"]
    # a timm folder is replaced whole: what else it held goes with it
    monkeypatch.undo()
    (good / "README.md").write_text("old card")
    assert export(good)[0] == 0
    assert sorted(p.name for p in good.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "good", "notes"]
