"""The command line as a whole: one option language, one-line errors for bad input, weight selection,
fast start-up, progress lines in logs, and the library/command layering."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import pale
from pale.checkpoint import read_model_file, save_checkpoint, select_weights
from pale.errors import CheckpointError, InputError, UserError
from pale.files import load_safetensors, save_safetensors
from pale.images import BadImageError, IMAGE_EXTENSIONS
from pale.cli import main

SRC = Path(pale.__file__).parent
TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=3)
CLASSES = ["a", "b", "c"]


def _subprocess(*args: str, stdin_cmd: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC.parent), OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


# ---- start-up ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["predict", "--batch-size", "0", "x.png", "-c", "y.pth"],
                                  ["seg", "eval", "--help"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    proc = _subprocess("-X", "importtime", "-m", "pale", *argv)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "pale.cli" in imported
    assert not {"torch", "timm", "numpy"} & imported
    assert proc.returncode == (0 if "--help" in argv else 2)


@pytest.mark.parametrize("imports", ["pale, timm", "timm, pale", "pale.files, timm.models"])
def test_import_pale_registers_the_models_and_reaches_submodules(imports):
    """In either order: pale registers the models when timm is imported, or at once if it already is."""
    code = (f"import {imports}; print(timm.is_model('pale_tiny'), callable(pale.images.load_image), "
            "pale.PaleTransformer.__name__, callable(pale.progress.progress), callable(pale.create_model_from_file))")
    proc = _subprocess("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "PaleTransformer", "True", "True"]


def test_import_pale_alone_imports_neither_torch_nor_timm():
    proc = _subprocess("-c", "import sys, pale; print(sorted({'torch', 'timm'} & set(sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- weights -------------------------------------------------------------------------------------

def _sd(value: float) -> dict:
    return {"w": torch.full((2,), value)}


@pytest.mark.parametrize("metrics, expected", [
    ({"raw": {"top1": 90.0}, "ema": {"top1": 40.0}}, "raw"),   # short run: EMA still near the initialisation
    ({"raw": {"top1": 80.0}, "ema": {"top1": 81.0}}, "ema"),
    ({"raw": {"top1": 80.0}, "ema": {"top1": 80.0}}, "raw"),   # tie: raw
])
def test_best_weights_are_the_ones_that_validated_better(metrics, expected):
    ckpt = dict(model=_sd(1.0), model_ema=_sd(2.0), val_metrics=metrics, best_metric="top1")
    state, which, why = select_weights(ckpt, "best")
    assert which == expected and float(state["w"][0]) == (1.0 if expected == "raw" else 2.0)
    tie = metrics["raw"] == metrics["ema"]
    assert why.startswith("validated as well as the EMA weights (top1 80)" if tie else "validated better: top1")
    assert select_weights(ckpt, "ema")[1] == "ema" and float(select_weights(ckpt, "raw")[0]["w"][0]) == 1.0


@pytest.mark.parametrize("ckpt", [
    dict(model=_sd(1.0), model_ema=_sd(2.0)),                                              # never validated
    dict(model=_sd(1.0), model_ema=_sd(2.0), val_metrics={"raw": {"top1": 1.0}}, best_metric="top1"),  # one set only
    dict(model=_sd(1.0), model_ema=_sd(2.0), val_metrics={"raw": {"miou": 1.0}, "ema": {"miou": 2.0}},
         best_metric="top1"),                                                              # other metric
])
def test_best_without_metrics_of_both_sets_is_raw_and_says_so(ckpt):
    state, which, why = select_weights(ckpt, "best")
    assert which == "raw" and float(state["w"][0]) == 1.0 and "without validation" in why


def test_best_falls_back_to_the_history_entry_of_these_weights():
    history = [dict(epoch=1, val_top1=50.0, ema_val_top1=20.0), dict(epoch=2, val_top1=70.0, ema_val_top1=75.0)]
    ckpt = dict(model=_sd(1.0), model_ema=_sd(2.0), history=history, best=dict(metric="ema_val_top1"), epoch=2, step=0)
    assert select_weights(ckpt, "best")[1:] == ("ema", "validated better: top1 75 (ema) vs 70")
    # saved mid-epoch (interrupted): the last entry validated older weights
    assert "without validation" in select_weights(dict(ckpt, step=3), "best")[2]
    assert "without validation" in select_weights(dict(ckpt, epoch=3), "best")[2]


def test_single_set_files_refuse_ema(tmp_path):
    no_ema = dict(model=_sd(1.0), model_ema=None, val_metrics={"raw": {"top1": 5.0}}, best_metric="top1")
    assert select_weights(no_ema, "best")[1] == "raw"
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        select_weights(no_ema, "ema")
    torch.save(_sd(3.0), tmp_path / "plain.pth")
    assert read_model_file(tmp_path / "plain.pth", "best")[1]["weights"] == "raw"
    with pytest.raises(CheckpointError, match="holds one set of weights \\(raw\\)"):
        read_model_file(tmp_path / "plain.pth", "ema")
    save_safetensors(_sd(4.0), tmp_path / "e.safetensors", metadata=dict(weights="ema"))
    assert read_model_file(tmp_path / "e.safetensors", "ema")[1]["weights"] == "ema"
    with pytest.raises(CheckpointError, match="not raw ones"):
        read_model_file(tmp_path / "e.safetensors", "raw")
    with pytest.raises(InputError, match="unknown weights 'newest'"):
        select_weights(no_ema, "newest")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier checkpoint whose raw weights validated better than its (untrained) EMA ones,
    and a 3-class image folder of real photos."""
    import skimage.data

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    raw = timm.create_model("pale_tiny", **TINY).eval()
    ema = timm.create_model("pale_tiny", **TINY).eval()
    save_checkpoint(root / "run.pth", raw, "pale_tiny", TINY, class_names=CLASSES,
                        model_ema=ema.state_dict(), best_metric="top1",
                        val_metrics={"raw": {"top1": 90.0}, "ema": {"top1": 35.0}})
    for i, (name, photo) in enumerate(zip(CLASSES, ("astronaut", "coffee", "chelsea"))):
        (root / "data" / name).mkdir(parents=True)
        Image.fromarray(getattr(skimage.data, photo)()).resize((64, 48)).save(root / "data" / name / f"{i}.png")
    return root, raw, ema


