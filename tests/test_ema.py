"""The weight EMA: timm's ModelEmaV3 (what the engine keeps) against its closed form, the
engine's EMA actually following the weights during a tiny training run, and restored on resume."""
import os
import signal

import pytest
import torch
from timm.utils import ModelEmaV3

import pale  # noqa: F401
from pale.files import load_safetensors, load_torch
from pale.train import TrainingInterrupted, train
from pale.train.classification import ClassificationTask
from tiny_train import tiny_recipe, write_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def float_state(module):
    return {k: v.detach().clone().double() for k, v in module.state_dict().items() if v.is_floating_point()}


def perturb_(model):
    """Move every parameter by at least 1 in absolute value, so old and new weights differ everywhere."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) + 2 * torch.sign(torch.randn_like(p)))
    return float_state(model)


def assert_strictly_between(value, a, b, name):
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    assert (a != b).all(), name
    assert ((value > low) & (value < high)).all(), name


def tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4)).double()


@pytest.mark.parametrize("decay,k", [(0.9, 1), (0.9, 7), (0.5, 3)])
def test_ema_with_a_fixed_decay_follows_the_closed_form(decay, k):
    """From theta0, trained to theta1 and kept: after k updates ema = d^k theta0 + (1 - d^k) theta1."""
    model = tiny_model()
    start = float_state(model)
    ema = ModelEmaV3(model, decay=decay, use_warmup=False)
    trained = perturb_(model)
    for _ in range(k):
        ema.update(model)
    got = float_state(ema.module)
    for name in start:
        expected = decay ** k * start[name] + (1 - decay ** k) * trained[name]
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-12)
        assert_strictly_between(got[name], start[name], trained[name], name)


@pytest.mark.parametrize("decay,k", [(0.9, 2), (0.9, 7), (0.5, 4)])
def test_ema_as_the_engine_steps_it_follows_the_closed_form(decay, k):
    """The engine passes ``step=num_updates`` (1, 2, ...), as timm's train.py does: update 1 has decay 0
    and copies the weights, later ones decay d. Weights theta_a after update 1, then theta_b kept:
    after k updates ema = d^(k-1) theta_a + (1 - d^(k-1)) theta_b, strictly between the two."""
    model = tiny_model()
    ema = ModelEmaV3(model, decay=decay, use_warmup=False)
    first = perturb_(model)
    ema.update(model, step=1)
    for name, value in float_state(ema.module).items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0)
    trained = perturb_(model)
    for step in range(2, k + 1):
        ema.update(model, step=step)
    got = float_state(ema.module)
    for name in first:
        expected = decay ** (k - 1) * first[name] + (1 - decay ** (k - 1)) * trained[name]
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-12)
        assert_strictly_between(got[name], first[name], trained[name], name)


def test_ema_moves_by_one_minus_decay_per_update():
    """Against a known sequence of weights: each update is ema <- d ema + (1 - d) theta_t."""
    model = torch.nn.Linear(3, 2).double()
    ema = ModelEmaV3(model, decay=0.8, use_warmup=False)
    expected = float_state(model)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5).add_(0.25)
        ema.update(model)
        expected = {k: 0.8 * v + 0.2 * float_state(model)[k] for k, v in expected.items()}
    got = float_state(ema.module)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12)


def test_the_engine_updates_its_ema_during_training(tmp_path, monkeypatch):
    """A tiny run with a fast EMA (decay 0.5): the saved EMA has left the initial weights for almost
    every tensor, and is not the trained model either (so 'EMA never updated' and 'EMA is a copy' fail)."""
    data = write_tiny_folder(tmp_path / "data")
    initial = {}
    build = ClassificationTask.build_model

    def recording_build(task):
        model = build(task)
        initial.update(float_state(model))
        return model
    monkeypatch.setattr(ClassificationTask, "build_model", recording_build)
    train(tiny_recipe(data), ["ema.max_window=1.0"], tmp_path / "run")  # 2 updates: keep decay 0.5, uncapped
    ckpt = load_torch(tmp_path / "run" / "last.pth")
    assert ckpt["num_updates"] == 2
    assert initial, "the task's model was never built"
    model = {k: v.double() for k, v in ckpt["model"].items() if v.is_floating_point()}
    ema = {k: v.double() for k, v in ckpt["model_ema"].items() if v.is_floating_point()}
    trained = [k for k in model if not torch.equal(model[k], initial[k])]
    assert len(trained) > 0.9 * len(model), "training did not change the weights"
    moved = [k for k in trained if not torch.equal(ema[k], initial[k])]
    assert len(moved) == len(trained), f"EMA never left the initial weights: {sorted(set(trained) - set(moved))[:5]}"
    copied = [k for k in trained if torch.equal(ema[k], model[k])]
    assert len(copied) < 0.1 * len(trained), "EMA equals the trained weights"


def test_a_resumed_run_continues_the_saved_ema(tmp_path, monkeypatch):
    """Stopped during epoch 1's validation and resumed, a run ends with the uninterrupted run's EMA.
    The resume tests of test_train.py and test_resume.py cannot see this: the capped decay of their
    short runs (``ema.max_window``) is 0, so their EMA is a copy of the model. Here 0.5, uncapped."""
    data = write_tiny_folder(tmp_path / "data")
    overrides = ["epochs=2", "ema.max_window=1.0"]   # 4 updates: the cap 1 - 1/4 keeps decay 0.5
    train(tiny_recipe(data), overrides, tmp_path / "straight")
    original = ClassificationTask.evaluate

    def evaluate_then_sigterm(self, model, batches, rt):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batches, rt)
    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate_then_sigterm)
    with pytest.raises(TrainingInterrupted):
        train(tiny_recipe(data), overrides, tmp_path / "resumed")
    monkeypatch.setattr(ClassificationTask, "evaluate", original)
    assert load_torch(tmp_path / "resumed" / "last.pth")["epoch"] == 1
    train(None, [], resume=tmp_path / "resumed" / "last.pth")
    a, b = load_torch(tmp_path / "straight" / "last.pth"), load_torch(tmp_path / "resumed" / "last.pth")
    assert b["num_updates"] == a["num_updates"] == 4
    assert any(not torch.equal(a["model_ema"][k], a["model"][k]) for k in a["model"]), "EMA is a copy"
    for k in a["model_ema"]:
        assert torch.equal(a["model_ema"][k], b["model_ema"][k]), k
    # best.safetensors holds the set its metadata names, which here differs from the other set
    exported, meta = load_safetensors(tmp_path / "straight" / "best.safetensors")
    best = load_torch(tmp_path / "straight" / "best.pth")
    chosen, other = ("model_ema", "model") if meta["weights"] == "ema" else ("model", "model_ema")
    assert all(torch.equal(exported[k], best[chosen][k]) for k in exported)
    assert any(not torch.equal(exported[k], best[other][k]) for k in exported)
