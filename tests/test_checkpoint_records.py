"""What a checkpoint records besides the weights, and what a resumed run makes of it: the best
record (a resumed run must not replace ``best.pth`` by a worse epoch), the count of skipped images,
which weights the ``.safetensors`` exports hold, the learning rate on a changed schedule, the note
that run-time settings changed, the stop message, and runs without EMA, scheduler or class names.

Validation results are scripted (each call of the task's ``evaluate`` returns the next value of a
list as ``top1``) so that the order of raw and EMA scores, and of epochs, is known in advance."""
import contextlib
import os
import signal

import numpy as np
import pytest
import torch

import pale  # noqa: F401
from pale.checkpoint import select_weights
from pale.files import load_safetensors, load_torch
from pale.train import Trainer, TrainingInterrupted, train
from pale.train.classification import ClassificationTask
from pale.train.runtime import rng_state, set_rng_state
from tiny_train import tiny_recipe, write_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# the EMA must differ from the model: a 2-update run's capped decay would be 0 (a copy)
KEEP_EMA = "ema.max_window=1.0"


@contextlib.contextmanager
def scripted_validation(top1s, sigterm_at=None):
    """``evaluate`` returns its real metrics with ``top1`` replaced by the next of ``top1s`` (the engine
    validates the model, then its EMA); call number ``sigterm_at`` (from 1) first sends SIGTERM."""
    original = ClassificationTask.evaluate
    calls = iter(top1s)
    count = {"n": 0}

    def evaluate(self, model, batches, rt):
        count["n"] += 1
        if count["n"] == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return dict(original(self, model, batches, rt), top1=float(next(calls)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClassificationTask, "evaluate", evaluate)
        yield


def with_a_broken_image(root):
    """The tiny folder with one of its 8 training images replaced by bytes no decoder reads."""
    victim = sorted((root / "train").rglob("*.png"))[0]
    victim.write_bytes(b"not an image")
    return root


# Function-scoped fixtures: mutmut runs, for a mutant, only the tests during which the mutated function
# ran, and a module fixture's work counts for the first test that requests it only.
@pytest.fixture
def stopped(tmp_path, capsys):
    """A 2-epoch run (a broken training image skipped per epoch; raw 80 / EMA 70 in epoch 1, raw 50 /
    EMA 60 in epoch 2) stopped by SIGTERM during epoch 1's validation: (run folder, stop message)."""
    data = with_a_broken_image(write_tiny_folder(tmp_path / "data"))
    with scripted_validation([80, 70], sigterm_at=1), pytest.raises(TrainingInterrupted):
        train(tiny_recipe(data), ["epochs=2", KEEP_EMA, "data.skip_bad_images=true"], tmp_path / "run")
    return tmp_path / "run", capsys.readouterr().err


@pytest.fixture
def resumed(stopped, capsys):
    """The stopped run continued: (run folder, summary, log of the resumed part)."""
    run = stopped[0]
    with scripted_validation([50, 60]):
        summary = train(None, [], resume=run / "last.pth")
    return run, summary, capsys.readouterr().err


def test_the_stop_message_names_the_saved_checkpoint_and_the_completed_epoch(stopped):
    run, log = stopped
    last = run / "last.pth"
    assert (f"stopped by SIGTERM at epoch 1, update 0; checkpoint saved to {last}; continue with: "
            f"pale train --resume {last} (or the same command with --resume auto)") in log.splitlines()
    assert "requeue" not in log
    assert (run / "curves.png").is_file()  # drawn from the one epoch's history at the stop
    ckpt = load_torch(last)
    assert (ckpt["epoch"], ckpt["step"], ckpt["skipped_images"]) == (1, 0, 1)
    assert ckpt["best"] == dict(metric="val_top1", value=80.0, epoch=1, weights="raw")


def test_a_resumed_run_keeps_the_best_record_and_does_not_replace_best_by_a_worse_epoch(resumed):
    run, summary, _ = resumed
    expected = dict(metric="val_top1", value=80.0, epoch=1, weights="raw")
    assert summary["best"] == expected
    assert load_torch(run / "last.pth")["best"] == expected
    best = load_torch(run / "best.pth")
    assert best["epoch"] == 1
    assert [h["val_top1"] for h in load_torch(run / "last.pth")["history"]] == [80.0, 50.0]


def test_a_resumed_run_counts_the_images_skipped_before_the_stop(resumed):
    run, summary, log = resumed
    assert summary["skipped_images"] == 2  # one per epoch, one of them before the stop
    assert load_torch(run / "last.pth")["skipped_images"] == 2
    assert "skipped 2 unreadable image(s)" in log


def test_a_resume_with_the_same_runtime_says_nothing_about_it(resumed):
    assert "other run-time settings" not in resumed[2]


def test_a_resume_with_another_runtime_says_what_changed(stopped, capsys):
    run = stopped[0]
    ckpt = load_torch(run / "last.pth")
    assert ckpt["runtime"] == dict(device="cpu", channels_last=False, amp="none")
    ckpt["runtime"].update(channels_last=True, amp="bf16")
    torch.save(ckpt, run / "last.pth")
    with scripted_validation([50, 60]):
        train(None, [], resume=run / "last.pth")
    assert (f"note: {run / 'last.pth'} was written with other run-time settings (channels_last True -> False, amp bf16 -> none); "
            f"the continuation is not bit-exact") in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("raw, ema, expected", [(50, 90, "ema"), (90, 50, "raw"), (70, 70, "raw")])
def test_the_exports_hold_the_weights_that_validated_better(tmp_path, raw, ema, expected):
    """best.safetensors and last.safetensors hold the set with the higher top-1 (raw on a tie, as
    ``--weights best`` picks from the checkpoint), and say which in their metadata."""
    data = write_tiny_folder(tmp_path / "data")
    with scripted_validation([raw, ema]):
        train(tiny_recipe(data), [KEEP_EMA], tmp_path / "run")
    ckpt = load_torch(tmp_path / "run" / "best.pth")
    assert any(not torch.equal(ckpt["model"][k], ckpt["model_ema"][k]) for k in ckpt["model"])
    held = ckpt["model_ema"] if expected == "ema" else ckpt["model"]
    assert ckpt["best_metric"] == "top1"
    assert {k: v["top1"] for k, v in ckpt["val_metrics"].items()} == {"raw": raw, "ema": ema}
    assert select_weights(ckpt)[1] == expected
    for name in ("best.safetensors", "last.safetensors"):
        state, meta = load_safetensors(tmp_path / "run" / name)
        assert meta["weights"] == expected, name
        assert (meta["model_name"], meta["class_names"]) == ("pale_tiny", ["a", "b"]), name
        assert meta["data_config"] == ckpt["data_config"], name
        assert state.keys() == held.keys()
        assert all(torch.equal(state[k], held[k]) for k in held), name


def test_after_a_resume_on_a_longer_schedule_every_update_follows_the_new_schedule(tmp_path, monkeypatch):
    """The first update after the resume included: the optimizer's saved lr is the old schedule's."""
    data = write_tiny_folder(tmp_path / "data")
    lrs = []
    monkeypatch.setattr(Trainer, "before_optimizer_step", lambda self: lrs.append(self.optimizer.param_groups[0]["lr"]))
    train(tiny_recipe(data), ["epochs=3"], tmp_path / "three")
    straight = list(lrs)
    lrs.clear()
    train(tiny_recipe(data), ["epochs=2"], tmp_path / "two")
    saved_lr = load_torch(tmp_path / "two" / "last.pth")["optimizer"]["param_groups"][0]["lr"]
    lrs.clear()
    train(None, ["epochs=3"], resume=tmp_path / "two" / "last.pth")
    assert len(straight) == 6 and len(lrs) == 2
    assert lrs == pytest.approx(straight[4:])
    assert lrs[0] != pytest.approx(saved_lr)


def test_a_dry_run_writes_nothing(tmp_path):
    data = write_tiny_folder(tmp_path / "data")
    summary = train(tiny_recipe(data), [], tmp_path / "run", dry_run=True)
    assert summary["epochs"] == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_run_without_ema_scheduler_or_class_names_checkpoints_and_resumes(tmp_path, monkeypatch, capsys):
    """``sched.sched=none`` (constant lr), ``ema.enabled=false``, and a task whose model description has
    no class names (the Task interface makes them optional): saved as None; stopped by SIGUSR1 (a
    cluster's warning before preemption) in its first update, before any validation (so no
    ``val_metrics``), and resumed to the end."""
    data = write_tiny_folder(tmp_path / "data")
    original_info = ClassificationTask.model_info
    monkeypatch.setattr(ClassificationTask, "model_info",
                        lambda self: {k: v for k, v in original_info(self).items() if k != "class_names"})
    original_loss = ClassificationTask.training_loss
    calls = {"n": 0}

    def loss_then_sigusr1(self, model, batch, rt):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original_loss(self, model, batch, rt)
    monkeypatch.setattr(ClassificationTask, "training_loss", loss_then_sigusr1)
    overrides = ["epochs=2", "sched.sched=none", "ema.enabled=false"]
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_recipe(data), overrides, tmp_path / "run")
    last = tmp_path / "run" / "last.pth"
    assert stop.value.code == 138
    assert (f"stopped by SIGUSR1 (exit status 138: requeue the job) at epoch 1, update 1; checkpoint saved to "
            f"{last}; continue with: pale train --resume {last} (or the same command with --resume auto)"
            ) in capsys.readouterr().err.splitlines()
    ckpt = load_torch(last)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 1)
    assert ckpt["model_ema"] is None and ckpt["scheduler"] is None and ckpt["class_names"] is None
    assert "val_metrics" not in ckpt  # not validated yet
    assert list(ckpt["data_config"]["input_size"]) == [3, 24, 24]  # the rest of the task's description is kept
    summary = train(None, [], resume=tmp_path / "run" / "last.pth")
    ckpt = load_torch(tmp_path / "run" / "last.pth")
    assert ckpt["num_updates"] == 4 and summary["best"]["weights"] == "raw"
    assert [h["lr"] for h in ckpt["history"]] == [1e-2, 1e-2]
    assert set(ckpt["val_metrics"]) == {"raw"}


