"""``pale det train | eval | predict``: Mask R-CNN + Pale detection and instance segmentation (COCO format)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._dense import (add_eval_options, add_predict_options, add_train_options, loaded, predict_images, report_metrics,
                     run_train as train)
from ._options import fraction


def run_train(args: argparse.Namespace) -> int:
    from ..dense.det_task import DetectionTask

    return train(args, DetectionTask, [], "runs/det")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..dense.det_data import CocoInstances, detection_collate
    from ..dense.det_task import evaluate_detector, load_detector
    from ..errors import InputError
    from ..train import setup_runtime

    rt = setup_runtime(args.device, args.amp)
    model, info = load_detector(args.checkpoint, rt.device, args.weights)
    loaded(info, rt.device, str(rt.amp_dtype or "float32").replace("torch.", ""))
    root = Path(args.data)
    ann = Path(args.ann) if args.ann else root / "annotations" / f"instances_{args.split}.json"
    ds = CocoInstances(root / args.split, ann, train=False)
    if ds.cat_ids != list(info.get("category_ids", ds.cat_ids)):
        raise InputError(f"{ann} declares categories {ds.cat_ids}, the checkpoint was trained on {info['category_ids']}")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=detection_collate, num_workers=args.workers)
    with rt.autocast():
        out = evaluate_detector(model, loader, rt, ds.coco, ds.cat_ids)
    out.update(annotations=str(ann), images=len(ds))
    report_metrics(args, out, f"eval-{args.split}.json", info, rt.amp_dtype)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..files import atomic_write_json
    from ..dense.det_task import load_detector
    from ..dense.overlay import detection_overlay, save_png

    for f, rgb, model, info, out_dir, stem in predict_images(args, load_detector):
        names = ["background"] + list(info.get("class_names") or [])
        device = next(model.parameters()).device
        x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1).to(device)
        with torch.no_grad():
            det = model([x])[0]
        keep = det["scores"] >= args.score_thr
        boxes, labels, scores = (det[k][keep].cpu().numpy() for k in ("boxes", "labels", "scores"))
        masks = (det["masks"][keep][:, 0] > 0.5).cpu().numpy()
        overlay_path = out_dir / f"{stem}_overlay.png"
        save_png(detection_overlay(rgb, boxes, labels, scores, masks, names, args.alpha), overlay_path)
        atomic_write_json(out_dir / f"{stem}_detections.json", [
            dict(label=names[int(lab)], score=float(s), box_xyxy=[float(v) for v in b])
            for b, lab, s in zip(boxes, labels, scores)])
        print(f"{f}: {len(boxes)} object(s) -> {overlay_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("det", help="detection + instance segmentation: Mask R-CNN + Pale (train, eval, predict)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train Mask R-CNN + Pale on COCO-format data (1x recipe by default)")
    add_train_options(t, "runs/det")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="box and mask AP (COCOeval) of a checkpoint")
    add_eval_options(e, "pale det train")
    e.add_argument("--data", required=True, help="COCO folder: <split>/ images, annotations/instances_<split>.json")
    e.add_argument("--split", default="val2017")
    e.add_argument("--ann", help="annotation file (default: <data>/annotations/instances_<split>.json)")
    e.set_defaults(func=run_eval)

    r = sub.add_parser("predict", help="write PNG overlays of masks and boxes (and the detections as JSON)")
    add_predict_options(r, "pale det train")
    r.add_argument("--score-thr", type=fraction, default=0.5, help="draw detections with at least this score (0..1)")
    r.add_argument("--alpha", type=fraction, default=0.5, help="opacity of the masks (0..1)")
    r.set_defaults(func=run_predict)