def test_eval_predict_export_use_and_print_the_chosen_weights(trained, tmp_path, capsys):
    root, raw, ema = trained
    ckpt = str(root / "run.pth")
    assert main(["eval", "-c", ckpt, "--data", str(root / "data"), "-o", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert "weights: raw (validated better: top1 90 (raw) vs 35)" in err and "precision: none" in err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["weights"] == "raw" and result["amp"] == "none" and result["n"] == 3
    # the old positional spelling still works and gives the same numbers; the EMA weights differ
    assert main(["eval", ckpt, "--data", str(root / "data"), "--weights", "ema", "--json-out", str(tmp_path / "m.json")]) == 0
    ema_result = json.loads((tmp_path / "m.json").read_text())
    assert ema_result["weights"] == "ema" and ema_result["loss"] != pytest.approx(result["loss"])
    capsys.readouterr()
    assert main(["predict", str(root / "data"), "-c", ckpt, "--weights", "ema", "--json", "--device", "auto"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("weights: ema (EMA weights, as asked)") and json.loads(out.out)["weights"] == "ema"
    # export needs no model name: the checkpoint records it; the file says which weights it holds
    assert main(["export", "-c", ckpt, "--format", "safetensors", "-o", str(tmp_path / "w.safetensors")]) == 0
    state, meta = load_safetensors(tmp_path / "w.safetensors")
    assert meta["weights"] == "raw" and meta["model_name"] == "pale_tiny"
    if not torch.cuda.is_available():  # the message names the eval option, not only the recipe key
        capsys.readouterr()
        assert main(["eval", "-c", ckpt, "--data", str(root / "data"), "--amp", "fp16"]) == 1
        assert "amp fp16 (train.amp, --amp) needs a CUDA device" in capsys.readouterr().err
    assert all(torch.equal(state[k], v) for k, v in raw.state_dict().items())


# ---- one-line errors -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "seg.safetensors"
    save_safetensors(_sd(0.0), path, metadata=dict(task="segmentation", model_name="upernet_pale_tiny",
                                                        model_kwargs={"backbone": "pale_tiny", "num_classes": 2}))
    return path


@pytest.mark.parametrize("command", [["eval", "--data", "."], ["predict", "IMAGE"], ["export", "-o", "x.onnx"],
                                     ["visualize", "attention", "IMAGE", "--token", "1", "1"]])
def test_segmentation_checkpoint_to_classifier_commands_is_one_line(seg_checkpoint, trained, command, capsys):
    image = str(next((trained[0] / "data" / "a").iterdir()))
    argv = [image if a == "IMAGE" else a for a in command] + ["-c", str(seg_checkpoint)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert ("is a segmentation checkpoint (upernet_pale_tiny), which the classifier commands (eval, predict, "
            "export, visualize) do not take: use `pale seg eval` or `pale seg predict` with it (in Python: "
            "pale.dense.seg_task.load_segmenter)") in err
    assert len(err.strip().splitlines()) == 1


def test_detection_checkpoint_to_a_classifier_command_names_the_det_commands(tmp_path, capsys):
    path = tmp_path / "det.safetensors"
    save_safetensors(_sd(0.0), path, metadata=dict(task="detection", model_name="maskrcnn_pale_tiny",
                                                        model_kwargs={"backbone": "pale_tiny", "num_classes": 2}))
    assert main(["export", "-c", str(path), "-o", str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "is a detection checkpoint (maskrcnn_pale_tiny), which the classifier commands (eval, predict, export, "
        "visualize) do not take: use `pale det eval` or `pale det predict` with it (in Python: "
        "pale.dense.det_task.load_detector)")
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_model_names_are_one_line(capsys):
    assert main(["export", "pale_mini"]) == 1
    assert "unknown model 'pale_mini' (Pale models: pale_base, pale_small, pale_tiny" in capsys.readouterr().err
    from pale.dense.backbone import create_pale_features

    with pytest.raises(InputError, match="unknown backbone 'pale_huge'"):
        create_pale_features("pale_huge")
    with pytest.raises(SystemExit):
        main(["seg", "train", "--backbone", "pale_huge", "--data", "."])
    assert "invalid choice: 'pale_huge'" in capsys.readouterr().err


def test_info_meta_counts_mask_rcnn_without_weights(capsys):
    """Mask R-CNN's value-dependent RoI selection runs on meta tensors too: no NotImplementedError."""
    assert main(["info", "pale_tiny", "--kind", "maskrcnn", "--meta"]) == 0
    out = capsys.readouterr().out
    assert "41.39M" in out


@pytest.mark.parametrize("argv", [
    ["predict", "x.png", "-c", "c.pth", "--batch-size", "0"],
    ["predict", "x.png", "-c", "c.pth", "--topk", "-1"],
    ["eval", "-c", "c.pth", "--data", ".", "--batch-size", "abc"],
    ["eval", "-c", "c.pth", "--data", ".", "--workers", "-2"],
    ["eval", "-c", "c.pth", "--data", ".", "--amp", "fp8"],
    ["eval", "-c", "c.pth", "--data", ".", "--weights", "newest"],
    ["export", "-c", "c.pth", "--rtol", "0"],
    ["export", "-c", "c.pth", "--opset", "0"],
    ["export", "-c", "c.pth", "--check-size", "0", "5"],
    ["visualize", "receptive-field", "--size", "0", "4"],
    ["visualize", "receptive-field", "--heads", "0"],
    ["visualize", "attention", "x.png", "-c", "c.pth", "--token", "-1", "3"],
    ["seg", "predict", "x.png", "-c", "c.pth", "--alpha", "1.5"],
    ["seg", "eval", "-c", "c.pth", "--data", ".", "--scales", "0"],
    ["seg", "train", "--epochs", "0"],
    ["det", "predict", "x.png", "-c", "c.pth", "--score-thr", "nan"],
    ["det", "eval", "-c", "c.pth", "--data", ".", "--workers", "-1"],
    ["info", "pale_tiny", "--img-size", "0", "224"],
])
def test_bad_numbers_are_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "-c", "missing.pth", "--data", "."], "checkpoint not found: missing.pth"),
    (["eval", "--data", "."], "no checkpoint given: pass -c/--checkpoint FILE"),
    (["predict", "missing.png", "-c", "c.pth"], "image or folder not found: missing.png"),
    (["export", "-c", "missing.pth"], "checkpoint not found: missing.pth"),
    (["seg", "predict", "missing.png", "-c", "c.pth"], "image or folder not found: missing.png"),
    (["det", "eval", "-c", "missing.pth", "--data", "."], "checkpoint not found: missing.pth"),
    (["visualize", "attention", "missing.png", "-c", "c.pth", "--token", "1", "1"], "image not found: missing.png"),
])
def test_missing_files_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bugs_keep_their_traceback(monkeypatch):
    """Only pale's user-error types become one line: a TypeError or KeyError inside a command is a bug."""
    from pale.commands import predict as predict_command

    def broken(args):
        raise KeyError("internal")
    monkeypatch.setattr(predict_command, "run", broken)
    with pytest.raises(KeyError):
        main(["predict", "x.png", "-c", "c.pth"])
    assert issubclass(CheckpointError, UserError) and issubclass(BadImageError, UserError)


def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, capsys):
    from pale.commands import predict as predict_command

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(predict_command, "run", interrupted)
    assert main(["predict", "x.png", "-c", "c.pth"]) == 130
    assert capsys.readouterr().err.strip() == "pale predict: interrupted"
    monkeypatch.setenv("PALE_DEBUG", "1")  # the traceback, for whoever debugs
    with pytest.raises(KeyboardInterrupt):
        main(["predict", "x.png", "-c", "c.pth"])


def test_predict_into_a_closed_pipe_exits_quietly(trained):
    root, _, _ = trained
    folders = " ".join([str(root / "data")] * 150)  # 450 predictions: more JSON than a pipe buffers
    proc = subprocess.run(
        f"{sys.executable} -m pale predict {folders} -c {root / 'run.pth'} --json --topk 3 | head -c 10",
        shell=True, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(SRC.parent), OMP_WAIT_POLICY="PASSIVE"))
    assert proc.stdout == "{\n  \"check"[:10]
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


