"""Atomic writes, safe loading and clear weight-mismatch errors (pale.files, pale.checkpoint), and
images as the commands read them (pale.images)."""
import json
import os
import pickle
import re

import pytest
import torch

from pale.checkpoint import WeightsMismatchError, create_model_from_file, load_weights, save_checkpoint
from pale.errors import CheckpointError, InputError
from pale.files import atomic_path, atomic_write_text, load_torch, output_folder, save_safetensors
from pale.models.pale_transformer import PaleTransformer

SMALL = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), num_classes=3)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_output_that_is_a_folder_or_under_a_file_is_refused_before_writing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "results").mkdir()
    with pytest.raises(InputError, match="results: it is a folder; name a file"):
        atomic_write_text(tmp_path / "results", "x")
    with pytest.raises(InputError, match=r"notes.txt is a file, not a folder"):
        atomic_write_text(tmp_path / "notes.txt" / "metrics.json", "x")
    with pytest.raises(InputError, match=r"run folder .*notes.txt/run/a: .*notes.txt is a file, not a folder"):
        output_folder(tmp_path / "notes.txt" / "run" / "a", "run folder")
    assert output_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run"  # not there yet: fine
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Boom()}, f)
    with pytest.raises(CheckpointError, match=r"refusing to load .* \(Weights only load failed"):
        load_torch(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content", [b'{"top1": 97.7}', b"", b"PK"])
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, content):
    # a JSON file given as a checkpoint used to be "refused" as a pickle that could run code
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    message = "checkpoint is empty" if not content else "is not a PyTorch checkpoint: neither a zip archive nor a pickle"
    with pytest.raises(CheckpointError, match=message):
        load_torch(path)


