"""``kdcache`` with distributed training broken on purpose, for the DDP test's negative controls.
Run as ``torchrun … tests/ddp_control.py OUT train-student …`` with ``DDP_CONTROL`` a comma list
of the ways to break it, each run in turn into ``OUT/<way>`` in one launch (one process group,
kept between the runs: a launch costs more than a tiny run):

- ``no-averaging``: no DistributedDataParallel, so each rank trains its own replica on its own shards;
- ``duplicate-shards``: every rank is dealt rank 0's shards;
- ``no-adapter-averaging``: the KD adapters' gradients (outside DDP) are not averaged;
- ``unreduced-loss``: each rank reports its own loss as the run's;
- ``unreduced-validation``: each rank's confusion matrix is taken as the whole split's;
- ``unsynced-buffers``: each rank validates with its own BatchNorm statistics."""

import os
import sys
from pathlib import Path

import pytest

import kdcache.core.distributed as distributed
import kdcache.core.metrics as metrics
import kdcache.train.batches as batches
import kdcache.train.trainer as training
from kdcache.cli.app import app

_deal = batches.rank_indices
BREAKS = {
    "no-averaging": (training.Trainer, "parallel", lambda self, model: model),
    "duplicate-shards": (batches, "rank_indices", lambda n, seed, rank, world, groups=None, min_size=1:
                         _deal(n, seed, 0, world, groups, min_size)),
    "no-adapter-averaging": (distributed, "average_gradients", lambda params: None),
    "unreduced-loss": (distributed, "mean_over_ranks", lambda values: values),
    "unreduced-validation": (metrics.ConfusionMatrix, "all_reduce", lambda self: None),
    "unsynced-buffers": (distributed, "broadcast_buffers", lambda model: None),
}


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    controls = os.environ["DDP_CONTROL"].split(",")
    unknown = [c for c in controls if c not in BREAKS]
    if unknown:
        raise SystemExit(f"unknown DDP_CONTROL {unknown}")
    shutdown = distributed.shutdown
    with pytest.MonkeyPatch.context() as keep:
        keep.setattr(distributed, "shutdown", lambda: None)  # one process group for every run
        for control in controls:
            with pytest.MonkeyPatch.context() as broken:
                broken.setattr(*BREAKS[control])
                app([*args, "--out", str(out / control)], standalone_mode=False)
    shutdown()


if __name__ == "__main__":
    main()