# ---- progress ------------------------------------------------------------------------------------

def test_progress_in_a_log_is_plain_lines(capsys, monkeypatch):
    from pale.progress import LineProgress, progress

    assert isinstance(progress(range(3)), LineProgress)  # pytest's stderr is not a terminal
    bar = LineProgress(total=4, desc="epoch 1/2", unit="updates", interval=0.0)
    for step in range(1, 5):
        bar.set_postfix(loss=f"0.{step}")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines) and len(lines) == 4  # close does not repeat the last line
    assert lines[1].startswith("epoch 1/2: 2/4 updates (50%)")
    assert [line.rsplit("loss=", 1)[1] for line in lines] == ["0.1", "0.2", "0.3", "0.4"]  # each update's own
    bar = LineProgress(total=4, interval=0.0)
    bar.update(1)
    bar.interval = 3600.0
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith("4/4")  # the end is reported when not yet shown
    quiet = LineProgress(total=100, interval=3600.0)
    quiet.update(100)
    quiet.close()
    assert capsys.readouterr().err == ""  # short work: no line at all
    monkeypatch.setenv("PALE_PROGRESS_INTERVAL", "0")
    assert progress(total=2).interval == 0.0


# ---- layering ------------------------------------------------------------------------------------

def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
            yield from (("." * node.level) + (node.module + "." if node.module else "") + a.name for a in node.names)


