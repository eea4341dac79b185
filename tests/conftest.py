"""Session-wide test settings."""

import os
from pathlib import Path

import torch

# One intra-op thread for the whole suite: the test tensors are tiny, several tests start their own
# processes (DDP, memory, CLI), and on a busy 2-core machine OpenMP worker threads that spin-wait and
# get descheduled made each op ~100x slower (measured: a 5-step CG 5 s vs 0.03 s).
torch.set_num_threads(1)

# The shared Omniglot copy beside the checkout, unless .ci/run or the user points elsewhere.
os.environ.setdefault(
    "IMAML_OMNIGLOT_ROOT", str((Path(__file__).resolve().parents[1] / ".." / "shared" / "omniglot").resolve())
)
