"""``kdcache`` with distributed training broken on purpose, for the DDP test's negative controls.
Run as ``torchrun … tests/ddp_control.py train-student …`` with ``DDP_CONTROL`` one of:

- ``no-averaging``: no DistributedDataParallel, so each rank trains its own replica on its own shards;
- ``duplicate-shards``: every rank is dealt rank 0's shards;
- ``no-adapter-averaging``: the KD adapters' gradients (outside DDP) are not averaged;
- ``unreduced-loss``: each rank reports its own loss as the run's;
- ``unreduced-validation``: each rank's confusion matrix is taken as the whole split's;
- ``unsynced-buffers``: each rank validates with its own BatchNorm statistics."""

import os

import kdcache.batches as batches
import kdcache.distributed as distributed
import kdcache.metrics as metrics
import kdcache.training as training
from kdcache.cli.app import main

CONTROL = os.environ["DDP_CONTROL"]
if CONTROL == "no-averaging":
    training.Trainer.parallel = lambda self, model: model
elif CONTROL == "duplicate-shards":
    _deal = batches.rank_indices
    batches.rank_indices = lambda n, seed, rank, world, groups=None, min_size=1: _deal(n, seed, 0, world, groups,
                                                                                       min_size)
elif CONTROL == "no-adapter-averaging":
    distributed.average_gradients = lambda params: None
elif CONTROL == "unreduced-loss":
    distributed.mean_over_ranks = lambda values: values
elif CONTROL == "unreduced-validation":
    metrics.ConfusionMatrix.all_reduce = lambda self: None
elif CONTROL == "unsynced-buffers":
    distributed.broadcast_buffers = lambda model: None
else:
    raise SystemExit(f"unknown DDP_CONTROL {CONTROL!r}")

if __name__ == "__main__":
    main()