def test_library_never_imports_argparse_or_the_command_layer():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "commands" or rel.name in ("cli.py", "__main__.py"):
            continue
        bad = [m for m in _imports(path) if m == "argparse" or "commands" in m.split(".") or m.endswith("cli")]
        assert not bad, f"{rel} imports {bad}"


def test_file_modules_never_import_the_models():
    """Files, images, devices, errors and checkpoints sit below the models: only importing timm (in
    pale.checkpoint) registers them, through the package."""
    for name in ("files.py", "images.py", "device.py", "errors.py", "checkpoint.py"):
        bad = [m for m in _imports(SRC / name) if m.lstrip(".").split(".")[0] in ("models", "train", "dense")
               or m.startswith("pale.models")]
        assert not bad, f"{name} imports {bad}"


def test_one_image_loader_and_one_extension_list():
    defs = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
            if any(isinstance(n, ast.FunctionDef) and n.name in ("load_image", "find_images", "list_images")
                   for n in ast.walk(ast.parse(p.read_text())))}
    assert defs == {"images.py"}
    assert ".gif" not in IMAGE_EXTENSIONS and ".jpg" in IMAGE_EXTENSIONS


def test_kind_and_table_choices_match_the_library():
    from pale.commands.info import KIND_HELP, PAPER_TABLE_NAMES, model_kinds
    from pale.conformance import TABLES

    assert set(KIND_HELP) == set(model_kinds()) and PAPER_TABLE_NAMES == TABLES