def test_an_onnx_file_given_as_a_checkpoint_says_what_to_give_instead(tmp_path):
    path = tmp_path / "digits.onnx"
    path.write_bytes(b"\x08\x08\x12\x07pytorch")  # how an exported graph starts
    with pytest.raises(CheckpointError, match=r"digits.onnx is an ONNX graph, .* give them the .pth checkpoint or "
                                              r"\.safetensors export .* onnxruntime"):
        load_torch(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.randn(100, 100)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_torch(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_torch(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint is empty"):
        load_torch(tmp_path / "empty.pth")


def test_mismatch_lists_keys_and_non_strict_loads_the_rest():
    src = PaleTransformer(**SMALL)
    dst = PaleTransformer(**dict(SMALL, num_classes=7))
    with pytest.raises(WeightsMismatchError, match=r"head.fc.weight: \(3, 64\) vs \(7, 64\)"):
        load_weights(dst, src.state_dict())
    report = load_weights(dst, src.state_dict(), strict=False)
    assert [k for k, _, _ in report.mismatched] == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(dst.stem.proj.weight, src.stem.proj.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_model_file_round_trip(tmp_path, suffix):
    import timm
    model = timm.create_model("pale_tiny", num_classes=4, depths=(1, 1, 1, 1)).eval()
    kwargs = dict(num_classes=4, depths=[1, 1, 1, 1])
    path = tmp_path / f"m{suffix}"
    if suffix == ".pth":
        save_checkpoint(path, model, "pale_tiny", kwargs, class_names=list("abcd"))
    else:
        save_safetensors(model.state_dict(), path, dict(model_name="pale_tiny", model_kwargs=kwargs,
                                                        class_names=list("abcd")))
    loaded, info = create_model_from_file(path)
    assert info["class_names"] == list("abcd")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_atomic_write_has_ordinary_permissions(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_cli_refuses_mismatched_checkpoint_unless_non_strict(tmp_path, capsys):
    import skimage.data
    from PIL import Image

    from pale.cli import main
    model = PaleTransformer(**SMALL)
    # The file claims 4 classes but holds a 3-class head: a checkpoint of another class count.
    save_checkpoint(tmp_path / "c.pth", model, "pale_tiny", dict(SMALL, num_classes=4), class_names=list("abcd"))
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.png")
    assert main(["predict", str(tmp_path / "coffee.png"), "-c", str(tmp_path / "c.pth"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "head.fc.weight: (3, 64) vs (4, 64)" in err and "--non-strict" in err
    with pytest.warns(UserWarning, match="left out"):
        assert main(["predict", str(tmp_path / "coffee.png"), "-c", str(tmp_path / "c.pth"), "--no-progress",
                     "--non-strict", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["predictions"][0]["top"]) == 4


def test_resuming_from_a_checkpoint_that_does_not_fit_names_it(tmp_path):
    """`--resume` loads the model and the EMA of the file it names; each that does not fit stops the run
    with an error naming the file (and the EMA)."""
    import re

    from pale.files import save_torch
    from pale.train import train
    from tiny_train import tiny_recipe, write_tiny_folder

    train(tiny_recipe(write_tiny_folder(tmp_path / "data")), [], tmp_path / "run")
    ckpt = load_torch(tmp_path / "run" / "last.pth")
    wrong = {k: (torch.zeros(5, *v.shape[1:]) if k == "head.fc.weight" else v) for k, v in ckpt["model"].items()}
    for changes, error, message in [
            (dict(model=wrong), WeightsMismatchError, "{} does not fit PaleTransformer"),
            (dict(model_ema=wrong), WeightsMismatchError, "{} (EMA) does not fit PaleTransformer")]:
        path = tmp_path / "changed.pth"
        save_torch(dict(ckpt, **changes), path)
        with pytest.raises(error, match="^" + re.escape(message.format(path))):
            train(None, [], resume=path)


def test_images_devices_and_json_as_the_commands_use_them(tmp_path):
    from PIL import Image

    from pale.errors import InputError, MissingFileError
    from pale.device import resolve_device
    from pale.files import atomic_write_json
    from pale.images import BadImageError, IMAGE_EXTENSIONS, find_images, load_image

    for rel in ("a/x.png", "a/sub/y.JPG", "b/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (3, 2), 7).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    assert find_images([tmp_path / "a", tmp_path / "b"]) == [
        tmp_path / "a/sub/y.JPG", tmp_path / "a/x.png", tmp_path / "b/z.png"]
    with pytest.raises(MissingFileError, match="^image or folder not found: "):
        find_images(tmp_path / "nope")
    with pytest.raises(InputError, match="^" + re.escape(
            f"folder {tmp_path / 'empty'} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})") + "$"):
        find_images(tmp_path / "empty")
    assert ".png" in IMAGE_EXTENSIONS and ".jpg" in IMAGE_EXTENSIONS
    with pytest.raises(BadImageError, match="^" + re.escape(
            f"not an image (or an unsupported format): {tmp_path / 'a' / 'notes.txt'}") + "$"):
        load_image(tmp_path / "a" / "notes.txt")
    assert load_image(tmp_path / "b/z.png").mode == "RGB" and load_image(tmp_path / "b/z.png", "L").mode == "L"
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from pale.images import load_image

    ramp16 = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    # Pillow's own convert clips: almost every pixel of a 16-bit ramp comes out white
    assert (np.asarray(Image.open(tmp_path / "ramp16.png").convert("L")) == 255).mean() > 0.9
    rgb = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], np.rint(ramp16 / 257.0).astype(np.uint8))  # the high byte, rounded
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "ramp.tif", "L")), np.rint(ramp * 255).astype(np.uint8))
    small = np.arange(64, dtype=np.int32).reshape(8, 8)  # 'I' with 8-bit values: kept as they are
    Image.fromarray(small).save(tmp_path / "small.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "small.tif", "L")), small.astype(np.uint8))
    photo = (np.arange(8 * 8 * 3) % 256).astype(np.uint8).reshape(8, 8, 3)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "photo.png")), photo)  # 8-bit: untouched


def _sideways_photo(path, orientation=6):
    """A 40x20 (WxH) PNG whose top-left 10x10 corner is red, tagged with an EXIF ``orientation``."""
    import numpy as np
    from PIL import Image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10, :10, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif)
    return stored


def test_images_are_turned_upright_by_their_exif_orientation(tmp_path):
    import numpy as np
    from PIL import Image

    from pale.images import exif_turn_note, load_image

    stored = _sideways_photo(tmp_path / "phone.png", orientation=6)  # 6: shown turned 90 degrees clockwise
    assert Image.open(tmp_path / "phone.png").size == (40, 20)
    upright = np.asarray(load_image(tmp_path / "phone.png"))
    assert upright.shape == (40, 20, 3)
    assert np.array_equal(upright, np.rot90(stored, k=-1))  # the red corner is now at the top right
    assert upright[:10, -10:, 0].min() == 255 and upright[:, :10, 0].max() == 0
    assert "EXIF orientation" in exif_turn_note(tmp_path / "phone.png")
    _sideways_photo(tmp_path / "flipped.png", orientation=3)  # 3: turned 180 degrees, same size
    assert np.asarray(load_image(tmp_path / "flipped.png", "L")).shape == (20, 40)
    assert exif_turn_note(tmp_path / "flipped.png") == ""
    _sideways_photo(tmp_path / "plain.png", orientation=1)
    assert np.array_equal(np.asarray(load_image(tmp_path / "plain.png")), stored)
    assert exif_turn_note(tmp_path / "plain.png") == "" and exif_turn_note(tmp_path / "missing.png") == ""


def test_output_stems_keep_inputs_with_one_name_apart(tmp_path):
    from pale.images import output_stems

    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "b" / "x.JPG", tmp_path / "b" / "y.png"]
    assert list(output_stems(files).values()) == ["a/x", "b/x_png", "b/x_jpg", "b/y"]
    one_folder = [tmp_path / "b" / "x.png", tmp_path / "b" / "y.png"]
    assert list(output_stems(one_folder).values()) == ["x", "y"]  # the plain stems, as before
    assert output_stems([]) == {}


def test_folders_are_searched_without_hidden_files_and_folders(tmp_path):
    # macOS's "._x.jpg" resource forks are not images, and .ipynb_checkpoints holds copies
    from pale.images import find_images

    for name in ("cat/a.jpg", "cat/._a.jpg", "cat/.ipynb_checkpoints/a-checkpoint.jpg", "cat/sub/b.PNG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["cat/a.jpg", "cat/sub/b.PNG"]
    assert find_images(tmp_path / "cat" / "._a.jpg") == [tmp_path / "cat" / "._a.jpg"]  # named: taken as given
