"""``pale det train | eval | predict``: Mask R-CNN + Pale detection and instance segmentation (COCO format)."""
from __future__ import annotations

import argparse
from pathlib import Path


def run_train(args: argparse.Namespace) -> int:
    from ..dense.cli import run_train as train
    from ..dense.det_task import DetectionTask

    return train(args, DetectionTask, [], "runs/det")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..dense.cli import print_metrics
    from ..dense.det_data import CocoInstances, detection_collate
    from ..dense.det_task import evaluate_detector, load_detector
    from ..train import Runtime

    device = torch.device(args.device)
    model, info = load_detector(args.checkpoint, device)
    root = Path(args.data)
    ann = Path(args.ann) if args.ann else root / "annotations" / f"instances_{args.split}.json"
    ds = CocoInstances(root / args.split, ann, train=False)
    if ds.cat_ids != list(info.get("category_ids", ds.cat_ids)):
        raise ValueError(f"{ann} declares categories {ds.cat_ids}, the checkpoint was trained on {info['category_ids']}")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=detection_collate, num_workers=args.workers)
    out = evaluate_detector(model, loader, Runtime(device), ds.coco, ds.cat_ids)
    out.update(checkpoint=str(args.checkpoint), annotations=str(ann), images=len(ds))
    print_metrics(out, args.json_out)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..dense.cli import list_images
    from ..dense.det_task import load_detector
    from ..dense.overlay import detection_overlay, save_png
    from ..train.data import load_image
    from .. import io as pio

    files = list_images(args.inputs)
    device = torch.device(args.device)
    model, info = load_detector(args.checkpoint, device)
    names = ["background"] + list(info.get("class_names") or [])
    out_dir = Path(args.output)
    for f in files:
        rgb = np.asarray(load_image(str(f)), dtype=np.uint8)
        x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1).to(device)
        with torch.no_grad():
            det = model([x])[0]
        keep = det["scores"] >= args.score_thr
        boxes, labels, scores = (det[k][keep].cpu().numpy() for k in ("boxes", "labels", "scores"))
        masks = (det["masks"][keep][:, 0] > 0.5).cpu().numpy()
        save_png(detection_overlay(rgb, boxes, labels, scores, masks, names, args.alpha), out_dir / f"{f.stem}_overlay.png")
        pio.atomic_write_json(out_dir / f"{f.stem}_detections.json", [
            dict(label=names[int(lab)], score=float(s), box_xyxy=[float(v) for v in b])
            for b, lab, s in zip(boxes, labels, scores)])
        print(f"{f}: {len(boxes)} object(s) -> {out_dir / (f.stem + '_overlay.png')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("det", help="detection + instance segmentation: Mask R-CNN + Pale (train, eval, predict)")
    sub = p.add_subparsers(dest="det_command", metavar="ACTION", required=True)

    from ..dense.cli import add_train_options

    t = sub.add_parser("train", help="train Mask R-CNN + Pale on COCO-format data (1x recipe by default)")
    add_train_options(t, "runs/det")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="box and mask AP (COCOeval) of a checkpoint")
    e.add_argument("--checkpoint", required=True, help=".pth or .safetensors written by `pale det train`")
    e.add_argument("--data", required=True, help="COCO folder: <split>/ images, annotations/instances_<split>.json")
    e.add_argument("--split", default="val2017")
    e.add_argument("--ann", help="annotation file (default: <data>/annotations/instances_<split>.json)")
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json-out", help="also write the metrics as JSON")
    e.set_defaults(func=run_eval)

    r = sub.add_parser("predict", help="write PNG overlays of masks and boxes (and the detections as JSON)")
    r.add_argument("inputs", nargs="+", help="image files or folders")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--output", "-o", default="predictions")
    r.add_argument("--score-thr", type=float, default=0.5, help="draw detections with at least this score")
    r.add_argument("--alpha", type=float, default=0.5)
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=run_predict)
