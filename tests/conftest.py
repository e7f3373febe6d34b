"""Session setup for the whole suite (helpers live in ``tests/helpers``, not here)."""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    # The Triton backend runs its kernels on CPU tensors through the interpreter when there is no GPU;
    # triton reads this when the kernels are defined, so it is set before any test module imports
    # wrpo_kernels (conftest hooks run before collection).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tensors here are tiny: intra-op threads only add contention (10-50x slower on a busy 2-core box).
    torch.set_num_threads(1)