def test_the_numpy_state_keeps_a_cached_gaussian():
    """numpy's legacy normal sampler draws pairs and caches the second value (``has_gauss``)."""
    np.random.seed(3)
    np.random.standard_normal()
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1 and abs(state["numpy"]["gauss"]) < 1
    expected = np.random.standard_normal(3)
    np.random.seed(4)
    set_rng_state(state)
    assert np.array_equal(np.random.standard_normal(3), expected)


def test_an_explicit_resume_reads_its_checkpoint_once(stopped, monkeypatch):
    """The recipe and the state come from one read of the file (it used to be read twice)."""
    from pale.train import checkpoints

    run = stopped[0]
    reads, original = [], checkpoints.load_torch
    monkeypatch.setattr(checkpoints, "load_torch", lambda path: reads.append(path) or original(path))
    with scripted_validation([50, 60]):
        train(None, [], resume=run / "last.pth")
    assert reads == [run / "last.pth"]


def test_the_optimizer_step_hooks_see_what_their_contract_says(tmp_path, monkeypatch):
    """Before each update: the gradients of all its micro-batches in ``.grad``, the update not counted;
    after: the gradients cleared, the update counted, the schedule advanced."""
    data = write_tiny_folder(tmp_path / "data")
    events = []

    def before(self):
        grads = [p.grad for p in self.model.parameters() if p.requires_grad]
        events.append(("before", self.num_updates, all(g is not None for g in grads)))

    def after(self):
        events.append(("after", self.num_updates, all(p.grad is None for p in self.model.parameters()),
                       self.optimizer.param_groups[0]["lr"]))
    monkeypatch.setattr(Trainer, "before_optimizer_step", before)
    monkeypatch.setattr(Trainer, "after_optimizer_step", after)
    train(tiny_recipe(data), ["epochs=2", "train.accum_steps=2", "sched.warmup_epochs=1", "sched.warmup_lr=1e-4"],
          tmp_path / "run")
    assert [e[:3] for e in events] == [(kind, n + (kind == "after"), True) for n in range(4)
                                       for kind in ("before", "after")]
    # 2 updates of warm-up, then timm's cosine over all 4 (min_lr 1e-5): the rate of the next update
    lrs = [e[3] for e in events if e[0] == "after"]
    assert lrs[:2] == pytest.approx([1e-4 + (1e-2 - 1e-4) / 2, 1e-5 + (1e-2 - 1e-5) / 2])
