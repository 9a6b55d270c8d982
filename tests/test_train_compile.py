"""``pale train --compile`` (recipe key ``train.compile``): the training loop runs the model through
``torch.compile`` while checkpoints and exports keep the plain module's keys (no ``_orig_mod.``), the
EMA follows the uncompiled module, and a compiled run stopped mid-epoch resumes to the weights of an
uninterrupted compiled run (slow: inductor compiles on the CPU)."""

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from pale.cli import main
from pale.files import load_torch
from pale.train import TrainingInterrupted
from pale.train.classification import ClassificationTask
from test_train import TINY_MODEL, assert_same_state, make_folder, sigterm_during_training_batch, tiny_recipe, weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    return make_folder(tmp_path_factory.mktemp("data"))


def command(tmp_path, data, run, *extra):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    return ["train", "--recipe", str(recipe), "--data", str(data), "-o", str(run), "--compile", *extra]


def test_compiled_training_saves_the_plain_module_keys(data, tmp_path, monkeypatch):
    # dynamo traces the model as for inductor; the eager backend runs its graphs (no C++ compilation)
    torch._dynamo.reset()
    compiled, original = [], torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return original(model, backend="eager", **kwargs)
    monkeypatch.setattr(torch, "compile", eager_compile)
    seen, loss = [], ClassificationTask.training_loss

    def spy(self, model, batch, rt):
        seen.append(type(model).__name__)
        return loss(self, model, batch, rt)
    monkeypatch.setattr(ClassificationTask, "training_loss", spy)
    run = tmp_path / "run"
    assert main(command(tmp_path, data, run, "--epochs", "1")) == 0
    assert compiled == ["PaleTransformer"] and set(seen) == {"OptimizedModule"}
    plain = timm.create_model("pale_tiny", num_classes=3, **TINY_MODEL).state_dict().keys()
    ckpt = load_torch(run / "last.pth")
    assert ckpt["model"].keys() == plain and ckpt["model_ema"].keys() == plain
    assert load_file(run / "last.safetensors").keys() == plain
    assert ckpt["config"]["train"]["compile"] is True


@pytest.mark.slow
def test_compiled_run_stopped_mid_epoch_resumes_to_the_uninterrupted_compiled_run(data, tmp_path, monkeypatch):
    torch._dynamo.reset()
    straight = tmp_path / "straight"
    assert main(command(tmp_path, data, straight)) == 0
    original = sigterm_during_training_batch(monkeypatch, 5)  # second epoch, second update
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        main(command(tmp_path, data, run))
    assert (load_torch(run / "last.pth")["epoch"], load_torch(run / "last.pth")["step"]) == (1, 2)
    monkeypatch.setattr(ClassificationTask, "training_loss", original)
    assert main(["train", "--resume", str(run / "last.pth")]) == 0
    a_model, a_ema, a = weights(straight / "last.pth")
    b_model, b_ema, b = weights(run / "last.pth")
    assert_same_state(a_model, b_model)
    assert_same_state(a_ema, b_ema)
    assert not any(k.startswith("_orig_mod.") or "._orig_mod." in k for k in b_model)
    assert a["history"] == [dict(h, train_images_per_s=a["history"][i]["train_images_per_s"])
                            for i, h in enumerate(b["history"])]
