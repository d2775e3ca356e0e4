"""Test-wide set-up: without a GPU, Triton kernels run in its CPU interpreter; under pytest-xdist
each worker computes on one thread (torch, Numba, and the processes tests start), since CI's
workers are as many as the cores and two threads each would only take turns on them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    torch.set_num_threads(1)
