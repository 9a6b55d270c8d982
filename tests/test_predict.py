"""``pale predict`` on scikit-image's sample photos with a tiny checkpoint."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image

import pale  # noqa: F401
from pale.checkpoint import save_checkpoint
from pale.cli import main
from pale.predict import load_classifier, resolve_preprocessing

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=5)
CLASSES = ["astronaut", "coffee", "cat", "rocket", "tree"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("pale_tiny", **TINY).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, model, "pale_tiny", TINY, class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    paths = [root / "astronaut.png", root / "coffee.jpg", root / "sub" / "chelsea.jpeg"]
    for path, img in zip(paths, (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())):
        Image.fromarray(img).save(path)
    (root / "notes.txt").write_text("not an image; folders skip it")
    return root, paths


def _run_json(capsys, *args):
    assert main(["predict", *map(str, args), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_topk_is_well_formed_and_uses_the_models_preprocessing(model, checkpoint, photos, capsys):
    from timm.data import create_transform, resolve_data_config

    _, paths = photos
    result = _run_json(capsys, *paths, "--checkpoint", checkpoint, "--topk", "3")
    assert [p["path"] for p in result["predictions"]] == [str(p) for p in paths]
    # Independently: the pretrained config's eval transform (resize 248, centre crop 224, bicubic).
    transform = create_transform(**resolve_data_config({}, model=model))
    for pred, path in zip(result["predictions"], paths):
        probs = [e["prob"] for e in pred["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert all(CLASSES[e["index"]] == e["class"] for e in pred["top"])
        with torch.no_grad():
            expected = model(transform(Image.open(path).convert("RGB"))[None]).softmax(-1)[0]
        for e in pred["top"]:
            assert e["prob"] == pytest.approx(float(expected[e["index"]]), abs=1e-5)
    assert result["data_config"]["input_size"] == [3, 224, 224]


def test_folder_is_batched_recursively_and_table_printed(checkpoint, photos, capsys):
    root, paths = photos
    assert main(["predict", str(root), "-c", str(checkpoint), "-k", "2", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [ln for ln in lines if not ln.startswith(" ")] == sorted(str(p) for p in paths)
    ranked = [ln.split() for ln in lines if ln.startswith(" ")]
    assert len(ranked) == 6 and all(r[0] in ("1", "2") and r[1].endswith("%") and r[2] in CLASSES for r in ranked)
    assert "\r" not in captured.err  # stderr is not a terminal: plain progress lines, no bar updates
    assert captured.err.startswith("weights: raw (the only weights in the file)")


def test_checkpoint_preprocessing_wins_over_pretrained_cfg(model, tmp_path):
    # What pale train stores: the resolved data_config; an older checkpoint may only hold the recipe.
    stored = dict(input_size=[3, 32, 40], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                  interpolation="bilinear", crop_pct=1.0, crop_mode="center")
    save_checkpoint(tmp_path / "a.pth", model, "pale_tiny", TINY, class_names=CLASSES, data_config=stored)
    clf = load_classifier(tmp_path / "a.pth")
    assert clf.data_config["input_size"] == (3, 32, 40) and clf.data_config["mean"] == (0.5, 0.5, 0.5)
    assert clf.transform(Image.new("RGB", (100, 60))).shape == (3, 32, 40)

    recipe = dict(data=dict(img_size=28, mean=[0.1307] * 3, std=[0.3081] * 3, crop_pct=1.0, interpolation="bicubic"))
    save_checkpoint(tmp_path / "b.pth", model, "pale_tiny", TINY, class_names=CLASSES, config=recipe)
    clf = load_classifier(tmp_path / "b.pth")
    assert clf.data_config["input_size"] == (3, 28, 28) and clf.data_config["std"] == (0.3081,) * 3

    with pytest.raises(ValueError, match="mean .* 2 entries"):
        resolve_preprocessing(dict(data_config=dict(mean=[0.5, 0.5])), model)


def test_grayscale_model_gets_one_channel(tmp_path, photos):
    kw = dict(TINY, in_chans=1)
    gray = timm.create_model("pale_tiny", **kw)
    save_checkpoint(tmp_path / "g.pth", gray, "pale_tiny", kw, class_names=CLASSES,
                        data_config=dict(input_size=[1, 28, 28], mean=[0.1307], std=[0.3081]))
    from pale.predict import predict

    clf = load_classifier(tmp_path / "g.pth")
    result = predict(clf, photos[1][:1], topk=5, show_progress=False)
    assert len(result["predictions"][0]["top"]) == 5


def test_missing_file_is_a_clear_error(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert main(["predict", str(missing), "-c", str(checkpoint)]) == 1
    assert f"image or folder not found: {missing}" in capsys.readouterr().err


def test_non_image_file_is_a_clear_error(checkpoint, photos, tmp_path, capsys):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text, not a PNG")
    assert main(["predict", str(photos[1][0]), str(fake), "-c", str(checkpoint), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"not an image (or an unsupported format): {fake}" in err and "Traceback" not in err
    # ... or skipped and counted when asked.
    result = _run_json(capsys, photos[1][0], fake, "-c", checkpoint, "--skip-bad")
    assert len(result["predictions"]) == 1 and result["skipped"][0]["path"] == str(fake)


def test_checkpoint_without_class_names_is_a_clear_error(model, photos, tmp_path, capsys):
    bare = tmp_path / "no_names.pth"
    save_checkpoint(bare, model, "pale_tiny", TINY)
    assert main(["predict", str(photos[1][0]), "-c", str(bare)]) == 1
    assert f"{bare} stores no class names" in capsys.readouterr().err
