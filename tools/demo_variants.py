"""The experiment-only models, loss, augmentation and data of the demo's fourth to seventh searches
(docs/training.md), for reproducing them.

Not part of the package: three convolutional stems for the demo's Pale (the third as the seventh search
built it), the small convolutional network used as a reference and as a teacher, DeiT-style distillation
from that teacher, sharpness-aware minimisation, elastic distortion in front of the recipe's training
transform, and scikit-learn's digits as extra training data. Registers the models with timm, then runs the ``pale``
command line with the remaining arguments:

    python tools/demo_variants.py demo --seed 0 -o runs/cs --set model.name=pale_conv_stem
    python tools/demo_variants.py train --recipe teacher.yaml --data runs/demo/data -o runs/teacher
    python tools/demo_variants.py --teacher runs/teacher/last.pth --kind soft --alpha 0.8 --tau 2 \\
        demo --seed 0 -o runs/kd
    OMP_NUM_THREADS=1 python tools/demo_variants.py --elastic 34 4 demo --workers 0 --seed 0 -o runs/el
    OMP_NUM_THREADS=1 python tools/demo_variants.py demo --workers 0 --seed 0 -o runs/cs28 \\
        --set model.name=pale_cnn_stem --set data.img_size=28
    OMP_NUM_THREADS=1 python tools/demo_variants.py --sam 0.05 demo --workers 0 --seed 0 -o runs/sam --epochs 10 \\
        --set model.kwargs.stem_type=overlap --set data.img_size=56
    OMP_NUM_THREADS=1 python tools/demo_variants.py demo --workers 0 --seed 0 -o runs/deep --epochs 20 \\
        --set model.name=pale_deep_stem --set model.kwargs.stem_type=overlap
    python tools/demo_variants.py --add-sklearn-digits runs/mix    # a copy of runs/demo/data
    OMP_NUM_THREADS=1 pale train --recipe demo_digits --data runs/mix -o runs/mix-s0 --workers 0 --seed 0 --epochs 14

The fourth to sixth searches ran the recipe as it was before the seventh: add ``--epochs 20 --set
model.kwargs.stem_type=overlap --set data.img_size=56`` to their commands (``data.img_size=28`` where they
set it). ``teacher.yaml``: the ``demo_digits`` recipe with ``model: {name: digits_cnn, kwargs: {}, drop_path_rate: 0}``,
``data.img_size: 28`` and ``epochs: 15``.
"""
from __future__ import annotations

import argparse
import os
import sys

# `pale demo` starts itself again (losing the registrations below) to change OpenMP's wait policy when
# other jobs keep the cores busy, unless a policy is set; OpenMP reads it when torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.models import register_model  # noqa: E402

from pale.models.pale_transformer import DeepConvStem, PaleTransformer, _create_pale  # noqa: E402


