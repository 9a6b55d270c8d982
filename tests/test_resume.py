"""Runs that survive restarts: `--resume auto` continues a run or starts it and refuses another recipe's
run, checkpoints every N updates rotate as last.pth, last-1.pth, SIGUSR1 saves and exits with 138 (requeue),
and a truncated newest checkpoint falls back to the previous one. Every continuation ends with the weights
of an uninterrupted run, bit for bit (CPU)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import pale

from pale.cli import main
from pale.errors import CheckpointError
from pale.files import load_torch
from pale.train.run_folder import RunFolderError
from pale.train import TrainingInterrupted, train
from pale.train.classification import ClassificationTask
from pale.train.checkpoints import checkpoint_files, config_differences
from test_train import assert_same_state, folder, tiny_recipe  # noqa: F401 (folder: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# 24 images, batch 8: 3 updates per epoch; saves after update 2 (epoch 1), at the end of epoch 1, after
# update 4 (epoch 2, update 1) and at the end of epoch 2
EVERY = 2


def recipe(**changes):
    return tiny_recipe(**{"train.checkpoint_every_updates": EVERY, **changes})


def position(path):
    ckpt = load_torch(path)
    return ckpt["epoch"], ckpt["step"]


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    """An uninterrupted run, started by resume="auto" on a fresh folder."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(recipe(), [f"data.root={folder}"], out, resume="auto")
    return out


def assert_same_run(a, b):
    a, b = load_torch(a / "last.pth"), load_torch(b / "last.pth")
    assert (b["epoch"], b["step"], b["num_updates"]) == (a["epoch"], a["step"], a["num_updates"]) == (2, 0, 6)
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["model_ema"], b["model_ema"])
    assert [{k: v for k, v in h.items() if k != "train_images_per_s"} for h in a["history"]] == \
           [{k: v for k, v in h.items() if k != "train_images_per_s"} for h in b["history"]]


def signal_at_call(monkeypatch, signum, call):
    """Send ``signum`` to this process during the ``call``-th training batch."""
    calls = {"n": 0}
    original = ClassificationTask.training_loss

    def loss(self, model, batch, rt):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return original(self, model, batch, rt)
    monkeypatch.setattr(ClassificationTask, "training_loss", loss)
    return lambda: monkeypatch.setattr(ClassificationTask, "training_loss", original)


def test_checkpoints_rotate_and_record_the_runtime(straight):
    assert checkpoint_files(straight) == [straight / "last.pth", straight / "last-1.pth"]
    assert position(straight / "last.pth") == (2, 0)
    assert position(straight / "last-1.pth") == (1, 1)  # the save after update 4
    assert load_torch(straight / "last.pth")["runtime"] == {"device": "cpu", "channels_last": False, "amp": "none"}


def test_rotation_keeps_k_files_and_drops_older_ones(folder, tmp_path):
    run = tmp_path / "run"
    train(recipe(epochs=1, **{"train.checkpoint_every_updates": 1, "train.keep_checkpoints": 3}),
          [f"data.root={folder}"], run)
    assert [position(p) for p in checkpoint_files(run)] == [(1, 0), (0, 2), (0, 1)]
    assert [p.name for p in checkpoint_files(run)] == ["last.pth", "last-1.pth", "last-2.pth"]
    with pytest.raises(ValueError, match="already holds a run .*--resume auto"):
        train(recipe(epochs=1), [f"data.root={folder}"], run)
    # continued (a run folder given to resume) keeping 2: the oldest goes
    train(None, ["epochs=2", "train.keep_checkpoints=2"], resume=run)
    assert [position(p) for p in checkpoint_files(run)] == [(2, 0), (1, 2)]
    assert not (run / "last-2.pth").exists()


def test_auto_continues_the_same_command_and_refuses_another_recipe(folder, straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe()))
    moved = shutil.copytree(folder, tmp_path / "data-elsewhere")  # data staged elsewhere on this start
    job = ["train", "--recipe", str(recipe_file), "--data", str(moved), "-o", str(run), "--resume", "auto",
           "--workers", "1"]
    before = load_torch(run / "last.pth")["model"]
    assert main(job) == 0
    assert f"{run / 'last.pth'} has finished all 2 epochs: nothing left to train" in capsys.readouterr().err
    assert_same_state(before, load_torch(run / "last.pth")["model"])

    other = recipe(**{"optim.lr": 2e-3, "model.kwargs.depths": [1, 1, 2, 1]})
    recipe_file.write_text(yaml.safe_dump(other))
    assert main(job) == 1
    err = capsys.readouterr().err
    assert f"{run} holds another run (last.pth: model pale_tiny), whose recipe differs" in err
    assert "model.kwargs.depths: [1, 1, 1, 1] (run) vs [1, 1, 2, 1] (now)" in err
    assert "optim.lr: 0.001 (run) vs 0.002 (now)" in err
    assert "Traceback" not in err
    assert_same_state(before, load_torch(run / "last.pth")["model"])
    # the same refusal when auto comes from the recipe
    with pytest.raises(ValueError, match="optim.lr: 0.001"):
        train(recipe(**{"optim.lr": 2e-3, "train.resume": "auto"}), [f"data.root={folder}"], run)


