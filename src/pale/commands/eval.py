"""``pale eval CHECKPOINT --data FOLDER``: top-1, top-5 and loss of a saved classifier on an image folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional


def evaluate_checkpoint(checkpoint: str, data: str, batch_size: int = 64, workers: int = 0, amp: str = "none",
                        device: str = "auto", skip_bad_images: bool = False,
                        data_config: Optional[Dict[str, Any]] = None, strict: bool = True) -> Dict[str, Any]:
    """Rebuild the model of ``checkpoint`` (EMA weights when present) and evaluate it on
    ``data/<class>/*`` with the preprocessing stored in the checkpoint."""
    import torch
    from torch.utils.data import DataLoader

    from ..io import create_model_from_file
    from ..train.classification import build_eval_transform, evaluate_classifier
    from ..train.data import ImageFolderDataset, SkipCollate
    from ..train.engine import setup_runtime

    model, info = create_model_from_file(checkpoint, strict=strict)
    class_names = info.get("class_names")
    if not class_names:
        raise ValueError(f"{checkpoint} has no class names; it cannot be matched to the folders of {data}")
    dc = dict(info.get("data_config") or {})
    if not dc:
        from timm.data import resolve_data_config
        dc = resolve_data_config(model=model)
        dc["input_size"] = list(dc["input_size"])
    dc.update(data_config or {})
    rt = setup_runtime(device, amp)
    dataset = ImageFolderDataset(Path(data), build_eval_transform(dc), class_names=class_names,
                                 skip_bad=skip_bad_images, what="evaluation folder")
    collate = SkipCollate()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    skipped = 0

    def batches():
        nonlocal skipped
        from tqdm import tqdm
        for batch, n in tqdm(loader, desc="eval", leave=False, disable=None):
            skipped += n
            if batch is not None:
                yield batch

    model.to(rt.device)
    with torch.no_grad():
        metrics = evaluate_classifier(model, batches(), rt)
    return dict(metrics, checkpoint=str(checkpoint), data=str(data), skipped_images=skipped,
                amp=str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "none", data_config=dc)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json

    result = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.workers, args.amp, args.device,
                                 args.skip_bad_images, strict=not args.non_strict)
    print(f"top1 {result['top1']:.3f}  top5 {result['top5']:.3f}  loss {result['loss']:.4f}  "
          f"({result['n']} images{', %d skipped' % result['skipped_images'] if result['skipped_images'] else ''})")
    out = Path(args.output) if args.output else Path(args.checkpoint).with_name(
        f"eval-{Path(args.data).resolve().name}.json")
    atomic_write_json(out, result)
    print(f"wrote {out}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="top-1 / top-5 / loss of a checkpoint on an image folder")
    p.add_argument("checkpoint", help="a .pth checkpoint of pale train or a .safetensors export")
    p.add_argument("--data", required=True, help="folder of <class>/<image> (class names as in the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--non-strict", action="store_true",
                   help="load the weights that fit and report the rest, instead of refusing a mismatched checkpoint")
    p.add_argument("--output", "-o", help="JSON result (default: eval-<folder>.json next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="also print the JSON")
    p.set_defaults(func=run)
