"""Detection metrics across processes: each rank's detections gathered on rank 0 (over a gloo group made
for the evaluation when the default backend is NCCL), COCOeval there, and the same metrics on every rank as one
process computes over all images."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from pale.dense import det_task
from pale.dense.det_data import CocoInstances, detection_collate
from pale.dense.toydata import make_coco_dataset
from pale.train import Runtime
from pale.train.data import ShardSampler

# pycocotools calls numpy.array(copy=False), deprecated under numpy 2.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WORLD = 2


def val_set(root: Path) -> CocoInstances:
    return CocoInstances(root / "val", root / "annotations" / "instances_val.json", train=False)


class ShiftedTruth:
    """A stand-in detector: image i's ground truth moved by 3i pixels (boxes and masks) and a false
    positive, so that every image scores differently and the AP depends on which images are counted."""

    def __init__(self, ds: CocoInstances):
        self.answers = {}
        for i in range(len(ds)):
            image, target = ds[i]
            n = len(target["boxes"])
            fake = torch.tensor([[0.0, 0.0, 12.0, 12.0]])
            masks = torch.cat([target["masks"].roll(3 * i, dims=-1), torch.zeros_like(target["masks"][:1])])
            labels = torch.cat([target["labels"], torch.ones(1, dtype=torch.int64)])
            self.answers[self.key(image)] = dict(
                boxes=torch.cat([target["boxes"] + 3.0 * i, fake]), labels=labels, masks=masks[:, None].float(),
                scores=torch.linspace(0.9, 0.5, n + 1).roll(i % (n + 1)))

    @staticmethod
    def key(image: torch.Tensor) -> tuple:
        return tuple(image.shape) + (float(image.sum()),)

    def __call__(self, images):
        return [self.answers[self.key(im)] for im in images]


def evaluate(ds: CocoInstances, rt: Runtime) -> dict:
    sampler = ShardSampler(len(ds), rt.world_size, rt.rank)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=detection_collate)
    return det_task.evaluate_detector(ShiftedTruth(ds), loader, rt, ds.coco, ds.cat_ids)


def _rank(rank: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        ds, rt = val_set(Path(root)), Runtime(torch.device("cpu"), rank=rank, world_size=WORLD)
        with mock.patch.object(det_task, "coco_metrics", wraps=det_task.coco_metrics) as cocoeval:
            found = dict(gloo=evaluate(ds, rt), cocoeval_calls=cocoeval.call_count)
        # as under NCCL: the objects go over a gloo group of their own, made for each evaluation and
        # destroyed after it (one left behind aborts the process at exit, after destroy_process_group)
        groups_before = set(c10d._world.pg_map)
        with mock.patch.object(dist, "get_backend", return_value="nccl"), \
                mock.patch.object(dist, "new_group", wraps=dist.new_group) as new_group:
            found["nccl"] = evaluate(ds, rt)
            found["nccl_again"] = evaluate(ds, rt)
        found["gloo_groups_made"] = [call.kwargs.get("backend") for call in new_group.call_args_list]
        found["groups_left"] = len(set(c10d._world.pg_map) - groups_before)
        Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_every_rank_the_metrics_of_one_process(tmp_path):
    root = make_coco_dataset(tmp_path / "coco", {"val": 5}, size_range=(64, 96), obj_size=(14, 30))
    ds = val_set(root)
    alone = evaluate(ds, Runtime(torch.device("cpu")))
    assert 5 < alone["bbox_ap"] < 95 and 5 < alone["segm_ap"] < 95
    # rank 0's images alone score otherwise: gathering the other rank's results matters
    shard0 = det_task.coco_metrics(ds.coco, det_task.coco_results(*_shard_outputs(ds)), [1, 3, 5])
    assert shard0["bbox_ap"] != pytest.approx(alone["bbox_ap"])
    mp.spawn(_rank, args=(str(root), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["gloo_groups_made"] == ["gloo", "gloo"] and found["groups_left"] == 0
        assert found["cocoeval_calls"] == (1 if rank == 0 else 0)  # COCOeval runs on rank 0 only
        for run in ("gloo", "nccl", "nccl_again"):
            assert found[run] == alone, (rank, run)


def _shard_outputs(ds: CocoInstances):
    """Detections, image ids and category ids of rank 0's images (0, 2, 4: ids 1, 3, 5)."""
    model = ShiftedTruth(ds)
    items = [ds[i] for i in range(0, len(ds), WORLD)]
    return model([im for im, _ in items]), [int(t["image_id"]) for _, t in items], ds.cat_ids
