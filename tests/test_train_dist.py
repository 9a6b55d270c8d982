"""Training across processes: torchrun with 2 CPU processes (gloo), and a run killed with SIGKILL in
the middle of an epoch that resumes to the same result as an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import yaml

from pale.io import load_torch
from pale.train import train
from test_train import TINY_MODEL, make_folder, tiny_recipe

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# Runs `pale train` (the CLI) under torchrun, logging every file each rank writes through pale.io,
# and saving each rank's final weights for the test to compare.
RANK_SCRIPT = textwrap.dedent("""
    import contextlib, os, sys
    import torch
    import pale.io as pio
    from pale.train import engine

    rank = int(os.environ["RANK"])
    spy_dir = sys.argv[1]
    original = pio.atomic_path

    @contextlib.contextmanager
    def logged(path):
        with open(os.path.join(spy_dir, f"writes-rank{rank}.txt"), "a") as log:
            log.write(f"{path}\\n")
        with original(path) as tmp:
            yield tmp
    pio.atomic_path = logged

    fit = engine.Trainer.fit
    def fit_and_dump(self):
        out = fit(self)
        model = engine._unwrap(self.model)
        torch.save({"model": model.state_dict(), "ema": self.ema.module.state_dict(), "world": self.rt.world_size},
                   os.path.join(spy_dir, f"final-rank{rank}.pt"))
        return out
    engine.Trainer.fit = fit_and_dump

    from pale.cli import main
    sys.exit(main(sys.argv[2:]))
""")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_torchrun_two_cpu_processes(tmp_path):
    folder = make_folder(tmp_path / "data")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(epochs=1)))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    spy = tmp_path / "spy"
    spy.mkdir()
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(spy), "train", "--recipe", str(recipe), "--data", str(folder), "-o", str(run)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stderr and "batch 8 = 4 x 2 x 1" in proc.stderr
    # only rank 0 wrote files
    assert not (spy / "writes-rank1.txt").exists()
    written = {os.path.basename(p) for p in (spy / "writes-rank0.txt").read_text().split()}
    assert {"last.pth", "best.pth", "metrics.jsonl", "summary.json", "curves.png", "last.safetensors"} <= written
    # identical weights (and EMA) on both ranks, equal to the checkpoint
    r0, r1 = (torch.load(spy / f"final-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    ckpt = load_torch(run / "last.pth")
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
        assert torch.equal(r0["ema"][key], r1["ema"][key]), key
        assert torch.equal(r0["model"][key], ckpt["model"][key]), key
    # validation metrics were reduced over both ranks' halves of the 12 images
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last"]["val_n"] == 12 and summary["last"]["ema_val_n"] == 12
    assert len(ckpt["rng"]) == 2  # each rank's random state, for an exact resume


class _Reader(threading.Thread):
    """Collects a pipe's output as it arrives."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text = pipe, ""

    def run(self):
        for chunk in iter(lambda: self.pipe.read(1), ""):
            self.text += chunk


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    folder = make_folder(tmp_path / "data", n_train=48, n_val=12)
    cfg = tiny_recipe(epochs=3)
    cfg["train"]["progress"] = True
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    straight = tmp_path / "straight"
    train(str(recipe), [f"data.root={folder}", "train.progress=false"], straight)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pale", "train", "--recipe", str(recipe), "--data", str(folder), "-o", str(run)]
    # stderr is a pipe: pale.progress logs plain lines, here one per update
    proc = subprocess.Popen(cmd, env=dict(ENV, PALE_PROGRESS_INTERVAL="0"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    reader = _Reader(proc.stderr)
    reader.start()
    deadline = time.time() + 240
    # kill once epoch 2 has made at least one update ("epoch 2/3: k/6 updates" with k >= 1)
    while time.time() < deadline and proc.poll() is None:
        if re.search(r"epoch 2/3: [1-5]/6 updates", reader.text):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + reader.text[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_torch(run / "last.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)  # the last checkpoint is the end of epoch 1

    resumed = subprocess.run([sys.executable, "-m", "pale", "train", "--resume", str(run / "last.pth")],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 2, update 0" in resumed.stderr

    def history(path):
        return [{k: v for k, v in json.loads(line).items() if k != "train_images_per_s"}
                for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history(run)] == [1, 2, 3]
    assert history(run) == history(straight)
    a, b = load_torch(straight / "last.pth"), load_torch(run / "last.pth")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["model_ema"][key], b["model_ema"][key]), key
    assert json.loads((run / "summary.json").read_text())["best"] == json.loads(
        (straight / "summary.json").read_text())["best"]
