"""``kdcache`` with distributed training broken on purpose, for the DDP test's negative controls.
``DDP_CONTROL=no-averaging``: no DistributedDataParallel, so each rank trains its own replica on
its own shards; ``DDP_CONTROL=duplicate-shards``: every rank is dealt rank 0's shards. Run as
``torchrun … tests/ddp_control.py train-student …``."""

import os

import kdcache.training as training
from kdcache.cli.app import main

if os.environ["DDP_CONTROL"] == "no-averaging":
    training.Trainer.parallel = lambda self, model: model
elif os.environ["DDP_CONTROL"] == "duplicate-shards":
    _deal = training.rank_indices
    training.rank_indices = lambda n, seed, rank, world, groups=None, min_size=1: _deal(n, seed, 0, world, groups,
                                                                                         min_size)
else:
    raise SystemExit(f"unknown DDP_CONTROL {os.environ['DDP_CONTROL']!r}")

if __name__ == "__main__":
    main()