def test_config_differences_ignore_restart_keys_and_keys_of_other_versions():
    run = {"epochs": 2, "data": {"root": "/a", "img_size": 32}, "train": {"workers": 8, "old_key": 1}}
    now = {"epochs": 3, "data": {"root": "/b", "img_size": 32}, "train": {"workers": 2, "new_key": 1}}
    assert config_differences(run, now) == ["epochs: 2 (run) vs 3 (now)"]


def test_sigusr1_saves_exits_138_and_the_next_start_resumes_exactly(folder, straight, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    restore = signal_at_call(monkeypatch, signal.SIGUSR1, 5)  # during epoch 2's second update
    with pytest.raises(TrainingInterrupted) as info:
        train(recipe(), [f"data.root={folder}"], run, resume="auto")
    assert info.value.code == 138 == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1 (exit status 138: requeue the job) at epoch 2, update 2" in capsys.readouterr().err
    assert position(run / "last.pth") == (1, 2)  # nothing lost: saved after the update that was running
    assert position(run / "last-1.pth") == (1, 1)
    restore()
    train(recipe(), [f"data.root={folder}"], run, resume="auto")
    assert "resuming" in capsys.readouterr().err
    assert_same_run(straight, run)


def test_persistent_loader_workers_draw_what_the_main_process_draws(folder, straight, tmp_path, monkeypatch):
    """A loader process kept alive across epochs (and abandoned mid-epoch by a stop) changes no image:
    interrupted in epoch 2 and resumed, both with one worker, the run ends bit for bit where the
    uninterrupted run without workers ends."""
    run = tmp_path / "run"
    restore = signal_at_call(monkeypatch, signal.SIGUSR1, 5)
    with pytest.raises(TrainingInterrupted):
        train(recipe(**{"train.workers": 1}), [f"data.root={folder}"], run, resume="auto")
    restore()
    train(recipe(**{"train.workers": 1}), [f"data.root={folder}"], run, resume="auto")
    assert_same_run(straight, run)


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(folder, straight, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    restore = signal_at_call(monkeypatch, signal.SIGTERM, 5)
    with pytest.raises(TrainingInterrupted):
        train(recipe(), [f"data.root={folder}"], run)
    restore()
    assert [position(p) for p in checkpoint_files(run)] == [(1, 2), (1, 1)]
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    last = run / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a file-system crash cut it
    train(recipe(), [f"data.root={folder}"], run, resume="auto")
    err = capsys.readouterr().err
    assert f"cannot resume from {last}: cannot read checkpoint {last}: truncated or corrupt" in err
    assert f"falling back to the previous checkpoint {run / 'last-1.pth'} (at epoch 2, update 1)" in err
    assert "at epoch 2, update 1" in err
    assert_same_run(straight, run)

    # none loads: a clear error, and the run is not started over
    for path in checkpoint_files(broken):
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* loads .*refusing to start the run over"):
        train(recipe(), [f"data.root={folder}"], broken, resume="auto")
    assert main(["train", "--resume", "-o", str(broken)]) == 1
    assert "none of the checkpoints" in capsys.readouterr().err
    assert all(path.stat().st_size == 1000 for path in checkpoint_files(broken))


def test_checkpoints_record_no_kernel_choices_and_an_old_record_is_ignored(folder, straight, tmp_path, monkeypatch):
    """Older versions timed the attention kernels and saved their choices as ``attention_kernels``; such a
    checkpoint still resumes, to the weights of the uninterrupted run, and the entry is not carried on."""
    run = tmp_path / "run"
    restore = signal_at_call(monkeypatch, signal.SIGTERM, 5)
    with pytest.raises(TrainingInterrupted):
        train(recipe(), [f"data.root={folder}"], run)
    restore()
    last = run / "last.pth"
    ckpt = load_torch(last)
    assert "attention_kernels" not in ckpt
    ckpt["attention_kernels"] = {"format": 1, "choices": {"cpu/float32/train/L64": {"kernel": "math"}}}
    torch.save(ckpt, last)
    train(None, [], resume=last)
    assert "attention_kernels" not in load_torch(last)
    assert_same_run(straight, run)


def test_a_signal_to_the_whole_process_group_still_saves(folder, tmp_path):
    """Ctrl-C, ``timeout`` and Slurm signal every process of the job, the loader workers too. A worker
    killed by the signal used to make PyTorch raise inside the checkpoint save that the signal asked for
    (a traceback, and no last.pth); the workers now ignore it and the run stops as after a signal to it alone."""
    recipe_file = tmp_path / "long.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(recipe(epochs=1000, **{"train.workers": 1})))))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(Path(pale.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "pale", "train", "--recipe", str(recipe_file), "--data", str(folder),
                             "-o", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a job's
    try:
        deadline = time.monotonic() + 300
        while not (run / "last.pth").exists():  # the first save: training, workers running, handlers set
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "checkpoint saved" in err and "Traceback" not in err, err
    assert load_torch(run / "last.pth")["num_updates"] >= EVERY


def test_a_run_that_fails_with_loader_workers_alive_exits(folder, tmp_path):
    """The loader workers ignore SIGTERM (above). An exception that ended a run with their persistent
    iterators alive left them to Python's exit, where multiprocessing terminates daemonic children with
    SIGTERM and waits for them: the process hung after printing its traceback (seen under torchrun)."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(recipe(epochs=3, **{"train.workers": 1})))))
    script = f"""
import sys
from pale.cli import main
from pale.train.classification import ClassificationTask
recipe_loss, calls = ClassificationTask.training_loss, []
def failing_loss(self, *args):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("a bug in the middle of an epoch")
    return recipe_loss(self, *args)
ClassificationTask.training_loss = failing_loss
sys.exit(main(["train", "--recipe", {str(recipe_file)!r}, "--data", {str(folder)!r}, "-o", {str(tmp_path / "run")!r}]))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(Path(pale.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the process did not exit after its traceback: " + proc.communicate()[1][-2000:])
    assert proc.returncode == 1 and "RuntimeError: a bug in the middle of an epoch" in err, err


def test_a_failed_checkpoint_write_leaves_the_kept_ones_as_they_were(folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(recipe(epochs=1), [f"data.root={folder}"], run)
    kept = {p.name: p.read_bytes() for p in checkpoint_files(run)}
    assert list(kept) == ["last.pth", "last-1.pth"]

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"the first bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunFolderError) as failed:
        train(None, ["epochs=2"], resume=run)
    assert str(failed.value) == (f"cannot write {run / 'last.pth'}: No space left on device; training stopped; the "
                                 f"checkpoints saved before are whole: continue with pale train --resume {run}")
    # before: the rotation came first, and the failed write left no last.pth
    assert {p.name: p.read_bytes() for p in checkpoint_files(run)} == kept
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_save_that_fails_mid_run_is_one_line_and_the_run_resumes_from_the_last_good_checkpoint(
        folder, straight, tmp_path, monkeypatch, capsys):
    """The disk fills up at the third checkpoint (epoch 2, update 1): `pale train` says so in one line,
    naming the file and the cause; the checkpoints before it are whole and the run resumes from them to
    the uninterrupted run's weights."""
    run = tmp_path / "run"
    original = torch.save
    saves = []

    def full_at_third(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".last.pth."):  # (a temporary name, renamed once written)
            saves.append(path)
            if len(saves) == 3:
                raise OSError(28, "No space left on device")
        return original(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_at_third)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe()))
    assert main(["train", "--recipe", str(recipe_file), "--data", str(folder), "-o", str(run)]) == 1
    err = capsys.readouterr().err
    assert (f"pale train: error: cannot write {run / 'last.pth'}: No space left on device; training stopped; the "
            f"checkpoints saved before are whole: continue with pale train --resume {run}") in err.splitlines()
    assert "Traceback" not in err
    assert [position(p) for p in checkpoint_files(run)] == [(1, 0), (0, 2)]
    monkeypatch.setattr(torch, "save", original)
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(straight, run)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_run_folder_that_became_read_only_stops_the_run_in_one_line(folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe(epochs=1), [f"data.root={folder}"], run)
    kept = {p.name: p.read_bytes() for p in checkpoint_files(run)}
    run.chmod(0o555)
    try:
        assert main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    finally:
        run.chmod(0o755)
    err = capsys.readouterr().err
    assert f"pale train: error: cannot write {run / 'config.yaml'}: Permission denied; training stopped" in err
    assert {p.name: p.read_bytes() for p in checkpoint_files(run)} == kept
