"""Evaluate a saved classifier on an image folder: what ``pale eval`` and the demo run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: str, data: str, batch_size: int = 64, workers: int = 0, amp: str = "none",
                        device: str = "auto", skip_bad_images: bool = False,
                        data_config: Optional[Dict[str, Any]] = None, strict: bool = True,
                        weights: str = "best", show_progress: bool = True) -> Dict[str, Any]:
    """Top-1, top-5 (%) and loss of ``checkpoint`` on ``data/<class>/*``.

    The model is rebuilt from the file with the chosen ``weights`` (:func:`pale.checkpoint.select_weights`),
    images are preprocessed as :func:`pale.predict.resolve_preprocessing` finds (``data_config``
    overrides single keys), and evaluation runs in float32 unless ``amp`` asks for ``bf16``/``fp16``.
    The result records the weights, the precision and the preprocessing used.
    """
    import torch
    from torch.utils.data import DataLoader

    from ..errors import InputError
    from ..checkpoint import create_model_from_file
    from ..predict import resolve_preprocessing
    from ..progress import progress
    from .classification import build_eval_transform, evaluate_classifier
    from .data import ImageFolderDataset, SkipCollate
    from .runtime import setup_runtime

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    rt = setup_runtime(device, amp)
    model, info = create_model_from_file(checkpoint, strict=strict, weights=weights)
    class_names = info.get("class_names")
    if not class_names:
        raise InputError(f"{checkpoint} has no class names; it cannot be matched to the folders of {data}")
    dc = dict(resolve_preprocessing(info, model), **(data_config or {}))
    dataset = ImageFolderDataset(Path(data), build_eval_transform(dc), class_names=class_names,
                                 skip_bad=skip_bad_images, mode="L" if dc["input_size"][0] == 1 else "RGB",
                                 what="evaluation folder")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=SkipCollate())
    skipped = 0

    def batches():
        nonlocal skipped
        for batch, n in progress(loader, desc="eval", unit="batches", enabled=show_progress):
            skipped += n
            if batch is not None:
                yield batch

    model.to(rt.device)
    with torch.no_grad():
        metrics = evaluate_classifier(model, batches(), rt)
    return dict(metrics, checkpoint=str(checkpoint), data=str(data), skipped_images=skipped,
                weights=info["weights"], weights_reason=info["weights_reason"],
                amp=str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "none",
                data_config={k: list(v) if isinstance(v, tuple) else v for k, v in dc.items()})