def _commands(parser, prefix=()):
    """``(name, parser)`` of every command and sub-command under ``parser``."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _commands(sub, prefix + (name,))


def test_every_output_is_dash_o_and_old_spellings_are_hidden():
    import argparse

    from pale.cli import build_parser

    writers = []
    for name, sub in _commands(build_parser()):
        for action in sub._actions:
            visible = action.help != argparse.SUPPRESS
            if action.dest == "output" and visible:
                writers.append(" ".join(name))
                assert action.option_strings[:2] == ["--output", "-o"], (name, action.option_strings)
            # older spellings of an output (--out, --json-out) parse but are not shown
            assert not (visible and {"--out", "--json-out"} & set(action.option_strings)), (name, action.option_strings)
    assert {"train", "demo", "export", "predict", "eval", "bench", "complexity-report", "visualize attention",
            "seg predict", "det predict"} <= set(writers)
    parse = build_parser().parse_args
    assert parse(["complexity-report", "--out", "x.md"]).output == "x.md"
    assert parse(["bench", "--json", "b.json"]).json == "b.json" and parse(["bench", "--json"]).json == "-"


def test_info_at_a_size_beyond_memory_says_add_meta_and_prints_wide_numbers(capsys, monkeypatch):
    # 100000x100000 failed inside the CPU allocator (120 GB for one activation); with --meta the total
    # ran into the next column ("21.75M50172620.00G")
    import pale.complexity

    def allocator_fails(*args, **kwargs):  # the allocator's own words, without asking a machine for 120 GB
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 120000000000 bytes. Error code 12")
    with monkeypatch.context() as patch:
        patch.setattr(pale.complexity, "measure_cost", allocator_fails)
        assert main(["info", "pale_tiny", "--img-size", "100000", "100000"]) == 1
    err = capsys.readouterr().err
    assert "needs more memory than this machine has" in err and "add --meta" in err and "Traceback" not in err
    assert main(["info", "pale_tiny", "--img-size", "100000", "100000", "--meta"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total")).split()
    assert total[1] == "21.75M" and total[2].endswith("P") and total[2] == total[3]
