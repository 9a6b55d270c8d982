"""``pale seg train | eval | predict``: UperNet + Pale semantic segmentation (ADE20K layout)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _test_settings(args: argparse.Namespace, info: dict) -> dict:
    from ..dense.seg_task import inference_settings

    test = dict(info.get("data_config", {}).get("test") or {})
    cfg = {"test": dict(dict(mode="whole", scale=[2048, 512], crop_size=[512, 512], stride=[341, 341],
                             scales=[1.0], flip=False), **test)}
    t = cfg["test"]
    if args.mode:
        t["mode"] = args.mode
    if args.ms:
        t["scales"] = [0.75, 1.0, 1.25, 1.5, 1.75]
    if args.scales:
        t["scales"] = list(args.scales)
    if args.flip:
        t["flip"] = True
    if args.test_scale:
        t["scale"] = None if args.test_scale == [0, 0] else list(args.test_scale)
    return inference_settings(cfg)


def run_train(args: argparse.Namespace) -> int:
    from ..dense.cli import run_train as train
    from ..dense.seg_task import SegmentationTask

    extra = []
    if args.num_classes is not None:
        extra.append(f"data.num_classes={args.num_classes}")
    if args.reduce_zero_label is not None:
        extra.append(f"data.reduce_zero_label={str(args.reduce_zero_label).lower()}")
    return train(args, SegmentationTask, extra, "runs/seg")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..dense.cli import print_metrics
    from ..dense.seg_data import SegmentationFolder, list_collate
    from ..dense.seg_task import evaluate_segmenter, load_segmenter
    from ..train import Runtime

    device = torch.device(args.device)
    model, info = load_segmenter(args.checkpoint, device)
    num_classes = int(info["model_kwargs"]["num_classes"])
    reduce = info.get("data_config", {}).get("reduce_zero_label", False) if args.reduce_zero_label is None \
        else args.reduce_zero_label
    ds = SegmentationFolder(Path(args.data), args.split, num_classes, reduce)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=list_collate, num_workers=args.workers)
    out = evaluate_segmenter(model, loader, Runtime(device), num_classes, _test_settings(args, info))
    names = info.get("class_names") or [str(i) for i in range(num_classes)]
    out["class_iou"] = dict(zip(names, out["class_iou"]))
    out["class_acc"] = dict(zip(names, out["class_acc"]))
    out.update(checkpoint=str(args.checkpoint), data=str(args.data), split=args.split, images=len(ds))
    print_metrics(out, args.json_out)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..dense.cli import list_images
    from ..dense.overlay import save_png, segmentation_overlay
    from ..dense.seg_data import normalize
    from ..dense.seg_eval import segment
    from ..dense.seg_task import load_segmenter
    from ..train.data import load_image

    files = list_images(args.inputs)
    device = torch.device(args.device)
    model, info = load_segmenter(args.checkpoint, device)
    num_classes = int(info["model_kwargs"]["num_classes"])
    settings = _test_settings(args, info)
    out_dir = Path(args.output)
    for f in files:
        img = load_image(str(f))
        rgb = np.asarray(img, dtype=np.uint8)
        x = normalize(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1))[None].to(device)
        with torch.no_grad():
            pred = segment(model, x, num_classes, **settings)[0].argmax(0).cpu().numpy()
        save_png(segmentation_overlay(rgb, pred, args.alpha), out_dir / f"{f.stem}_overlay.png")
        save_png(pred.astype(np.uint8 if num_classes <= 256 else np.uint16), out_dir / f"{f.stem}_labels.png")
        print(f"{f} -> {out_dir / (f.stem + '_overlay.png')}")
    return 0


def _add_test_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["whole", "slide"], help="whole-image or sliding-window inference")
    p.add_argument("--ms", action="store_true", help="multi-scale: ratios 0.75, 1.0, 1.25, 1.5, 1.75")
    p.add_argument("--scales", type=float, nargs="+", help="explicit scale ratios")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    p.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="rescale images to fit LONG x SHORT before inference (0 0: keep their size)")
    p.add_argument("--device", default="cpu")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("seg", help="semantic segmentation: UperNet + Pale (train, eval, predict)")
    sub = p.add_subparsers(dest="seg_command", metavar="ACTION", required=True)

    from ..dense.cli import add_train_options

    t = sub.add_parser("train", help="train UperNet + Pale on an ADE20K-layout folder (Swin recipe by default)")
    add_train_options(t, "runs/seg")
    t.add_argument("--num-classes", type=int, help="number of classes (data.num_classes, default 150)")
    t.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true", default=None,
                   help="label 0 is ignore and labels 1..K become 0..K-1 (ADE20K; the default)")
    t.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="mIoU / mAcc / aAcc of a checkpoint on a folder")
    e.add_argument("--checkpoint", required=True, help=".pth or .safetensors written by `pale seg train`")
    e.add_argument("--data", required=True, help="folder with images/<split>/ and annotations/<split>/")
    e.add_argument("--split", default="validation")
    e.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true", default=None,
                   help="(default: as in training)")
    e.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false")
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--json-out", help="also write the metrics (and per-class IoU) as JSON")
    _add_test_options(e)
    e.set_defaults(func=run_eval)

    r = sub.add_parser("predict", help="write PNG overlays (and label maps) of the predicted classes")
    r.add_argument("inputs", nargs="+", help="image files or folders")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--output", "-o", default="predictions", help="folder for <name>_overlay.png / <name>_labels.png")
    r.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours")
    _add_test_options(r)
    r.set_defaults(func=run_predict)
