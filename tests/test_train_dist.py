"""Training across processes: torchrun with 2 CPU processes (gloo); torchrun restarting the group after
one rank is killed with SIGKILL in the middle of an epoch, and SIGUSR1 passed on by torchrun, each
continuing to the weights of an uninterrupted run; a single process killed with SIGKILL and started again
by the same command."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import yaml

from pale.files import load_torch
from pale.train import train
from test_train import make_folder, tiny_recipe

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# Runs `pale train` (the CLI) under torchrun, logging every file each rank writes through pale.files,
# and saving each rank's final weights for the test to compare. PALE_TEST_FAULT="ACTION:RANK:CALL" makes
# rank RANK, on torchrun's first start only, during its CALL-th training batch: kill itself with SIGKILL
# (ACTION=kill), or send SIGUSR1 to torchrun as Slurm's --signal would (ACTION=usr1; it then waits for
# torchrun to pass the signal on to every rank).
RANK_SCRIPT = textwrap.dedent("""
    import contextlib, os, signal, sys, time
    import torch
    import pale.files as files
    from timm.utils import unwrap_model
    from pale.train.trainer import Trainer
    from pale.train.classification import ClassificationTask

    rank = int(os.environ["RANK"])
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    spy_dir = sys.argv[1]
    original = files.atomic_path

    @contextlib.contextmanager
    def logged(path, before_replace=None):
        with open(os.path.join(spy_dir, f"writes-rank{rank}.txt"), "a") as log:
            log.write(f"{path}\\n")
        with original(path, before_replace) as tmp:
            yield tmp
    files.atomic_path = logged

    fault = os.environ.get("PALE_TEST_FAULT")
    if fault and restart == 0 and int(fault.split(":")[1]) == rank:
        action, at = fault.split(":")[0], int(fault.split(":")[2])
        training_loss, calls = ClassificationTask.training_loss, [0]
        def faulty_loss(self, model, batch, rt):
            calls[0] += 1
            if calls[0] == at and action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if calls[0] == at and action == "usr1":
                os.kill(os.getppid(), signal.SIGUSR1)
                time.sleep(3)
            return training_loss(self, model, batch, rt)
        ClassificationTask.training_loss = faulty_loss

    fit = Trainer.fit
    def fit_and_dump(self):
        out = fit(self)
        model = unwrap_model(self.model)
        torch.save({"model": model.state_dict(), "ema": self.ema.module.state_dict(), "world": self.rt.world_size,
                    "restart": restart}, os.path.join(spy_dir, f"final-rank{rank}.pt"))
        return out
    Trainer.fit = fit_and_dump

    from pale.cli import main
    sys.exit(main(sys.argv[2:]))
