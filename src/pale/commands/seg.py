"""``pale seg train | eval | predict``: UperNet + Pale semantic segmentation (ADE20K layout)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._dense import (add_eval_options, add_predict_options, add_train_options, loaded, predict_images, report_metrics,
                     run_train as train)
from ._options import fraction, nonnegative_int, positive_float, positive_int


def _test_settings(args: argparse.Namespace, info: dict) -> dict:
    from ..dense.seg_task import SEG_DEFAULTS, inference_settings

    t = dict(SEG_DEFAULTS["test"], **(info.get("data_config", {}).get("test") or {}))
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
    return inference_settings({"test": t})


def run_train(args: argparse.Namespace) -> int:
    from ..dense.seg_task import SegmentationTask

    extra = []
    if args.num_classes is not None:
        extra.append(f"data.num_classes={args.num_classes}")
    if args.reduce_zero_label is not None:
        extra.append(f"data.reduce_zero_label={str(args.reduce_zero_label).lower()}")
    return train(args, SegmentationTask, extra, "runs/seg")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..dense.seg_data import SegmentationFolder, list_collate
    from ..dense.seg_task import evaluate_segmenter, load_segmenter
    from ..train import setup_runtime

    rt = setup_runtime(args.device, args.amp)
    model, info = load_segmenter(args.checkpoint, rt.device, args.weights)
    dc = info["data_config"]
    loaded(info, rt.device, str(rt.amp_dtype or "float32").replace("torch.", ""))
    reduce = dc.get("reduce_zero_label", False) if args.reduce_zero_label is None else args.reduce_zero_label
    ds = SegmentationFolder(Path(args.data), args.split, None, reduce, label_ids=dc["label_ids"])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=list_collate, num_workers=args.workers)
    with rt.autocast():
        out = evaluate_segmenter(model, loader, rt, ds.num_classes, _test_settings(args, info))
    names = info.get("class_names") or [str(i) for i in dc["label_ids"]]
    out["class_iou"] = dict(zip(names, out["class_iou"]))
    out["class_acc"] = dict(zip(names, out["class_acc"]))
    out.update(data=str(args.data), split=args.split, images=len(ds))
    report_metrics(args, out, f"eval-{args.split or 'seg'}.json", info, rt.amp_dtype)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..dense.overlay import add_legend, palette, save_png, segmentation_overlay
    from ..dense.seg_data import normalize
    from ..dense.seg_eval import segment
    from ..dense.seg_task import load_segmenter
    for f, rgb, model, info, out_dir, stem in predict_images(args, load_segmenter):
        label_ids = np.asarray(info["data_config"]["label_ids"], dtype=np.int64)
        names = info.get("class_names") or [str(i) for i in label_ids]
        colours = palette(len(label_ids))
        settings = _test_settings(args, info)
        device = next(model.parameters()).device
        x = normalize(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1))[None].to(device)
        with torch.no_grad():
            pred = segment(model, x, len(label_ids), **settings)[0].argmax(0).cpu().numpy()
        present = np.unique(pred)
        legend = [(colours[k], f"{label_ids[k]} {names[k]}" if names[k] != str(label_ids[k]) else names[k])
                  for k in present]
        overlay = add_legend(segmentation_overlay(rgb, pred, args.alpha), legend)
        overlay_path, labels_path = (out_dir / f"{stem}_{kind}.png" for kind in ("overlay", "labels"))
        save_png(overlay, overlay_path)
        ids = label_ids[pred]  # the data set's own annotation ids
        save_png(ids.astype(np.uint8 if label_ids.max() <= 255 else np.uint16), labels_path)
        print(f"{f} -> {overlay_path}, {labels_path} "
              f"(ids {', '.join(str(label_ids[k]) for k in present)})")
    return 0


def _add_test_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["whole", "slide"], help="whole-image or sliding-window inference")
    p.add_argument("--ms", action="store_true", help="multi-scale: ratios 0.75, 1.0, 1.25, 1.5, 1.75")
    p.add_argument("--scales", type=positive_float, nargs="+", help="explicit scale ratios")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    p.add_argument("--test-scale", type=nonnegative_int, nargs=2, metavar=("LONG", "SHORT"),
                   help="rescale images to fit LONG x SHORT before inference (0 0: keep their size)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("seg", help="semantic segmentation: UperNet + Pale (train, eval, predict)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train UperNet + Pale on an ADE20K-layout folder (Swin recipe by default)")
    add_train_options(t, "runs/seg")
    t.add_argument("--num-classes", type=positive_int,
                   help="number of classes, ids 0..K-1 (1..K with --reduce-zero-label); default: the ids the "
                        "training annotations use")
    t.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true", default=None,
                   help="id 0 is ignored, not a class (ADE20K; the default)")
    t.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="mIoU / mAcc / aAcc of a checkpoint on a folder")
    add_eval_options(e, "pale seg train")
    e.add_argument("--data", required=True, help="folder with images/<split>/ and annotations/<split>/")
    e.add_argument("--split", default="validation")
    e.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_true", default=None,
                   help="(default: as in training)")
    e.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false")
    _add_test_options(e)
    e.set_defaults(func=run_eval)

    r = sub.add_parser("predict", help="write PNG overlays (with a legend) and label maps in the data set's ids")
    add_predict_options(r, "pale seg train")
    r.add_argument("--alpha", type=fraction, default=0.5, help="opacity of the class colours (0..1)")
    _add_test_options(r)
    r.set_defaults(func=run_predict)