class _NCHWConvsStem(nn.Module):
    """Convolutions in NCHW, then LayerNorm: ``(B, H, W, C_in)`` -> ``(B, H', W', C)``."""

    def __init__(self, convs: nn.Sequential, dim: int):
        super().__init__()
        self.convs = convs
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ConvStem(_NCHWConvsStem):
    """Two 3x3 stride-2 convolutions (BatchNorm and GELU between), then LayerNorm: ``(B, H, W, C_in)`` ->
    ``(B, H/4, W/4, C)``, in place of the 7x7 stride-4 stem."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(nn.Sequential(nn.Conv2d(in_chans, dim // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(dim // 2),
                                       nn.GELU(), nn.Conv2d(dim // 2, dim, 3, 2, 1)), dim)


@register_model
def pale_conv_stem(pretrained: bool = False, **kwargs) -> PaleTransformer:
    """``pale_tiny`` (with the given kwargs) whose stem is :class:`ConvStem`."""
    model = _create_pale("pale_tiny", **kwargs)
    model.stem = ConvStem(model.in_chans, model.embed_dims[0])
    return model


class CNNStem(_NCHWConvsStem):
    """Two 3x3 conv-BN-ReLU layers at full resolution (16 channels, as the first block of
    :class:`DigitsCNN`), then a 3x3 stride-2 convolution and LayerNorm: ``(B, H, W, C_in)`` ->
    ``(B, H/2, W/2, C)``, for 28x28 digits read at their own size (a 14x14 first-stage map)."""

    def __init__(self, in_chans: int, dim: int, width: int = 16):
        super().__init__(nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                       nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                       nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                       nn.Conv2d(width, dim, 3, 2, 1)), dim)


@register_model
def pale_cnn_stem(pretrained: bool = False, **kwargs) -> PaleTransformer:
    """``pale_tiny`` (with the given kwargs) whose stem is :class:`CNNStem` (stride 2, not 4)."""
    model = _create_pale("pale_tiny", **kwargs)
    model.stem = CNNStem(model.in_chans, model.embed_dims[0])
    return model


@register_model
def pale_deep_stem(pretrained: bool = False, **kwargs) -> PaleTransformer:
    """``pale_tiny`` (with the given kwargs) whose 7x7 stem is replaced, after the model is built, by the
    package's :class:`DeepConvStem`: the seventh search's runs. The package's ``stem_type="deep"`` builds the
    same model with the stem first, so that a seed draws other initial weights."""
    model = _create_pale("pale_tiny", **kwargs)
    model.stem = DeepConvStem(model.in_chans, model.embed_dims[0])
    return model


class DigitsCNN(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (16, 16, pool, 32, 32, pool, 64), global average pooling, a linear head:
    36k parameters, 5.8M multiply-adds at 28x28."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, drop_rate: float = 0.0, **_ignored):
        super().__init__()

        def conv(i: int, o: int) -> list:
            return [nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*conv(in_chans, 16), *conv(16, 16), nn.MaxPool2d(2), *conv(16, 32),
                                      *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Dropout(drop_rate))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model
def digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    # drop_path_rate and timm's pretrained_cfg arguments have no meaning here
    return DigitsCNN(**{k: v for k, v in kwargs.items() if k in ("in_chans", "num_classes", "drop_rate")})


def distil_from(teacher_path: str, kind: str, alpha: float, tau: float) -> None:
    """Make the classification loss ``(1 - alpha) * recipe loss + alpha * distillation loss`` against the
    teacher's outputs on the same augmented batch (resized to the teacher's input size): cross-entropy
    with its top class (``hard``, DeiT) or KL divergence at temperature ``tau`` (``soft``, the loss of
    timm's ``LogitDistillationTask``, which drives timm's own training loop rather than a pale Task and
    builds its teacher by model name rather than from a pale checkpoint)."""
    from pale.io import create_model_from_file
    from pale.train.classification import ClassificationTask

    teacher, info = create_model_from_file(teacher_path, weights="ema")
    teacher.requires_grad_(False)
    size = tuple(info["data_config"]["input_size"][1:])
    recipe_loss = ClassificationTask.training_loss

    def training_loss(self, model, batch, rt):
        if self.mixup_fn is not None:  # the teacher would see other images than the student
            raise SystemExit("distillation here needs aug.mixup=0 and aug.cutmix=0")
        images = rt.to_device(batch[0])
        captured = {}

        def keep_logits(module, args, output):
            captured["logits"] = output
        handle = model.register_forward_hook(keep_logits)
        try:
            loss, n = recipe_loss(self, model, batch, rt)
        finally:
            handle.remove()
        with torch.no_grad():
            small = images if tuple(images.shape[-2:]) == size else F.interpolate(images, size=size, mode="area")
            target = teacher.to(images.device)(small)
        logits = captured["logits"]
        if kind == "hard":
            extra = F.cross_entropy(logits, target.argmax(1))
        else:
            extra = F.kl_div(F.log_softmax(logits / tau, 1), F.log_softmax(target / tau, 1), reduction="batchmean",
                             log_target=True) * tau * tau
        return (1 - alpha) * loss + alpha * extra, n

    ClassificationTask.training_loss = training_loss


def elastic_first(alpha: float, sigma: float) -> None:
    """Put torchvision's elastic distortion (Simard et al., 2003) in front of the recipe's training
    transform, on the image as read (28x28 for the demo's digits), the uncovered canvas black."""
    from torchvision import transforms as T

    from pale.train import classification

    recipe_transform = classification.build_train_transform

    def build_train_transform(cfg, dc):
        return T.Compose([T.ElasticTransform(alpha=alpha, sigma=sigma, fill=0), recipe_transform(cfg, dc)])

    classification.build_train_transform = build_train_transform


def sharpness_aware(rho: float) -> None:
    """Sharpness-aware minimisation (Foret et al., 2021; for vision transformers, Chen et al., 2022): the
    gradient of each update is taken at ``w + rho * g / |g|``, where ``g`` is the gradient at the weights
    ``w``, and the update is applied to ``w``. Two forward and backward passes per update."""
    from pale.train.classification import ClassificationTask
    from pale.train.engine import Trainer

    recipe_loss = ClassificationTask.training_loss
    recipe_step = Trainer._optimizer_step
    moved: list = []

    def undo_moves():
        with torch.no_grad():
            for p, step in moved:
                p.sub_(step)
        moved.clear()

    def training_loss(self, model, batch, rt):
        undo_moves()  # left by a batch that the engine skipped (non-finite loss) without an update
        loss, _ = recipe_loss(self, model, batch, rt)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        scale = rho / (torch.sqrt(sum((g.float() ** 2).sum() for _, g in pairs)) + 1e-12)
        with torch.no_grad():
            for p, g in pairs:
                step = g * scale
                p.add_(step)
                moved.append((p, step))
        return recipe_loss(self, model, batch, rt)

    def optimizer_step(self):
        undo_moves()
        recipe_step(self)

    ClassificationTask.training_loss = training_loss
    Trainer._optimizer_step = optimizer_step


def add_sklearn_digits(data: str) -> int:
    """Write scikit-learn's 1797 8x8 digits (16 grey levels) into ``data/train/<digit>/`` as 28x28 PNGs laid
    out as MNIST's are: the digit scaled to 20x20 in the middle of a black 28x28 canvas."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        small = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        canvas = Image.new("L", (28, 28), 0)
        canvas.paste(small, (4, 4))
        canvas.save(os.path.join(data, "train", str(label), f"sklearn_{i:05d}.png"))
    print(f"wrote {len(digits.images)} digits into {data}/train")
    return 0


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="checkpoint of the teacher (distil from it)")
    parser.add_argument("--kind", choices=("hard", "soft"), default="soft")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--elastic", type=float, nargs=2, metavar=("ALPHA", "SIGMA"),
                        help="elastic distortion before the recipe's training transform")
    parser.add_argument("--sam", type=float, metavar="RHO", help="sharpness-aware minimisation with radius RHO")
    parser.add_argument("--add-sklearn-digits", metavar="DATA",
                        help="add scikit-learn's digits to DATA/train (a copy of a demo's data folder) and stop")
    args, rest = parser.parse_known_args(argv)
    if args.add_sklearn_digits:
        return add_sklearn_digits(args.add_sklearn_digits)
    if args.elastic:
        elastic_first(*args.elastic)
    if args.sam:
        sharpness_aware(args.sam)
    if args.teacher:
        distil_from(args.teacher, args.kind, args.alpha, args.tau)
    from pale.cli import main as pale_main
    return pale_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