""")

# 24 images, 2 ranks x batch 4: 3 updates per epoch; 2 epochs; saves at the end of epoch 1, after update 4
# (epoch 2, update 1) and at the end
EVERY = 4
USR1 = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, folder, name, max_restarts=0, fault=None, handle=None, readme=False):
    """The job command under torchrun on data ``folder``: (process, spy folder, run folder).

    ``readme``: the README's line as a user copies it (torchrun's default static rendezvous, no
    ``--standalone``, no TORCH_DISABLE_SHARE_RDZV_TCP_STORE; only the port is a free one, so that
    tests running at once do not meet); else the docs' job scripts (``--standalone`` and the variable)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(epochs=2, **{"train.checkpoint_every_updates": EVERY})))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    spy = tmp_path / f"spy-{name}"
    spy.mkdir(exist_ok=True)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}" if readme else "--standalone",
           "--nproc_per_node=2", f"--max-restarts={max_restarts}", "--monitor-interval=0.1"] + \
        ([f"--signals-to-handle={handle}"] if handle else []) + \
        [str(script), str(spy), "train", "--recipe", str(recipe), "--data", str(folder), "-o", str(run),
         "--resume", "auto"]
    env = {k: v for k, v in ENV.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    if not readme:
        # as in the job scripts of docs/training.md: every start of the group gets a rendezvous store of its own
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if fault:
        env["PALE_TEST_FAULT"] = fault
    # its own process group, so that a hang is ended with every worker of it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail("torchrun hung for 300 s:\n" + err[-3000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), spy, run


def history(run):
    return [{k: v for k, v in h.items() if k != "train_images_per_s"}
            for h in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_same_weights(a, b):
    a, b = load_torch(a / "last.pth"), load_torch(b / "last.pth")
    assert (a["epoch"], a["step"], a["num_updates"]) == (b["epoch"], b["step"], b["num_updates"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["model_ema"][key], b["model_ema"][key]), key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight2(tmp_path_factory, data):
    """An uninterrupted 2-process run: (process, spy folder, run folder)."""
    proc, spy, run = torchrun(tmp_path_factory.mktemp("straight"), data, "straight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, spy, run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_torchrun_two_cpu_processes(straight2):
    proc, spy, run = straight2
    assert "2 process(es) on cpu" in proc.stderr and "batch 8 = 4 x 2 x 1" in proc.stderr
    # DDP's stride warning for depthwise weights (C, 1, k, k), whose gradient differs in a size-1 dim only
    assert "Grad strides do not match" not in proc.stderr
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
    assert (load_torch(run / "last-1.pth")["epoch"], load_torch(run / "last-1.pth")["step"]) == (1, 1)


def test_torchrun_restarts_after_a_rank_is_killed_and_resumes_exactly(straight2, data, tmp_path):
    # rank 1 is killed during update 6 (epoch 2's last); the last checkpoint is after update 4
    proc, spy, run = torchrun(tmp_path, data, "killed", max_restarts=1, fault="kill:1:6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"resuming \S+last.pth at epoch 2, update 1\b", proc.stderr), proc.stderr[-3000:]
    final = torch.load(spy / "final-rank1.pt", weights_only=True)
    assert final["restart"] == 1  # torchrun started the group again, once
    assert_same_weights(straight2[2], run)
    assert history(run) == history(straight2[2])


def test_the_readme_torchrun_line_restarts_after_a_rank_is_killed_and_resumes_exactly(straight2, data, tmp_path):
    # torchrun shares its rendezvous store with the workers here (its static rendezvous always does):
    # the restarted group must not meet the killed group's keys there. Rank 1 is killed during its 4th
    # batch (epoch 2's first update), after the checkpoint at the end of epoch 1.
    proc, spy, run = torchrun(tmp_path, data, "readme", max_restarts=1, fault="kill:1:4", readme=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"resuming \S+last.pth at epoch 2, update 0\b", proc.stderr), proc.stderr[-3000:]
    assert torch.load(spy / "final-rank1.pt", weights_only=True)["restart"] == 1
    assert [h["epoch"] for h in history(run)] == [1, 2]  # every epoch once
    assert_same_weights(straight2[2], run)
    assert history(run) == history(straight2[2])


@pytest.mark.slow
def test_torchrun_passes_sigusr1_on_and_the_next_start_resumes_exactly(straight2, data, tmp_path):
    # Slurm's --signal=USR1@T reaches torchrun during update 5 (epoch 2, update 2)
    proc, spy, run = torchrun(tmp_path, data, "usr1", max_restarts=1, fault="usr1:0:5", handle=USR1)
    assert proc.returncode != 0 and "stopped by SIGUSR1 (exit status 138" in proc.stderr, proc.stderr[-3000:]
    assert not (spy / "final-rank0.pt").exists()  # torchrun did not start the group again
    ckpt = load_torch(run / "last.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)  # saved after the update it was doing: nothing lost
    proc, spy, run = torchrun(tmp_path, data, "requeued", max_restarts=1, handle=USR1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at epoch 2, update 2" in proc.stderr
    assert_same_weights(straight2[2], run)
    assert history(run) == history(straight2[2])


class _Reader(threading.Thread):
    """Collects a pipe's output as it arrives."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text = pipe, ""

    def run(self):
        for chunk in iter(lambda: self.pipe.read(1), ""):
            self.text += chunk


def test_sigkill_mid_epoch_then_the_same_command_resumes_to_an_uninterrupted_run(tmp_path):
    folder = make_folder(tmp_path / "data", n_train=48, n_val=12)
    cfg = tiny_recipe(epochs=3)
    cfg["train"]["progress"] = True
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    straight = tmp_path / "straight"
    train(str(recipe), [f"data.root={folder}", "train.progress=false"], straight)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pale", "train", "--recipe", str(recipe), "--data", str(folder), "-o", str(run),
           "--resume", "auto"]  # the job command: the same on the first start and on every restart
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

    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 2, update 0" in resumed.stderr
    assert [h["epoch"] for h in history(run)] == [1, 2, 3]
    assert history(run) == history(straight)
    a, b = load_torch(straight / "last.pth"), load_torch(run / "last.pth")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["model_ema"][key], b["model_ema"][key]), key
    assert json.loads((run / "summary.json").read_text())["best"] == json.loads(
        (straight / "summary.json").read_text())["best"]
